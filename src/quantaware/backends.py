"""Inference backends for exported files: ONNX Runtime, OpenVINO, LiteRT.

:func:`create_backend_session` returns an object with the slice of ONNX
Runtime's ``InferenceSession`` interface that quantaware uses (``run``,
``get_inputs``, ``get_outputs``), so verification and benchmarks run either
backend without branching.

- ``"onnxruntime"``: :func:`quantaware.bench.create_session` (CPU, fixed thread
  budget, no spinning, without the graph rewrites that change quantized results).
- ``"openvino"`` (``pip install 'quantaware[openvino]'``): the OpenVINO CPU
  plugin. It runs the QDQ pairs of a quantized export as int8 kernels
  (convolutions and fully connected layers report runtime precision u8). On CPUs
  with bf16 support it runs float layers in bf16 unless told otherwise, so every
  model is compiled with ``INFERENCE_PRECISION_HINT: f32``: float layers stay
  float32 and a float export computes what torch computes within float32
  rounding. Models are compiled with static shapes, once per distinct set of
  input shapes (a dynamic batch dimension costs OpenVINO's CPU plugin about 60%
  at batch 1 on an int8 MobileNetV2: 11.3 vs 6.9 ms).
- ``"litert"`` (``pip install 'quantaware[litert]'``): LiteRT's interpreter on a
  ``.tflite`` file written by :func:`quantaware.export_tflite` (full-integer
  kernels, XNNPACK on CPU).

Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> import onnx
    >>> from onnx import TensorProto, helper
    >>> graph = helper.make_graph(
    ...     [helper.make_node("Relu", ["x"], ["y"])], "relu",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    >>> model = helper.make_model(
    ...     graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    >>> path = os.path.join(tempfile.mkdtemp(), "relu.onnx")
    >>> onnx.save(model, path)
    >>> session = create_backend_session(path, "onnxruntime", threads=1)
    >>> session.run(None, {"x": np.array([[-1.0, 2.0, 0.5]], np.float32)})[0].tolist()
    [[0.0, 2.0, 0.5]]
    >>> [(i.name, i.type) for i in session.get_inputs()]
    [('x', 'tensor(float)')]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantaware._native import native_stderr_filtered

__all__ = [
    "BACKENDS",
    "ONNX_BACKENDS",
    "RUNTIME_NAMES",
    "BackendSession",
    "LiteRTSession",
    "OpenVINOSession",
    "TensorInfo",
    "check_backend",
    "create_backend_session",
    "openvino_config",
]

BACKENDS = ("onnxruntime", "openvino", "litert")

# How each backend is named in messages and tables.
RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "litert": "LiteRT"}

# Backends that run ONNX files; "litert" runs .tflite files (quantaware.export_tflite).
ONNX_BACKENDS = ("onnxruntime", "openvino")

# Compiled static-shape models kept per session (distinct input shapes seen).
_MAX_COMPILED_SHAPES = 4


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output, as ONNX Runtime's ``NodeArg`` describes it.

    Attributes:
        name: the ONNX tensor name.
        shape: one entry per dimension: an int, or ``None`` where it is dynamic.
        type: ONNX Runtime's type string, e.g. ``"tensor(float)"``.
    """

    name: str
    shape: list[int | None]
    type: str


class BackendSession(Protocol):
    """What quantaware needs from an inference session on either backend."""

    def run(self, output_names: Sequence[str] | None,
            feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def get_inputs(self) -> list[Any]: ...

    def get_outputs(self) -> list[Any]: ...


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS` and can be used.

    Raises:
        ValueError: an unknown name (the message lists :data:`BACKENDS`).
        ImportError: ``"openvino"``/``"litert"`` without OpenVINO/LiteRT installed.

    Example:
        >>> check_backend("onnxruntime")
        'onnxruntime'
        >>> check_backend("tensorrt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown inference backend 'tensorrt'; choose one of: onnxruntime, ...
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; choose one of: "
                         f"{', '.join(BACKENDS)}")
    if backend == "openvino":
        _import_openvino()
    if backend == "litert":
        _import_litert()
    return backend


#: The most inference threads a session takes (more would only stall the machine).
MAX_THREADS = 512


def _check_threads(threads: int) -> int:
    if (isinstance(threads, bool) or not isinstance(threads, int)
            or not 1 <= threads <= MAX_THREADS):
        raise ValueError(f"threads must be an integer from 1 to {MAX_THREADS}, got "
                         f"{threads!r}")
    return threads


def openvino_config(threads: int = 2) -> dict[str, Any]:
    """The OpenVINO CPU compile options quantaware deploys and measures with.

    ``INFERENCE_PRECISION_HINT: f32`` keeps float layers in float32 (the CPU
    plugin otherwise picks bf16 where the CPU supports it),
    ``DYNAMIC_QUANTIZATION_GROUP_SIZE: 0`` keeps the float inputs of layers with
    int8 weights and float activations (weight-only W8/W4, a Linear kept on float
    inputs) in float32 (the plugin otherwise quantizes them to int8 at run time:
    0.05 off torch on a W8 MLP), ``threads`` inference threads, and the latency
    hint (one request at a time).

    Example:
        >>> openvino_config(1)["INFERENCE_PRECISION_HINT"]
        'f32'
    """
    return {"INFERENCE_PRECISION_HINT": "f32",
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
            "INFERENCE_NUM_THREADS": _check_threads(threads),
            "PERFORMANCE_HINT": "LATENCY"}


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(
            "the 'openvino' backend needs OpenVINO, which is not installed: "
            "pip install 'quantaware[openvino]'"
        ) from exc
    return openvino


def element_type_name(dtype: Any) -> str:
    """ONNX Runtime's name for a numpy element type (``float32`` -> ``float``).

    Example:
        >>> element_type_name(np.float64), element_type_name(np.int64)
        ('double', 'int64')
    """
    name = np.dtype(dtype).name
    return {"float32": "float", "float64": "double"}.get(name, name)


def _ort_type(element_type: Any) -> str:
    """ONNX Runtime's type string for an OpenVINO element type (``f32`` -> ``tensor(float)``)."""
    return f"tensor({element_type_name(element_type.to_dtype())})"


def _onnx_names(model: str | bytes) -> tuple[list[str], list[str]]:
    """The graph input (minus initializers) and output names of an ONNX model."""
    import onnx

    proto = (onnx.load_from_string(model) if isinstance(model, bytes)
             else onnx.load(model, load_external_data=False))
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    return ([i.name for i in graph.input if i.name not in initializers],
            [o.name for o in graph.output])


def _port_name(port: Any, onnx_names: list[str]) -> str:
    """The ONNX name of an OpenVINO port (which may carry several names once
    OpenVINO folds ``Identity`` nodes)."""
    names = port.get_names()
    return next((n for n in onnx_names if n in names), port.get_any_name())


def _describe(port: Any, onnx_names: list[str]) -> TensorInfo:
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    return TensorInfo(_port_name(port, onnx_names), shape, _ort_type(port.get_element_type()))


class OpenVINOSession:
    """An ONNX model compiled for OpenVINO's CPU plugin, run like an ORT session.

    The model is compiled with :func:`openvino_config` for the concrete shapes
    of each ``run``'s inputs (a few shape sets are kept compiled), so a model
    exported with a dynamic batch dimension runs any batch at static-shape speed.

    Args:
        model: path to an ``.onnx`` file (external data next to it is found) or
            the serialized model.
        threads: inference threads.

    Example:
        >>> import numpy as np, onnx
        >>> from onnx import TensorProto, helper
        >>> graph = helper.make_graph(
        ...     [helper.make_node("Relu", ["x"], ["y"])], "relu",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
        >>> model = helper.make_model(
        ...     graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
        >>> session = OpenVINOSession(model.SerializeToString(), threads=1)
        >>> session.run(None, {"x": np.array([[-1.0, 2.0, 0.5]], np.float32)})[0].tolist()
        [[0.0, 2.0, 0.5]]
        >>> session.get_outputs()[0]
        TensorInfo(name='y', shape=[None, 3], type='tensor(float)')
    """

    def __init__(self, model: str | os.PathLike[str] | bytes, threads: int = 2) -> None:
        from quantaware.bench import OnnxModelError

        self._config = openvino_config(threads)
        ov = _import_openvino()
        source = model if isinstance(model, bytes) else str(model)
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise FileNotFoundError(f"ONNX model {source!r} does not exist (or is not a file)")
        what = "the serialized model" if isinstance(source, bytes) else repr(source)
        self._core = ov.Core()
        try:
            input_names, output_names = _onnx_names(source)
            if isinstance(source, bytes):
                # The bytes hold every weight (no external data): an empty weights tensor.
                self._model = self._core.read_model(
                    model=source, weights=ov.Tensor(np.empty(0, dtype=np.uint8)))
            else:
                self._model = self._core.read_model(source)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise OnnxModelError(
                f"OpenVINO {ov.__version__} cannot read {what}: {exc}. Check that it is a "
                "complete ONNX model whose operators OpenVINO's ONNX frontend supports."
            ) from exc
        self._inputs = [_describe(p, input_names) for p in self._model.inputs]
        self._outputs = [_describe(p, output_names) for p in self._model.outputs]
        self._output_index: dict[str, int] = {}
        for i, port in enumerate(self._model.outputs):
            for name in (self._outputs[i].name, *sorted(port.get_names())):
                self._output_index.setdefault(name, i)
        self._compiled: dict[tuple[tuple[int, ...], ...], Any] = {}

    def get_inputs(self) -> list[TensorInfo]:
        """The model inputs (``name``, ``shape``, ``type``), in graph order."""
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        """The model outputs (``name``, ``shape``, ``type``), in graph order."""
        return list(self._outputs)

    def _request(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        request = self._compiled.get(shapes)
        if request is not None:
            return request
        ov = _import_openvino()
        for info, port, shape in zip(self._inputs, self._model.inputs, shapes, strict=True):
            if not port.get_partial_shape().compatible(ov.PartialShape(list(shape))):
                raise ValueError(f"input {info.name!r} has shape {list(shape)}; the model "
                                 f"expects {port.get_partial_shape()}")
        model = self._model.clone()
        model.reshape({port: ov.PartialShape(list(shape))
                       for port, shape in zip(model.inputs, shapes, strict=True)})
        request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        if len(self._compiled) >= _MAX_COMPILED_SHAPES:
            self._compiled.pop(next(iter(self._compiled)))
        self._compiled[shapes] = request
        return request

    def run(self, output_names: Sequence[str] | None,
            feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs ``output_names`` (all when ``None``) for the inputs in ``feed``.

        ``feed`` maps every input name to an array of the input's dtype.
        """
        names = [i.name for i in self._inputs]
        if set(feed) != set(names):
            raise ValueError(f"feed has inputs {sorted(feed)}; the model's inputs are {names}")
        wanted = [o.name for o in self._outputs] if output_names is None else list(output_names)
        missing = [n for n in wanted if n not in self._output_index]
        if missing:
            raise ValueError(f"unknown outputs {missing}; the model's outputs are "
                             f"{[o.name for o in self._outputs]}")
        arrays = [np.ascontiguousarray(feed[name]) for name in names]
        request = self._request(tuple(a.shape for a in arrays))
        results = request.infer(dict(enumerate(arrays)), share_outputs=False)
        return [np.asarray(results[self._output_index[n]]) for n in wanted]


def _import_litert() -> Any:
    try:
        from ai_edge_litert import interpreter
    except ImportError as exc:
        raise ImportError(
            f"the litert backend needs ai-edge-litert: pip install 'quantaware[litert]' ({exc})"
        ) from exc
    return interpreter


_LITERT_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.int8): "tensor(int8)",
                 np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.int32): "tensor(int32)",
                 np.dtype(np.int64): "tensor(int64)"}


class LiteRTSession:
    """A ``.tflite`` file in LiteRT's interpreter (XNNPACK on CPU), run like an ORT session.

    LiteRT files have static shapes. A batch larger than the file's batch
    dimension runs as consecutive invocations of the file's batch (a file
    exported at batch 1 then takes a batch of 16 one sample at a time), and the
    outputs are concatenated. Float inputs fed to an int8 input are quantized
    with the input's scale and zero point as LiteRT's own QUANTIZE does
    (multiplying by the float32 reciprocal of the scale, rounding half to even),
    so an ``int8_io`` file computes what the float-interface file does; int8 outputs
    are returned dequantized, so every interface reads float32 like the torch
    model.

    Args:
        model: path to a ``.tflite`` file, or its bytes.
        threads: inference threads.

    Example:
        >>> import os, tempfile, torch
        >>> from quantaware import export_tflite, presets, quantize
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> x = torch.randn(16, 4)
        >>> path = export_tflite(quantize(net, presets.INT8, [x], x[:1]),
        ...                      os.path.join(tempfile.mkdtemp(), "m.tflite"), x[:1])
        >>> session = LiteRTSession(path, threads=1)
        >>> session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].shape
        (16, 8)
    """

    def __init__(self, model: str | os.PathLike[str] | bytes, threads: int = 2) -> None:
        from quantaware.bench import OnnxModelError

        interpreter = _import_litert()
        if not isinstance(model, bytes):
            if not Path(model).is_file():
                raise FileNotFoundError(f"LiteRT model {str(model)!r} does not exist "
                                        "(or is not a file)")
            model = Path(model).read_bytes()
        if not model:
            raise OnnxModelError("the LiteRT model is empty (0 bytes); export it again with "
                                 "quantaware export --format tflite")
        try:
            with native_stderr_filtered():  # "INFO: Created ... XNNPACK delegate"
                self._interpreter = interpreter.Interpreter(
                    model_content=model, num_threads=_check_threads(threads))
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise OnnxModelError(
                f"LiteRT cannot load this model: {exc}. Check that it is a complete .tflite "
                "file (quantaware export --format tflite writes one) and that LiteRT's CPU "
                "kernels run every op in it") from exc
        self._in = [_LiteRTTensor.of(d) for d in self._interpreter.get_input_details()]
        self._out = [_LiteRTTensor.of(d) for d in self._interpreter.get_output_details()]
        self._input_names = frozenset(t.name for t in self._in)
        self._out_by_name = {t.name: t for t in self._out}

    def get_inputs(self) -> list[TensorInfo]:
        """The model inputs (``name``, static ``shape``, ``type``)."""
        return [t.info for t in self._in]

    def get_outputs(self) -> list[TensorInfo]:
        """The model outputs (``name``, static ``shape``, ``type``)."""
        return [t.info for t in self._out]

    def stored_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feed`` in the file's input dtypes: float fed to an int8 input quantized as
        LiteRT's QUANTIZE does. :meth:`run` does this itself; converting once up
        front keeps it out of repeated (timed) runs.

        Example:
            >>> import os, tempfile, torch
            >>> from quantaware import export_tflite, presets, quantize
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
            >>> x = torch.randn(16, 4)
            >>> path = export_tflite(quantize(net, presets.INT8, [x], x[:1]),
            ...                      os.path.join(tempfile.mkdtemp(), "m.tflite"), x[:1],
            ...                      int8_io=True)
            >>> session = LiteRTSession(path, threads=1)
            >>> name = session.get_inputs()[0].name
            >>> session.stored_feed({name: x[:1].numpy()})[name].dtype
            dtype('int8')
        """
        return {t.name: t.to_input(np.asarray(feed[t.name])) for t in self._in if t.name in feed}

    def _chunks(self, arrays: list[np.ndarray]) -> int:
        """How many invocations of the file's batch ``arrays`` take (shapes checked)."""
        chunks = None
        for tensor, array in zip(self._in, arrays, strict=True):
            shape = tensor.info.shape
            if array.shape[1:] != tuple(shape[1:]):
                raise ValueError(
                    f"input {tensor.name!r} has samples of shape {list(array.shape[1:])}; "
                    f"this LiteRT file takes {list(shape[1:])} (static shapes: export it "
                    "with example inputs of the shape you run, or resize the data)")
            if array.shape[0] % tensor.step:
                raise ValueError(
                    f"input {tensor.name!r} has a batch of {array.shape[0]}; this LiteRT "
                    f"file runs batches of {tensor.step}, so it takes a multiple of that")
            count = array.shape[0] // tensor.step
            if chunks not in (None, count):
                raise ValueError("inputs have different batch sizes")
            chunks = count
        return chunks or 0

    def run(self, output_names: Sequence[str] | None,
            feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs ``output_names`` (all when ``None``) for the inputs in ``feed``."""
        if feed.keys() != self._input_names:
            raise ValueError(f"feed has inputs {sorted(feed)}; the model's inputs are "
                             f"{[t.name for t in self._in]}")
        if output_names is None:
            wanted = self._out
        else:
            missing = [n for n in output_names if n not in self._out_by_name]
            if missing:
                raise ValueError(f"unknown outputs {missing}; the model's outputs are "
                                 f"{[t.name for t in self._out]}")
            wanted = [self._out_by_name[n] for n in output_names]
        arrays = [np.asarray(feed[t.name]) for t in self._in]
        chunks = self._chunks(arrays)
        interp = self._interpreter
        if chunks == 1:  # the common case: no slicing, no concatenation
            for tensor, array in zip(self._in, arrays, strict=True):
                interp.set_tensor(tensor.index, tensor.to_input(array))
            interp.invoke()
            return [t.from_output(interp.get_tensor(t.index)) for t in wanted]
        results: list[list[np.ndarray]] = [[] for _ in wanted]
        for c in range(chunks):
            for tensor, array in zip(self._in, arrays, strict=True):
                step = tensor.step
                interp.set_tensor(tensor.index, tensor.to_input(array[c * step:(c + 1) * step]))
            interp.invoke()
            for k, t in enumerate(wanted):
                results[k].append(t.from_output(interp.get_tensor(t.index)))
        return [np.concatenate(r) for r in results]


@dataclass(frozen=True)
class _LiteRTTensor:
    """What :class:`LiteRTSession` needs of one input or output, read once at load."""

    info: TensorInfo
    index: int
    dtype: np.dtype
    step: int  # the file's batch dimension (at least 1)
    scale: float
    zero_point: int

    @classmethod
    def of(cls, detail: dict[str, Any]) -> _LiteRTTensor:
        dtype = np.dtype(detail["dtype"])
        shape = [int(d) for d in detail["shape"]]
        scale, zero_point = detail["quantization"]
        return cls(TensorInfo(detail["name"], shape, _LITERT_TYPES.get(dtype, str(dtype))),
                   int(detail["index"]), dtype, max(shape[0], 1) if shape else 1,
                   float(scale), int(zero_point))

    @property
    def name(self) -> str:
        return self.info.name

    def to_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` as this input's dtype; float fed to int8 is quantized as LiteRT's QUANTIZE."""
        dtype = self.dtype
        if dtype.kind == "i" and dtype.itemsize == 1 and x.dtype.kind == "f":
            info = np.iinfo(dtype)
            inverse = np.float32(1) / np.float32(self.scale)  # as LiteRT's QUANTIZE computes
            q = np.rint(np.asarray(x, np.float32) * inverse)
            q += np.float32(self.zero_point)
            return np.clip(q, info.min, info.max, out=q).astype(dtype)
        return x if x.dtype == dtype else x.astype(dtype)

    def from_output(self, y: np.ndarray) -> np.ndarray:
        """An int8 output dequantized to float32; anything else as it is."""
        if y.dtype.kind in "iu" and self.scale:
            return (y.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        return y


def create_backend_session(model: str | os.PathLike[str] | bytes, backend: str = "onnxruntime",
                           threads: int = 2) -> BackendSession:
    """A CPU inference session on ``model`` (a path or serialized bytes) in ``backend``.

    ``"onnxruntime"`` returns :func:`quantaware.bench.onnx_session` for a path and
    :func:`quantaware.bench.create_session` for bytes; ``"openvino"`` an
    :class:`OpenVINOSession` (float layers in float32); ``"litert"`` a
    :class:`LiteRTSession` on a ``.tflite`` file (:func:`quantaware.export_tflite`).

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`, or bad ``threads``.
        ImportError: ``"openvino"`` without OpenVINO installed.

    Example:
        >>> create_backend_session("model.onnx", "tflite")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown inference backend 'tflite'; choose one of: onnxruntime, ...
    """
    check_backend(backend)
    _check_threads(threads)
    if backend == "litert":
        return LiteRTSession(model, threads)
    if backend == "openvino":
        return OpenVINOSession(model, threads)
    from quantaware.bench import create_session, onnx_session

    if isinstance(model, bytes):
        return create_session(model, threads)
    return onnx_session(model, threads)
