"""Fake-quantizer modules: an observer, qparams and enable flags, over the primitives.

:class:`FakeQuantizer` is the one object that stands for "this tensor is
quantized". Its state (``scale``, ``zero_point``, ``observer_enabled``,
``fake_quant_enabled`` and the observer's statistics) are buffers, so they travel
with ``state_dict``, checkpoints and DDP.

Three sources of qparams:

- calibrated (static activations): the observer collects ranges while
  ``observer_enabled``; :meth:`FakeQuantizer.freeze` turns them into qparams.
- from the tensor itself (``from_tensor=True``): weights, whose qparams follow the
  current weight at every call (so QAT updates them), and dynamic activations
  (ONNX ``DynamicQuantizeLinear`` semantics, computed per call).
- learned (:class:`LearnableFakeQuantizer`, ``QuantSpec(learned=True)``): the
  scale is an ``nn.Parameter`` trained with LSQ gradients (Esser et al. 2019,
  arXiv 1902.08153), and with ``learned_offset`` the zero point too (LSQ+,
  Bhalgat et al. 2020, arXiv 2004.09576). Activation scales start from
  calibration (or, in QAT from float, from the first batch seen); weight scales
  from the weight itself, as the smaller of the min-max scale and LSQ's
  ``2 * mean(|w|) / sqrt(Qp)``.
- fixed: :meth:`FakeQuantizer.load_qparams` pins the qparams of any static or
  weight quantizer (range-setting algorithms such as MSE weight ranges or
  AdaRound); :meth:`FakeQuantizer.follow_tensor` returns a weight quantizer to
  qparams from the current weight.

:class:`Float16Quantizer` rounds to float16 (straight-through gradient).

Example:
    >>> import torch
    >>> from quantaware.config import QuantSpec
    >>> fq = FakeQuantizer(QuantSpec(bits=8, signed=False, symmetric=False))
    >>> fq.observe_only(); _ = fq(torch.linspace(0, 2.55, 100)); fq.freeze()
    >>> fq(torch.tensor([0.014])).item()
    0.009999999776482582
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from quantaware.config import FloatSpec, PerChannel, QuantSpec
from quantaware.observers import CalibrationError, HistogramObserver, Observer, make_observer
from quantaware.primitives import (
    SCALE_EPS,
    all_finite,
    choose_qparams,
    choose_qparams_scalar,
    fake_quantize,
    fake_quantize_activated,
    fake_quantize_lsq,
    lsq_grad_scale,
    symmetric_scale,
)

__all__ = ["FakeQuantizer", "Float16Quantizer", "LearnableFakeQuantizer", "frozen",
           "make_quantizer"]


class FakeQuantizer(nn.Module):
    """Quantize-dequantize a tensor in float with a straight-through gradient.

    Args:
        spec: the integer format.
        channels: number of channels for per-channel specs.
        from_tensor: compute qparams from each input (weights, dynamic activations)
            instead of from calibrated statistics.
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None,
                 from_tensor: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.qmin, self.qmax = spec.quant_range
        self.axis: int | None = (
            spec.granularity.axis if isinstance(spec.granularity, PerChannel) else None
        )
        if self.axis is not None and not channels:
            raise ValueError("per-channel quantization needs the number of channels")
        self.from_tensor = from_tensor or spec.dynamic
        self.observer = None if self.from_tensor else make_observer(spec, channels)
        shape = (channels,) if self.axis is not None else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.tensor(1, dtype=torch.uint8))
        # 1 once qparams hold calibrated or loaded values; a weight quantizer with
        # loaded qparams uses them instead of the current weight's range.
        self.register_buffer("calibrated", torch.tensor(0, dtype=torch.uint8))
        self.exporting = False

    # -- modes -----------------------------------------------------------------
    def observe_only(self) -> None:
        """Collect statistics, pass tensors through unchanged (PTQ calibration)."""
        if self.observer is not None:
            self.observer_enabled.fill_(1)
            self.fake_quant_enabled.fill_(0)

    def observe_and_quantize(self) -> None:
        """Collect statistics and quantize with qparams updated every call (QAT)."""
        if self.observer is not None:
            self.observer_enabled.fill_(1)
        self.fake_quant_enabled.fill_(1)

    def freeze(self) -> None:
        """Fix qparams from the statistics seen so far and quantize with them."""
        if self.observer is not None:
            self.load_qparams(*self.observer.calculate_qparams())
            self.observer_enabled.fill_(0)
        self.fake_quant_enabled.fill_(1)

    def disable(self) -> None:
        """Pass tensors through in float."""
        self.observer_enabled.fill_(0)
        self.fake_quant_enabled.fill_(0)

    def load_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set fixed qparams (checked to be finite and positive).

        On a weight quantizer (``from_tensor``) the loaded qparams replace the
        per-call min-max of the weight until :meth:`follow_tensor` is called.
        Dynamic activation quantizers cannot hold fixed qparams.
        """
        if self.spec.dynamic:
            raise CalibrationError(
                "dynamic activation quantizers compute qparams per call; use a static "
                "activation spec (dynamic=False) to load fixed qparams"
            )
        scale = scale.detach().to(self.scale)
        if not (all_finite(scale) and bool((scale > 0).all())):
            raise CalibrationError(f"invalid scale {scale}: scales must be finite and > 0")
        self._store_qparams(scale, zero_point)

    def _store_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Copy qparams in without checks (``choose_qparams`` output is valid)."""
        self.scale.copy_(scale.detach().reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.detach().reshape(self.zero_point.shape))
        self.calibrated.fill_(1)

    def follow_tensor(self) -> None:
        """Weight quantizers: derive qparams from the current weight again."""
        if not self.from_tensor:
            raise CalibrationError("only weight (from_tensor) quantizers follow their tensor")
        self.calibrated.fill_(0)

    # -- maths -----------------------------------------------------------------
    def effective_scale(self) -> torch.Tensor:
        """The scale the forward pass uses (learned quantizers project theirs)."""
        return self.scale

    def deployed_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated ``(scale, zero_point)`` an export writes, detached: the
        effective scale, and for a learned offset its rounded integer zero point.

        Example:
            >>> q = FakeQuantizer(QuantSpec(bits=8, symmetric=True))
            >>> q.observe_only(); _ = q(torch.linspace(-1, 1, 11)); q.freeze()
            >>> [round(float(v), 5) for v in q.deployed_qparams()]
            [0.00784, 0.0]
        """
        return self.effective_scale().detach(), self.zero_point.detach()

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The qparams used for ``x`` (needed for ``from_tensor`` quantizers)."""
        if self.from_tensor and not bool(self.calibrated):
            if x is None:
                raise ValueError("this quantizer derives qparams from its input; pass x")
            scale, zero_point = self._own_qparams(x)
            if isinstance(zero_point, int):
                zero_point = torch.full_like(scale, zero_point, dtype=torch.int32)
            return scale, zero_point
        if not bool(self.calibrated):
            raise CalibrationError(
                "quantizer used before calibration: run quantaware.calibrate(model, data) "
                "(PTQ) or enable observers for QAT before quantizing"
            )
        return self.scale, self.zero_point

    def _own_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
        """Qparams from ``x``'s own range; a symmetric zero point (the centre of the
        integer range, the same for every channel) as a Python int."""
        detached = x.detach()
        dim = None
        if self.axis is not None:
            axis = self.axis % x.dim()
            if axis:
                detached = detached.transpose(0, axis)
            detached, dim = detached.reshape(x.shape[axis], -1), 1
        if self.spec.symmetric:  # the range is the largest magnitude: one reduction
            absmax = detached.abs().amax() if dim is None else detached.abs().amax(dim)
            return symmetric_scale(absmax, self.qmin, self.qmax), (
                self.qmin + self.qmax + 1) // 2
        if dim is None:
            lo, hi = torch.aminmax(detached)
        else:  # two reductions: several times faster than aminmax(dim=) on CPU
            lo, hi = detached.amin(dim), detached.amax(dim)
        return choose_qparams(lo, hi, self.qmin, self.qmax, self.spec.symmetric)

    def set_smoothing(self, factor: torch.Tensor | None) -> None:
        """Multiply inputs by a per-channel (last axis) ``factor`` before quantizing.

        SmoothQuant-style scale migration (see :mod:`quantaware.smoothquant`): the
        consumers of this quantizer carry the inverse factor in their weights.
        """
        if factor is None:
            self._buffers.pop("smoothing", None)
        else:
            self.register_buffer("smoothing", factor.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smoothing = self._buffers.get("smoothing")
        if smoothing is not None:
            x = x * smoothing
        if self.exporting:
            return self._export_forward(x)
        quantizing = bool(self.fake_quant_enabled)
        if self.observer is not None and bool(self.observer_enabled):
            self.observer(x)
            if quantizing:  # QAT: qparams follow the statistics every step
                return self.fake_quantize_with(x, self.scale, self._follow_observer())
        if not quantizing:
            return x
        if self.from_tensor and not self.spec.dynamic and not bool(self.calibrated):
            # Weights: qparams from this very tensor's range (widened at most), so
            # nothing is clipped and the gradient needs no in-range mask.
            scale, zero_point = self._own_qparams(x)
            return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, self.axis,
                                 own_range=True)
        scale, zero_point = self.qparams(x)
        return self.fake_quantize_with(x, scale, zero_point)

    def requantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded onto this quantizer's current grid without observing it: the
        output of an op that keeps its input's grid (a resize). Until the quantizer
        is calibrated (or quantizing), ``x`` passes unchanged."""
        if self.exporting:
            return self._export_forward(x)
        if not bool(self.fake_quant_enabled) or not bool(self.calibrated):
            return x
        scale, zero_point = self.qparams(x)
        return self.fake_quantize_with(x, scale, zero_point)

    def fake_quantize_activated(self, x: torch.Tensor, upper: float) -> torch.Tensor | None:
        """This quantizer applied to ``clamp(x, 0, upper)`` (a fused ReLU/ReLU6) in
        one go, or ``None`` when it must see the activation's output (observing,
        not quantizing, exporting, per-channel; see
        :func:`quantaware.primitives.fake_quantize_activated`)."""
        if (self.from_tensor or self.exporting or self.axis is not None
                or "smoothing" in self._buffers or not bool(self.fake_quant_enabled)
                or bool(self.observer_enabled) or not bool(self.calibrated)):
            return None
        return fake_quantize_activated(x, self.scale, self.zero_point, self.qmin, self.qmax,
                                       upper)

    def _follow_observer(self) -> torch.Tensor | int:
        """Store the observer's current qparams; return the zero point to quantize with."""
        observer = self.observer
        if self.axis is None and type(observer).calculate_qparams is Observer.calculate_qparams:
            # One min-max range: the same qparams in Python numbers, two buffer fills
            # instead of a dozen tensor ops on single values.
            scale, zero_point = choose_qparams_scalar(
                float(observer.min_val), float(observer.max_val), self.qmin, self.qmax,
                self.spec.symmetric)
            self.scale.fill_(scale)
            self.zero_point.fill_(zero_point)
            self.calibrated.fill_(1)
            return zero_point
        if isinstance(observer, HistogramObserver) and bool(self.calibrated) and not (
                observer.range_due()):
            return self.zero_point  # a costly search, refreshed every few batches
        self._store_qparams(*observer.calculate_qparams())
        return self.zero_point

    def fake_quantize_with(self, x: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with given qparams, with this quantizer's gradient rule."""
        if self.from_tensor and not self.spec.dynamic and not bool(self.calibrated):
            # Weight qparams come from this very tensor's range (widened at most):
            # nothing is clipped, so the gradient needs no in-range mask.
            if self.spec.symmetric:  # the zero point is the centre: pass it as a number
                zero_point = (self.qmin + self.qmax + 1) // 2
            return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, self.axis,
                                 own_range=True)
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, self.axis)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        from quantaware.export import ops

        # Export traces Python: no branching on buffer values here (validated before).
        if self.spec.dynamic:
            return torch.ops.quantaware.dynamic_quantize_dequantize(x)
        return torch.ops.quantaware.quantize_dequantize(
            x, self.scale, self.zero_point, ops.AXIS_NONE if self.axis is None else self.axis,
            self.qmin, self.qmax,
        )

    def extra_repr(self) -> str:
        s = self.spec
        kind = "dynamic" if s.dynamic else ("from_tensor" if self.from_tensor else "calibrated")
        gran = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        sym = "symmetric" if s.symmetric else "asymmetric"
        return f"{s.bits}-bit [{self.qmin}, {self.qmax}], {sym}, {gran}, {kind}"


def _mse_scale(flat: torch.Tensor, start: torch.Tensor, zero_point: torch.Tensor, qmin: int,
               qmax: int) -> torch.Tensor:
    """Per row of ``flat``, the scale among ``start * (0.1 .. 2.0)`` with the least
    squared quantization error (a grid search, as MSE range setting does for PTQ).

    At 2 to 4 bits the min-max or LSQ rule of thumb is far from the best clipping;
    starting LSQ there saves the many steps the scale would take to get there.
    """
    best, best_err = start, torch.full_like(start, float("inf"))
    for factor in torch.linspace(0.1, 2.0, 39).tolist():
        cand = (start * factor).clamp(min=SCALE_EPS)
        err = (fake_quantize(flat, cand, zero_point, qmin, qmax, axis=0) - flat).square().sum(1)
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return best


class LearnableFakeQuantizer(FakeQuantizer):
    """A :class:`FakeQuantizer` whose scale (and optionally zero point) is learned (LSQ).

    ``scale`` is an ``nn.Parameter`` (so optimizers, DDP gradient averaging and
    ``state_dict`` treat it like a weight); with ``spec.learned_offset`` a float
    parameter ``offset`` holds the zero point, rounded to an integer with a
    straight-through estimator in every forward, and the ``zero_point`` buffer
    carries its rounded value for export. Forward values equal the ONNX
    ``QuantizeLinear -> DequantizeLinear`` of the exported model exactly.

    Initialisation: activation quantizers take their first scale from calibration
    (:func:`quantaware.calibrate`) or, when used straight after ``prepare`` (QAT
    from float), from the first batch, after which their observer switches off
    and the scale is learned. Weight quantizers initialise from the weight the
    first time they are used.

    Example:
        >>> import torch
        >>> from quantaware.config import QuantSpec
        >>> fq = LearnableFakeQuantizer(QuantSpec(bits=4, signed=False, symmetric=False,
        ...                                       learned=True))
        >>> fq.observe_and_quantize()  # what prepare() sets up
        >>> _ = fq(torch.linspace(0, 1.5, 64))   # first batch initialises the scale
        >>> round(float(fq.scale.detach()), 4), bool(fq.observer_enabled)
        (0.1, False)
        >>> fq(torch.tensor([0.33])).sum().backward(); fq.scale.grad is not None
        True
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None,
                 from_tensor: bool = False) -> None:
        if spec.dynamic:
            raise ValueError("a dynamic quantizer computes its scale per call; it cannot learn it")
        super().__init__(spec, channels=channels, from_tensor=from_tensor)
        scale = self._buffers.pop("scale")
        self.scale = nn.Parameter(scale)
        self.offset: nn.Parameter | None = None
        if spec.learned_offset:
            self.offset = nn.Parameter(self.zero_point.to(torch.float32))
        self._exporting = False

    # Export reads ``scale``/``zero_point`` directly: before it does (on the export
    # copy), store the effective scale and the integer zero point of the offset.
    @property
    def exporting(self) -> bool:
        return self._exporting

    @exporting.setter
    def exporting(self, value: bool) -> None:
        if value:
            self._sync_zero_point()
            with torch.no_grad():
                self.scale.copy_(self.effective_scale())
        self._exporting = value

    def effective_scale(self) -> torch.Tensor:
        """The scale used: ``|scale|`` floored at float32 eps.

        An optimizer step can push a small learned scale through zero; the
        projection (idempotent, so export stores the value used) keeps it valid.
        """
        return torch.clamp(torch.abs(self.scale), min=SCALE_EPS)

    def deployed_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        zero_point = self.zero_point.detach()
        if self.offset is not None:
            zero_point = torch.clamp(torch.round(self.offset.detach()), self.qmin,
                                     self.qmax).to(torch.int32)
        return self.effective_scale().detach(), zero_point

    def _sync_zero_point(self) -> None:
        if self.offset is not None:
            with torch.no_grad():
                zp = torch.clamp(torch.round(self.offset), self.qmin, self.qmax)
                self.zero_point.copy_(zp.to(torch.int32))

    def load_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set the starting qparams (checked to be finite and positive)."""
        with torch.no_grad():
            super().load_qparams(scale, zero_point)
            if self.offset is not None:
                self.offset.copy_(self.zero_point.to(torch.float32))

    def _init_from_weight(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            w = w.detach().to(torch.float32)
            flat = w.reshape(1, -1) if self.axis is None else (
                w.transpose(0, self.axis % w.dim()).reshape(w.shape[self.axis], -1))
            lo, hi = flat.amin(1), flat.amax(1)
            scale, zp = choose_qparams(lo, hi, self.qmin, self.qmax, self.spec.symmetric)
            lsq = 2.0 * flat.abs().mean(dim=1) / max(self.qmax, 1) ** 0.5
            scale = torch.minimum(scale, lsq.clamp(min=SCALE_EPS))
            if self.spec.symmetric:
                scale = _mse_scale(flat, scale, zp, self.qmin, self.qmax)
            if self.axis is None:
                scale, zp = scale[0], zp[0]
            self.load_qparams(scale, zp)

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned ``(scale, zero_point)``; weights initialise from ``x`` on first use."""
        if not bool(self.calibrated):
            if self.from_tensor and x is not None:
                self._init_from_weight(x)
            else:
                raise CalibrationError(
                    "learned quantizer used before its scale was initialised: run "
                    "quantaware.calibrate(model, data), or train with observers on (the "
                    "default after prepare) so the first batch initialises it"
                )
        scale = self.effective_scale()
        if self.offset is None:
            return scale, self.zero_point
        rounded = torch.clamp(torch.round(self.offset), self.qmin, self.qmax)
        return scale, self.offset + (rounded - self.offset).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:
            return self._export_forward(x)
        if self.observer is not None and bool(self.observer_enabled):
            self.observer(x)
            if bool(self.fake_quant_enabled):
                # QAT from float: the first batch sets the starting scale, then it is learned.
                self.freeze()
        if not bool(self.fake_quant_enabled):
            return x
        scale, zero_point = self.qparams(x)
        if self.offset is not None and self.training:
            self._sync_zero_point()
        return self.fake_quantize_with(x, scale, zero_point)

    def fake_quantize_with(self, x: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor) -> torch.Tensor:
        if self.axis is not None:
            per_scale = x.numel() // max(x.shape[self.axis], 1)
        elif self.from_tensor or x.dim() == 0:
            per_scale = x.numel()
        else:  # activations: features per sample (LSQ section 2.2)
            per_scale = x.numel() // max(x.shape[0], 1)
        return fake_quantize_lsq(x, scale, zero_point, self.qmin, self.qmax, self.axis,
                                 lsq_grad_scale(per_scale, self.qmax))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", learned scale and offset" if self.offset is not None
                                       else ", learned scale")


class Float16Quantizer(nn.Module):
    """Round to float16 and back (straight-through gradient).

    Example:
        >>> Float16Quantizer()(torch.tensor([1.0 + 2**-12])).item()
        1.0
    """

    exporting = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rounded = x.detach().to(torch.float16).to(x.dtype)
        return x + (rounded - x).detach() if x.requires_grad else rounded


def make_quantizer(spec: QuantSpec | FloatSpec, channels: int | None = None,
                   from_tensor: bool = False) -> nn.Module:
    """The quantizer module for a spec (weights use ``from_tensor=True``)."""
    if isinstance(spec, FloatSpec):
        return Float16Quantizer()
    if spec.learned:
        return LearnableFakeQuantizer(spec, channels=channels, from_tensor=from_tensor)
    return FakeQuantizer(spec, channels=channels, from_tensor=from_tensor)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode and the observer of every calibrated
    quantizer off, then give back each module's mode and each observer's switch:
    forward passes in the block (checks, evaluation) leave the model's ranges as
    they were, also for a QAT model whose observers still follow the data. A
    quantizer without a range yet keeps observing, as outside the block (it has no
    range to protect, and needs one to quantize).

    Example:
        >>> from quantaware import presets, prepare
        >>> from quantaware import calibrate
        >>> net = prepare(nn.Linear(4, 2), presets.INT8, (torch.randn(1, 4),))
        >>> net = calibrate(net, [torch.randn(8, 4)]).train()
        >>> scale = net.get_submodule("0").output_quantizer.scale.clone()
        >>> with frozen(net):
        ...     _ = net(100 * torch.randn(8, 4))
        >>> net.training, bool((net.get_submodule("0").output_quantizer.scale == scale).all())
        (True, True)
    """
    modes = [(m, m.training) for m in model.modules()]
    switches = [(q, q.observer_enabled.clone()) for q in model.modules()
                if isinstance(q, FakeQuantizer) and bool(q.calibrated)]
    model.eval()
    for q, _ in switches:
        q.observer_enabled.fill_(0)
    try:
        yield model
    finally:
        for q, switch in switches:
            q.observer_enabled.copy_(switch)
        for module, training in modes:
            module.training = training
