"""Traceable forms of torch's attention and transformer modules.

``torch.fx`` treats ``nn.MultiheadAttention`` and the ``nn.Transformer*`` modules
as leaves (their forwards branch on tensor properties for the fused fast path),
so the linear layers inside them would stay float. :func:`make_traceable`
replaces each ``nn.MultiheadAttention`` with a :class:`TraceableMultiheadAttention`
(separate query, key, value and output ``nn.Linear`` layers and tensor matmuls,
the same weights) and gives the ``nn.Transformer*`` modules a forward without the
fast path. Outputs are those of torch's slow path, to float rounding.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import fx, nn

__all__ = ["TraceableMultiheadAttention", "make_traceable"]


def _batched(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``x`` as ``(N, L, E)``: unbatched ``(L, E)`` gains a batch of one, and a
    sequence-first ``(L, N, E)`` is transposed."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x if batch_first else x.transpose(0, 1)


def _unbatched_like(y: torch.Tensor, query: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """The attention output ``(N, L, E)`` in the layout of ``query``."""
    if query.dim() == 2:
        return y.squeeze(0)
    return y if batch_first else y.transpose(0, 1)


def _weights_like(w: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    return w.squeeze(0) if query.dim() == 2 else w


def _as_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: not attended) as an additive ``-inf`` / 0 bias."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def _attention_bias(scores: torch.Tensor, attn_mask: torch.Tensor | None,
                    key_padding_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """The additive bias for ``scores`` ``(N, H, L, S)`` from torch's mask arguments:
    ``attn_mask`` ``(L, S)`` or ``(N * H, L, S)``, ``key_padding_mask`` ``(N, S)``
    (or ``(S,)`` unbatched), each boolean (True: not attended) or float (added);
    ``is_causal`` without a mask masks the future."""
    n, h, length, source = scores.shape
    bias = torch.zeros((), dtype=scores.dtype, device=scores.device)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool,
                               device=scores.device).triu(1)
    if attn_mask is not None:
        mask = _as_bias(attn_mask, scores.dtype)
        bias = bias + (mask.reshape(n, h, length, source) if mask.dim() == 3 else mask)
    if key_padding_mask is not None:
        pad = _as_bias(key_padding_mask, scores.dtype).reshape(-1, 1, 1, source)
        bias = bias + pad
    return bias


# Executed as one call in the traced graph: their branches read tensor ranks and dtypes.
for _name in ("_batched", "_unbatched_like", "_weights_like", "_attention_bias"):
    fx.wrap(_name)


class TraceableMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as ``nn.Linear`` layers.

    The same computation and call signature as torch's module (batched or
    unbatched inputs, ``batch_first``, boolean or float ``attn_mask`` and
    ``key_padding_mask``, ``is_causal``, ``need_weights``), written with
    ``torch.matmul`` and ``torch.softmax``, so quantaware quantizes the four
    projections and both matmuls. Build it with :meth:`from_float`.

    Example:
        >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
        >>> twin = TraceableMultiheadAttention.from_float(mha).eval()
        >>> x = torch.randn(2, 5, 16)
        >>> torch.allclose(twin(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of num_heads "
                             f"{num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> TraceableMultiheadAttention:
        """The traceable twin of ``mha``, sharing none of its tensors (copies).

        Raises:
            ValueError: for ``add_bias_kv`` or ``add_zero_attn``, which it does not
                implement.
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has "
                             "no traceable form")
        has_bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, has_bias, mha.dropout,
                  mha.batch_first)
        e = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.split(e)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.split(e) if has_bias else (None, None, None)
            for layer, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases,
                                   strict=True):
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)
        return new.train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length = x.shape[0], x.shape[1]
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        q_in = _batched(query, self.batch_first)
        q = self._heads(self.q_proj(q_in))
        k = self._heads(self.k_proj(_batched(key, self.batch_first)))
        v = self._heads(self.v_proj(_batched(value, self.batch_first)))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if attn_mask is not None or key_padding_mask is not None or is_causal:
            # a method call: quantaware quantizes tensor-tensor '+' but not the mask
            scores = scores.add(_attention_bias(scores, attn_mask, key_padding_mask,
                                                is_causal))
        probs = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).transpose(1, 2)
        context = context.reshape(context.shape[0], context.shape[1], self.embed_dim)
        out = _unbatched_like(self.out_proj(context), query, self.batch_first)
        if not need_weights:
            return out, None
        weights = probs.mean(dim=1) if average_attn_weights else probs
        return out, _weights_like(weights, query)


class _TraceableEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without the fused fast path."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


class _TraceableEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without the fast path and nested tensors."""

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                is_causal: bool | None = None) -> torch.Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=bool(is_causal))
        return x if self.norm is None else self.norm(x)


class _TraceableDecoder(nn.TransformerDecoder):
    """``nn.TransformerDecoder`` without reading its masks' values."""

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor,
                tgt_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False
                ) -> torch.Tensor:
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                      tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask,
                      tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return x if self.norm is None else self.norm(x)


class _TraceableDecoderLayer(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer``, traced through (its forward is plain)."""


class _TraceableTransformer(nn.Transformer):
    """``nn.Transformer`` without its shape checks on traced sizes."""

    def forward(self, src: torch.Tensor, tgt: torch.Tensor,
                src_mask: torch.Tensor | None = None, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None,
                src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


_TRACEABLE: dict[type[nn.Module], type[nn.Module]] = {
    nn.TransformerEncoderLayer: _TraceableEncoderLayer,
    nn.TransformerEncoder: _TraceableEncoder,
    nn.TransformerDecoderLayer: _TraceableDecoderLayer,
    nn.TransformerDecoder: _TraceableDecoder,
    nn.Transformer: _TraceableTransformer,
}


def make_traceable(model: nn.Module) -> nn.Module:
    """Make torch's attention and transformer modules in ``model`` traceable, in place.

    Every ``nn.MultiheadAttention`` below ``model`` becomes a
    :class:`TraceableMultiheadAttention` with the same weights, and every
    ``nn.Transformer``, ``nn.TransformerEncoder(Layer)`` and
    ``nn.TransformerDecoder(Layer)`` keeps its modules and takes a forward without
    the fast path (the computation of torch's slow path). Subclasses of these
    modules are left as they are: their forward may differ.

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
        >>> x = torch.randn(2, 5, 16)
        >>> y = layer(x)
        >>> traced = make_traceable(layer)
        >>> type(traced.self_attn).__name__, torch.allclose(traced(x), y, atol=1e-5)
        ('TraceableMultiheadAttention', True)
    """
    for name, module in list(model.named_modules()):
        if type(module) is nn.MultiheadAttention and name:
            try:
                model.set_submodule(name, TraceableMultiheadAttention.from_float(module))
            except ValueError as exc:
                warnings.warn(f"{name} stays a float nn.MultiheadAttention: {exc}",
                              stacklevel=2)
        elif type(module) in _TRACEABLE:
            module.__class__ = _TRACEABLE[type(module)]
    return model
