"""Deployment defaults chosen from measurements, per backend, and the built-in model sources.

Measured with ``benchmarks/deploy.py`` on an x86 CPU with AVX-512 VNNI and ONNX
Runtime 1.31 (2 threads):

- **CNNs** (ResNet-18, MobileNetV2): static QDQ with **uint8 activations / int8
  per-channel weights** (u8s8, ``presets.INT8``) and activation ranges from the
  histogram percentile observer (``INT8_CNN``). ONNX Runtime fuses every conv,
  residual add, concat and pooling into QLinear kernels; int8 activations (s8s8)
  ran slower than FP32 and dynamic quantization of convs 7x slower. MobileNetV2
  (real weights, 88 calibration / 264 evaluation crops, top-1 agreement with FP32
  all / confident, torch): min-max 73.1% / 95.1%, percentile 81.8% / 96.1%, MSE
  74.6% / 99.0% (``benchmarks/ptq.py``, calibration group).
- **Transformers** (any model with ``nn.LayerNorm``): u8s8 Linear layers (and
  int8 embedding tables) with SmoothQuant (``alpha=0.8``) before calibration;
  residual adds, the attention matmuls and LayerNorm/Softmax/GELU stay float.
  Quantizers whose tensor feeds only float ops are not emitted, so ONNX Runtime
  runs every Linear as ``MatMulIntegerToFloat``. Measured on all-MiniLM-L6-v2
  (64 calibration / 160 evaluation sentences, sequence length 64), embedding
  cosine to FP32 / nearest-neighbour agreement: without SmoothQuant 0.9926 /
  89.4%; alpha 0.5 0.989 / 80.6%; 0.75 0.9978 / 92.5%; 0.85 0.9979 / 91.3%;
  alpha 0.8 with float attention matmuls 0.9981 / 95.0%; and with the one
  Linear that loses most output SQNR on the calibration data alone
  (``encoder.layer.0.output.dense``, the first FFN down-projection, whose GELU
  input has the widest outliers) kept on float inputs and int8 weights
  (``TRANSFORMER_FLOAT_LAYERS = 1``), 0.9986 / 97.5% (two layers: 0.9988 /
  96.2%; float weights there too would break the 0.27x size). At sequence
  length 64 the two attention matmuls are about 3% of the multiply-adds, so
  keeping them (and the softmax between them) float costs little time.

Example:
    >>> import torch
    >>> default_config(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))).name
    'INT8_CNN'
    >>> default_config(torch.nn.Sequential(torch.nn.LayerNorm(4))).name
    'INT8_TRANSFORMER'
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantaware import presets
from quantaware._batch import input_args, inputs_size, slice_inputs, split_batch
from quantaware._spec import call_spec
from quantaware.config import LayerOverride, QuantConfig, QuantSpec

__all__ = [
    "BACKENDS",
    "BUILTIN_MODELS",
    "ModelSource",
    "default_config",
    "integer_output_layers",
    "load_model_source",
    "most_sensitive_linears",
    "quantize_for_backend",
]

SMOOTHQUANT_ALPHA = 0.8
# Transformers: Linear layers kept float, the most sensitive on the calibration data.
TRANSFORMER_FLOAT_LAYERS = 1
# Calibration batches the sensitivity ranking runs on.
SENSITIVITY_BATCHES = 2

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime-x86", "litert")

# LiteRT has no integer kernel with a float output: a layer whose output only float
# ops read runs in float32 unless its output stays int8. quantize_for_backend keeps
# it int8 where int8 rounding of it costs little, an SQNR of at least this on the
# calibration data (dB). all-MiniLM-L6-v2: the FFN down-projections, whose outputs
# carry the residual stream's outlier channels, measure 15-19 dB; every other
# Linear 27-39 dB.
INTEGER_OUTPUT_MIN_SQNR_DB = 25.0

# Residual/mask adds and attention matmuls stay float in transformers: prepare
# names functional ops "add", "add_1", ..., "iadd", "matmul", "matmul_1", ...
_FLOAT_OPS = tuple(LayerOverride(p, skip=True)
                   for p in ("add", "add_*", "iadd*", "matmul", "matmul_*", "bmm", "bmm_*"))


def default_config(model: nn.Module, backend: str = "onnxruntime-x86") -> QuantConfig:
    """The measured-best INT8 config for ``model`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; measured backends: {BACKENDS}")
    if any(isinstance(m, nn.LayerNorm | nn.MultiheadAttention) for m in model.modules()):
        return dataclasses.replace(presets.INT8.with_overrides(*_FLOAT_OPS),
                                   name="INT8_TRANSFORMER")
    return dataclasses.replace(presets.INT8, name="INT8_CNN", activation=dataclasses.replace(
        presets.INT8.activation, observer="percentile"))


def most_sensitive_linears(prepared: nn.Module, data: list[Any], count: int) -> list[str]:
    """The ``count`` Linear layers whose quantization alone degrades the output most.

    Each Linear is quantized on its own (everything else float) on ``data``, and
    the layers are ranked by the output's SQNR against the float model (the
    "only this layer quantized" view of :func:`quantaware.analysis.sensitivity`),
    lowest first.

    Example:
        >>> import torch
        >>> from quantaware import presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> x = [torch.randn(16, 4)]
        >>> len(most_sensitive_linears(quantize(net, presets.INT8, x, x[0][:1]), x, 1))
        1
    """
    from quantaware.analysis.metrics import outputs, sqnr_db
    from quantaware.analysis.sensitivity import _only, layer_quantizers
    from quantaware.nn import QuantLinear

    if count < 1:
        return []
    owned = layer_quantizers(prepared)
    names = [n for n, m in prepared.named_modules() if isinstance(m, QuantLinear) and n in owned]
    with torch.no_grad():
        with _only(prepared, enabled=set(), disabled=set()):
            ref = outputs(prepared, data)
        sqnr = {}
        for name in names:
            with _only(prepared, enabled={id(q) for q in owned[name]}, disabled=set()):
                sqnr[name] = sqnr_db(outputs(prepared, data), ref)
    return sorted(names, key=sqnr.__getitem__)[:count]


def quantize_for_backend(model: nn.Module, calib: Iterable[Any], example: Any,
                         backend: str = "onnxruntime-x86",
                         config: QuantConfig | None = None,
                         float_layers: int | None = None) -> nn.Module:
    """PTQ with the measured defaults: :func:`default_config`, SmoothQuant for transformers.

    With ``backend="litert"`` the layers whose outputs only float ops read keep
    those outputs int8 where that costs little (:func:`integer_output_layers`), so
    LiteRT runs them as integer kernels rather than in float32; the returned
    model's ``quantaware_config`` records them as ``integer_output`` overrides.

    For transformers the ``float_layers`` (default :data:`TRANSFORMER_FLOAT_LAYERS`)
    Linear layers that are most sensitive on the calibration data
    (:func:`most_sensitive_linears`) stay float; the returned model's
    ``quantaware_config`` records them as overrides, so the choice is reproducible.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> x = torch.randn(16, 4)
        >>> q = quantize_for_backend(net, [x], x[:1])
        >>> q(x).shape
        torch.Size([16, 8])
    """
    from quantaware.calibrate import calibrate
    from quantaware.prepare import _glob_escape, prepare
    from quantaware.smoothquant import smooth_quant

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; measured backends: {BACKENDS}")
    config = config or default_config(model, backend)
    transformer = config.name == "INT8_TRANSFORMER"
    if float_layers is None:
        float_layers = TRANSFORMER_FLOAT_LAYERS if transformer else 0
    if float_layers < 0:
        raise ValueError(f"float_layers must be >= 0, got {float_layers}")
    calib = list(calib)  # read more than once (smoothing, calibration, choices)
    if not calib:
        raise ValueError("quantize_for_backend needs calibration data: pass at least one "
                         "batch (a few hundred representative samples is typical)")
    args = input_args(example, model)

    def ptq(cfg: QuantConfig) -> nn.Module:
        prepared = prepare(model, cfg, args)
        if transformer:
            smooth_quant(prepared, calib, alpha=SMOOTHQUANT_ALPHA)
        return calibrate(prepared, calib)

    if backend == "litert" and isinstance(config.activation, QuantSpec):
        config = config.with_overrides(*(
            LayerOverride(_glob_escape(name), integer_output=True)
            for name in integer_output_layers(model, config, args, ptq, calib)))
    quantized = ptq(config)
    if float_layers:
        names = most_sensitive_linears(quantized, calib[:SENSITIVITY_BATCHES], float_layers)
        log.info("keeping the most sensitive layers float: %s", names)
        quantized = ptq(config.with_overrides(*(LayerOverride(n, activation=None)
                                                for n in names)))
    return quantized


def integer_output_layers(model: nn.Module, config: QuantConfig, example: tuple[Any, ...],
                          ptq: Callable[[QuantConfig], nn.Module], calib: list[Any],
                          min_sqnr_db: float = INTEGER_OUTPUT_MIN_SQNR_DB) -> list[str]:
    """The Linear layers whose outputs only float ops read (``config`` drops their
    output quantizers) and whose int8 output costs at most ``min_sqnr_db`` of SQNR on
    ``calib``: the ones worth keeping integer for a backend without integer kernels
    that return float (LiteRT).

    ``ptq`` quantizes ``model`` with a config (prepare, calibrate); the candidates'
    SQNR is measured on ``calib`` with every output quantizer kept.

    Example:
        >>> import torch
        >>> from quantaware import presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU())
        >>> x = torch.randn(64, 4)
        >>> ptq = lambda cfg: quantize(net, cfg, [x], x[:1])
        >>> integer_output_layers(net, presets.INT8, (x[:1],), ptq, [x])
        ['0']
    """
    from quantaware.nn import QuantLinear
    from quantaware.prepare import prepare

    def outputs(prepared: nn.Module) -> set[str]:
        # Linear layers only: an int8 attention matmul becomes a FULLY_CONNECTED with
        # non-constant weights whose requantization the integer reference does not
        # reproduce, and a residual add's int8 output buys no kernel.
        return {name for name, m in prepared.named_modules()
                if isinstance(m, QuantLinear) and isinstance(m.output_quantizer, nn.Module)}

    kept = config.with_overrides(LayerOverride("*", integer_output=True))
    candidates = outputs(prepare(model, kept, example)) - outputs(prepare(model, config, example))
    if not candidates:
        return []
    quantized = ptq(kept)
    power = {name: torch.zeros(2, dtype=torch.float64) for name in candidates}

    def record(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = args[0].detach().double()
            power[name] += torch.stack([x.square().sum(), (out.detach().double() - x)
                                        .square().sum()])
        return hook

    modules = dict(quantized.named_modules())
    handles = [modules[name].output_quantizer.register_forward_hook(record(name))
               for name in sorted(candidates)]
    try:
        with torch.no_grad():
            for batch in calib:
                args, kwargs = split_batch(batch)
                quantized(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    kept_names = []
    for name in sorted(candidates):
        signal, noise = power[name].tolist()
        sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
        log.info("%s: int8 output SQNR %.1f dB", name, sqnr)
        if sqnr >= min_sqnr_db:
            kept_names.append(name)
    return kept_names


@dataclass
class ModelSource:
    """A model with data to calibrate, evaluate and example inputs.

    Attributes:
        name: label for reports.
        model: the float model (eval mode).
        kind: ``"image"`` (fidelity = top-1 agreement) or ``"text"`` (embedding cosine).
        example: one batch (tensor or dict of inputs) for prepare/export.
        calib: calibration batches.
        evaluate: evaluation batches.
        unlabeled: makes further inputs (other crops) for label-free distillation,
            or ``None`` if the source has none.
        stem: the file name stem to use instead of the one derived from ``name``.
    """

    name: str
    model: nn.Module
    kind: str
    example: Any
    calib: list[Any]
    evaluate: list[Any]
    unlabeled: Callable[[], list[Any]] | None = None
    stem: str | None = None

    @property
    def file_stem(self) -> str:
        """``name`` as a file name in the output folder: a ``path/to/models.py:build``
        spec is ``models-build``, never a path that leads out of the folder.

        Example:
            >>> ModelSource("/home/me/models.py:build", None, "image", None, [], []).file_stem
            'models-build'
        """
        if self.stem is not None:  # set where two sources would share a name
            return self.stem
        module, _, function = self.name.rpartition(":")
        base = Path(module).stem if module.endswith(".py") else module.rpartition(".")[2]
        stem = f"{base}-{function}" if module else Path(self.name.rstrip("/\\")).name
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "model"


# Unlabelled crops (another seed) for label-free distillation of image models.
UNLABELED_CROPS = 256


def _batches(x: Any, size: int) -> list[Any]:
    return [slice_inputs(x, i, i + size) for i in range(0, inputs_size(x), size)]


def _first(batch: Any, n: int = 1) -> Any:
    return slice_inputs(batch, 0, n)


def _images(name: str, model: nn.Module, num_calib: int, num_eval: int,
            size: int) -> ModelSource:
    from quantaware.images import image_crops

    calib, evaluate = image_crops(num_calib, size, seed=1), image_crops(num_eval, size, seed=2)
    return ModelSource(name, model.eval(), "image", calib[:1], _batches(calib, 16),
                       _batches(evaluate, 16),
                       unlabeled=lambda: _batches(image_crops(UNLABELED_CROPS, size, seed=7), 16))


def _text(model: nn.Module, num_calib: int, num_eval: int, seq_len: int) -> ModelSource:
    from quantaware.text import real_sentences
    from quantaware.zoo.minilm import MiniLMTokenizer

    tok = MiniLMTokenizer(seq_len)
    sentences = real_sentences(num_calib + num_eval, seed=0)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = tok(texts)
        return {"input_ids": ids, "attention_mask": mask}

    calib, evaluate = encode(sentences[:num_calib]), encode(sentences[num_calib:])
    return ModelSource("minilm", model.eval(), "text", _first(calib), _batches(calib, 16),
                       _batches(evaluate, 16))


def _builtin(name: str) -> Callable[[int, int, int], ModelSource]:
    from quantaware import zoo

    def mobilenet(nc: int, ne: int, size: int) -> ModelSource:
        return _images("mobilenet_v2", zoo.load_mobilenet_v2_imagenet(), nc, ne, size)

    def resnet(nc: int, ne: int, size: int) -> ModelSource:
        torch.manual_seed(0)
        return _images("resnet18", zoo.resnet18(), nc, ne, size)

    def minilm(nc: int, ne: int, size: int) -> ModelSource:
        from quantaware.zoo.minilm import load_minilm

        return _text(load_minilm(), nc, ne, size)

    return {"mobilenet_v2": mobilenet, "resnet18": resnet, "minilm": minilm}[name]


BUILTIN_MODELS = ("mobilenet_v2", "resnet18", "minilm")


def load_model_source(spec: str, num_calib: int | None = None, num_eval: int | None = None,
                      size: int | None = None,
                      input_shape: tuple[int, ...] | None = None) -> ModelSource:
    """A built-in model (``mobilenet_v2``, ``resnet18``, ``minilm``) or ``MODULE:FUNCTION``.

    Args:
        spec: a built-in name, or ``package.module:function`` returning an ``nn.Module``.
        num_calib, num_eval: samples to calibrate and evaluate on (default: 88 and
            264 image crops, 64 and 160 sentences for MiniLM).
        size: image side (CNNs, default 224) or sequence length (MiniLM, default 64).
        input_shape: per-sample input shape of a ``MODULE:FUNCTION`` model; inputs
            are then seeded random normal tensors (real data: use the Python API).

    Example:
        >>> src = load_model_source("torch.nn:Identity", 4, 4, input_shape=(3,))
        >>> src.kind, src.example.shape
        ('image', torch.Size([1, 3]))
    """
    text = spec == "minilm"
    num_calib = num_calib if num_calib is not None else (64 if text else 88)
    num_eval = num_eval if num_eval is not None else (160 if text else 264)
    for name, value in (("num_calib", num_calib), ("num_eval", num_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if spec in BUILTIN_MODELS:
        return _builtin(spec)(num_calib, num_eval, size or (64 if text else 224))
    if ":" not in spec:
        raise ValueError(
            f"unknown model {spec!r}: use one of {BUILTIN_MODELS} or MODULE:FUNCTION "
            "(a function returning a torch.nn.Module)"
        )
    model = call_spec(spec)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    if not input_shape:
        raise ValueError(f"{spec}: pass the per-sample input shape, e.g. --input-shape 3,224,224")
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(num_calib, *input_shape, generator=gen)
    evaluate = torch.randn(num_eval, *input_shape, generator=gen)
    return ModelSource(spec, model.eval(), "image", calib[:1], _batches(calib, 16),
                       _batches(evaluate, 16))
