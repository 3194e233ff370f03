"""Quantized ``nn.Embedding``: an int8 table, looked up before dequantization.

The table is quantized per row (symmetric, one scale per token), so a rare
token with large values does not coarsen every other row. On export the int8
table is gathered first and only the gathered rows are dequantized
(``Gather -> Cast -> Mul`` by the gathered row scales), so a 30k-token table is
never expanded to float at run time.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from quantaware.config import FloatSpec, PerChannel, QuantSpec
from quantaware.fake_quant import FakeQuantizer, Float16Quantizer, make_quantizer
from quantaware.nn.base import QuantMixin, release_parameter
from quantaware.nn.registry import register
from quantaware.primitives import quantize


@register(nn.Embedding)
class QuantEmbedding(QuantMixin, nn.Embedding):
    """``nn.Embedding`` with a per-row ``weight_quantizer`` (weights only).

    Example:
        >>> from quantaware import presets
        >>> q = QuantEmbedding.from_float(nn.Embedding(10, 4), presets.W8.weight, None)
        >>> q(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 4])
    """

    @classmethod
    def from_float(cls, module: nn.Embedding, weight_spec: QuantSpec | FloatSpec | None,
                   activation_spec: QuantSpec | None) -> QuantEmbedding:
        new = cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                  max_norm=module.max_norm, norm_type=module.norm_type,
                  scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.weight = module.weight
        new._init_activation_slots()
        new.weight_quantizer = None
        if isinstance(weight_spec, QuantSpec):
            if not weight_spec.symmetric:
                raise ValueError("embedding tables are quantized symmetrically; use "
                                 "QuantSpec(symmetric=True) for weights")
            # one scale per row; the rest of the spec (learned step sizes) as given
            weight_spec = dataclasses.replace(weight_spec, signed=True,
                                              granularity=PerChannel(0))
        if weight_spec is not None:
            new.weight_quantizer = make_quantizer(weight_spec, channels=module.num_embeddings,
                                                  from_tensor=True)
        new.exporting = False
        return new

    def to_float(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` with the float (master) table."""
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        out.weight = self.weight
        return out

    def freeze_for_export(self) -> None:
        """Store the int8 table and row scales, or the float16 table (only call on a
        copy: the float table leaves the module's state)."""
        wq = self.weight_quantizer
        if isinstance(wq, Float16Quantizer):
            self.register_buffer("_w16", self.weight.detach().to(torch.float16))
            release_parameter(self, "weight")
        elif isinstance(wq, FakeQuantizer) and bool(wq.fake_quant_enabled):
            with torch.no_grad():
                scale, zp = wq.qparams(self.weight)
                self.register_buffer("_qweight",
                                     quantize(self.weight, scale, zp, wq.qmin, wq.qmax, 0))
                self.register_buffer("_wscale", scale.clone().unsqueeze(1))
                release_parameter(self, "weight")
        self.exporting = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.exporting and hasattr(self, "_qweight"):
            return torch.ops.quantaware.gather_dequantize(self._qweight, self._wscale, ids)
        if self.exporting and hasattr(self, "_w16"):  # float16 rows, looked up, then cast
            return torch.ops.quantaware.cast_float(F.embedding(ids, self._w16,
                                                                self.padding_idx))
        wq = self.weight_quantizer
        weight = self.weight
        if isinstance(wq, FakeQuantizer) and bool(wq.fake_quant_enabled):
            scale, zp = wq.qparams(self.weight)
            weight = wq.fake_quantize_with(self.weight, scale, zp)  # its gradient rule
        elif wq is not None and not isinstance(wq, FakeQuantizer):
            weight = wq(self.weight)
        return F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
