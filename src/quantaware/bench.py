"""ONNX Runtime helpers: sessions, latency, batched prediction, accuracy and size.

Sessions run on the CPU execution provider with a fixed thread budget and with
thread spinning disabled: spinning worker threads of one session steal cores from
another, so comparing several models in one process would otherwise be distorted.

Models are expected to have a single float input. A model exported with a fixed
batch dimension still works with any loader: batches are split into chunks of
that size and the last chunk is zero-padded (padded rows are dropped again).

Example:
    >>> import numpy as np
    >>> import onnx
    >>> from onnx import TensorProto, helper
    >>> from quantaware.bench import file_size, onnx_latency_ms, onnx_predict
    >>> graph = helper.make_graph(
    ...     [helper.make_node("Relu", ["x"], ["y"])], "relu",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "relu.onnx")
    >>> model = helper.make_model(
    ...     graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    >>> onnx.save(model, path)
    >>> onnx_latency_ms(path, np.zeros((1, 3), np.float32), runs=5) > 0
    True
    >>> logits, labels = onnx_predict(path, [(np.array([[-1.0, 2.0, 0.5]]), np.array([1]))])
    >>> logits.tolist(), labels.tolist()
    ([[0.0, 2.0, 0.5]], [1])
    >>> file_size(path) > 0
    True
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from quantaware._batch import LABEL_KEYS, check_class_labels, unpack_batch

__all__ = [
    "OnnxModelError",
    "Session",
    "create_session",
    "denormals_flushed",
    "file_size",
    "onnx_accuracy",
    "onnx_latency_ms",
    "onnx_predict",
    "onnx_session",
    "session_options",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

ORT_FLOAT_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


class OnnxModelError(ValueError):
    """An ONNX file cannot be loaded or does not have the expected interface."""


def _existing_file(path: PathLike) -> Path:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"ONNX model {str(file)!r} does not exist (or is not a file); export the model "
            "first or fix the path"
        )
    return file


def session_options(threads: int = 2) -> ort.SessionOptions:
    """The ONNX Runtime settings quantaware deploys and measures with.

    ``threads`` intra-op threads, sequential execution, no thread spinning (a
    spinning pool steals cores from other sessions in the process), and
    denormal floats flushed to zero in ONNX Runtime's threads: a softmax over a
    padded attention mask underflows ``exp`` into denormals, which made ONNX
    Runtime's float Softmax 9x slower (0.38 vs 3.4 ms on 16x12x64x64 with masked
    keys; MiniLM at batch 16 spent a fifth of its time there). Values below
    1.2e-38 become 0, which no quantized model can resolve anyway. ONNX Runtime
    also switches the creating thread to flushing; :func:`create_session` undoes
    that, so torch and numpy in the caller's thread keep IEEE denormals.

    A Linear kept on float inputs with int8 weights (``DequantizeLinear`` ->
    ``MatMul``) becomes ONNX Runtime's ``MatMulNBits``, which by default
    (``session.qdq_matmulnbits_accuracy_level`` 4) quantizes its float input to
    int8 per block: the very input the model keeps in float because quantizing it
    costs accuracy (all-MiniLM-L6-v2: nearest-neighbour agreement 94.4% instead of
    95.6%, at the same speed). These options compute it in float32 (level 1).

    Example:
        >>> session_options(1).intra_op_num_threads
        1
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    options.log_severity_level = 3  # errors only; they surface as exceptions anyway
    return options


def _flushing_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (FTZ/DAZ)."""
    return bool(np.float32(1e-40) * np.float32(1.0) == 0.0)


def _set_flush_denormals(enabled: bool) -> None:
    import torch

    torch.set_flush_denormal(enabled)


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush denormals on this thread inside the block, restore the previous mode after.

    Example:
        >>> with denormals_flushed():
        ...     pass
    """
    before = _flushing_denormals()
    _set_flush_denormals(True)
    try:
        yield
    finally:
        _set_flush_denormals(before)


class Session:
    """An ONNX Runtime ``InferenceSession`` whose ``run`` flushes denormals on the
    calling thread only while it runs (the session's own threads always do);
    every other attribute is the wrapped session's."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with denormals_flushed():
            return self.session.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


# ONNX Runtime graph rewrites that change what an exported model computes.
# ``WeightBiasQuantization`` quantizes the float weights of a Conv/Gemm whose input
# is dequantized and whose output is quantized (a layer kept with float weights in
# a mixed-precision model) to per-tensor int8 with its own scale: coarser than the
# per-channel int8 the layer was kept away from (MobileNetV2 depthwise conv: 9-LSB
# output error instead of 1).
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def create_session(model: str | bytes, threads: int = 2) -> Session:
    """A CPU :class:`Session` on ``model`` (a path or serialized bytes) with
    :func:`session_options`, without the rewrites in :data:`DISABLED_OPTIMIZERS`,
    leaving the calling thread's float mode as it was."""
    options = session_options(threads)
    before = _flushing_denormals()
    try:
        return Session(ort.InferenceSession(model, sess_options=options,
                                            providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(DISABLED_OPTIMIZERS)))
    finally:
        _set_flush_denormals(before)


def onnx_session(path: PathLike, threads: int = 2) -> Session:
    """Create a CPU ``InferenceSession`` with :func:`session_options`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OnnxModelError: the file is not a loadable ONNX model.

    Example:
        >>> onnx_session("missing.onnx")
        Traceback (most recent call last):
        ...
        FileNotFoundError: ONNX model 'missing.onnx' does not exist ...
    """
    file = _existing_file(path)
    session_options(threads)  # validates threads before the file is read
    if file.suffix.lower() in (".tflite", ".xml", ".pt", ".pth", ".safetensors"):
        raise OnnxModelError(
            f"{str(file)!r} is not an ONNX model: this runs .onnx files in ONNX Runtime. "
            "Export the model to ONNX with `quantaware export` (`quantaware verify "
            "--backend litert|openvino` checks a model on those backends).")
    try:
        return create_session(str(file), threads)
    except Exception as exc:  # onnxruntime raises its own Exception subclasses
        raise OnnxModelError(
            f"ONNX Runtime {ort.__version__} cannot load {str(file)!r}: {exc}. Check that "
            "the file is a complete ONNX model (not corrupt or truncated), that its external "
            ".data file (if any) sits next to it, and that its IR/opset versions are "
            "supported by this onnxruntime; re-export the model if needed."
        ) from exc


def _single_float_input(session: ort.InferenceSession) -> tuple[str, Any, type]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise OnnxModelError(
            f"expected an ONNX model with exactly one input, found {len(inputs)}: {names}; "
            "benchmark helpers support single-input models only"
        )
    (arg,) = inputs
    if arg.type not in ORT_FLOAT_TYPES:
        raise OnnxModelError(
            f"model input {arg.name!r} has type {arg.type}; expected a float tensor "
            f"({', '.join(ORT_FLOAT_TYPES)})"
        )
    fixed_batch = arg.shape[0] if arg.shape and isinstance(arg.shape[0], int) else None
    return arg.name, fixed_batch, ORT_FLOAT_TYPES[arg.type]


def _as_array(value: Any, dtype: type | None = None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value, dtype=dtype)


def onnx_latency_ms(
    path: PathLike,
    example_input: np.ndarray,
    threads: int = 2,
    warmup: int = 10,
    runs: int = 50,
) -> float:
    """Median wall-clock latency of one ``session.run`` on ``example_input``, in ms.

    ``example_input`` is cast to the model's input dtype; it must match the input
    shape the model accepts.

    Example:
        >>> import numpy as np
        >>> onnx_latency_ms("missing.onnx", np.zeros((1, 3), np.float32))
        Traceback (most recent call last):
        ...
        FileNotFoundError: ONNX model 'missing.onnx' does not exist ...
    """
    if warmup < 0 or runs < 1:
        raise ValueError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")
    session = onnx_session(path, threads=threads)
    name, _, dtype = _single_float_input(session)
    feed = {name: _as_array(example_input, dtype)}
    for _ in range(warmup):
        session.run(None, feed)
    timings = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter_ns()
        session.run(None, feed)
        timings[i] = time.perf_counter_ns() - start
    latency = float(np.median(timings)) / 1e6
    logger.debug("%s: median latency %.4f ms over %d runs", path, latency, runs)
    return latency


def _run_batch(
    session: ort.InferenceSession, name: str, x: np.ndarray, fixed_batch: int | None
) -> np.ndarray:
    if fixed_batch is None or x.shape[0] == fixed_batch:
        return session.run(None, {name: x})[0]
    outputs = []
    for start in range(0, x.shape[0], fixed_batch):
        chunk = x[start : start + fixed_batch]
        rows = chunk.shape[0]
        if rows < fixed_batch:
            pad = np.zeros((fixed_batch - rows, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        outputs.append(session.run(None, {name: chunk})[0][:rows])
    return np.concatenate(outputs)


def onnx_predict(
    path: PathLike, loader: Iterable[Any], threads: int = 2
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the single-input ONNX model over ``loader`` batch by batch.

    Batches follow the convention of :func:`quantaware.train.unpack_batch`; a dict
    batch must hold exactly one input entry besides the label.

    Returns:
        ``(logits, labels)``: the first model output of every batch, concatenated,
        and the labels as an array (None when the batches carry no labels).
    """
    session = onnx_session(path, threads=threads)
    name, fixed_batch, dtype = _single_float_input(session)
    outputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for batch in loader:
        inputs, labels = unpack_batch(batch)
        if isinstance(inputs, dict):
            if len(inputs) != 1:
                raise OnnxModelError(
                    f"the ONNX model has one input but the dict batch has {len(inputs)} "
                    f"input entries {sorted(inputs)}; keep one input plus one of "
                    f"{list(LABEL_KEYS)}"
                )
            (inputs,) = inputs.values()
        outputs.append(_run_batch(session, name, _as_array(inputs, dtype), fixed_batch))
        if labels is not None:
            targets.append(_as_array(labels).reshape(-1))
    if not outputs:
        raise ValueError("loader yielded no batches; check the dataset is not empty")
    if targets and len(targets) != len(outputs):
        raise ValueError("some batches carry labels and some do not; make them consistent")
    return np.concatenate(outputs), (np.concatenate(targets) if targets else None)


def onnx_accuracy(path: PathLike, loader: Iterable[Any], threads: int = 2) -> float:
    """Top-1 accuracy of the ONNX model on the labelled ``loader``, in percent."""
    logits, labels = onnx_predict(path, loader, threads=threads)
    if labels is None:
        raise ValueError(
            "onnx_accuracy needs labelled batches, but the loader yielded inputs only; "
            f"yield (x, y) tuples or dicts with one of {list(LABEL_KEYS)}"
        )
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise OnnxModelError(
            f"expected (N, num_classes) logits matching {labels.shape[0]} labels, got "
            f"shape {logits.shape}; the model's first output must be the logits"
        )
    check_class_labels(labels, logits.shape[1])
    return 100.0 * float(np.mean(logits.argmax(axis=1) == labels))


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers and node attributes, recursively."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for subgraph in attr.graphs:
                yield from _graph_tensors(subgraph)


def file_size(path: PathLike, include_external_data: bool = True) -> int:
    """Bytes on disk of ``path``; for ``.onnx`` files, plus their external data files.

    ``torch.onnx.export`` may store weights in a side file (``model.onnx.data``);
    counting it keeps float vs. quantized size comparisons honest.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "weights.bin")
        >>> with open(path, "wb") as f:
        ...     _ = f.write(b"0123")
        >>> file_size(path)
        4
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"cannot size {str(file)!r}: no such file; check the path")
    size = file.stat().st_size
    if not include_external_data or file.suffix.lower() != ".onnx":
        return size
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise OnnxModelError(
            f"cannot parse {str(file)!r} as ONNX to find its external data: {exc}; re-export "
            "it, or pass include_external_data=False to get the raw file size"
        ) from exc
    locations = {
        entry.value
        for tensor in _graph_tensors(model.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for location in sorted(locations):
        data_file = file.parent / location
        if not data_file.is_file():
            raise OnnxModelError(
                f"{str(file)!r} stores weights in {location!r}, which is missing next to it; "
                "copy the .data file alongside the model or re-export"
            )
        size += data_file.stat().st_size
    return size
