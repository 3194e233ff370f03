"""The batch convention shared by every API that takes data.

A batch is a tensor (the model input), a tuple/list whose first element is the
model input (so ``(x, y)`` pairs work), or a mapping of keyword inputs
(transformers). A model with several positional inputs takes them as a tuple/list
in that first place: ``((image, metadata), y)``, as a ``DataLoader`` collates a
dataset of ``((image, metadata), y)`` samples. NumPy arrays are accepted wherever
tensors are.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def _as_tensor(x: Any) -> Any:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


#: Dict keys recognised as the label entry of a dict batch.
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def unpack_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """Split a batch into ``(inputs, labels)``; ``labels`` is None when absent.

    ``inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword
    arguments for the model (the label entry, one of :data:`LABEL_KEYS`, is taken
    out of dict batches).

    Example:
        >>> import torch
        >>> x, y = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> unpack_batch((x, y))[1].tolist()
        [0, 1]
        >>> inputs, labels = unpack_batch({"x": x, "label": y})
        >>> sorted(inputs), labels.tolist()
        (['x'], [0, 1])
    """
    if isinstance(batch, torch.Tensor | np.ndarray):
        return _as_tensor(batch), None
    if isinstance(batch, tuple | list) and batch:
        labels = _as_tensor(batch[1]) if len(batch) > 1 else None
        inputs = batch[0]
        if isinstance(inputs, tuple | list):
            if not inputs:
                raise ValueError("a batch's inputs are an empty tuple/list; give the "
                                 "model's positional inputs, ((x1, x2), y)")
            return tuple(_as_tensor(x) for x in inputs), labels
        return _as_tensor(inputs), labels
    if isinstance(batch, Mapping):
        label_keys = [k for k in LABEL_KEYS if k in batch]
        if len(label_keys) > 1:
            raise ValueError(
                f"dict batch has several label entries {label_keys}; keep exactly one of "
                f"{list(LABEL_KEYS)}"
            )
        inputs = {k: _as_tensor(v) for k, v in batch.items() if k not in label_keys}
        if not inputs:
            raise ValueError(
                f"dict batch has no input entries (keys: {sorted(batch)}); add the model's "
                "keyword arguments next to the label"
            )
        return inputs, (_as_tensor(batch[label_keys[0]]) if label_keys else None)
    raise TypeError(
        f"cannot use a batch of type {type(batch).__name__}"
        + (" (empty)" if isinstance(batch, tuple | list) else "")
        + ": give a tensor, a tuple/list whose first element is the model input, or a "
        f"dict of keyword inputs (labels under one of {list(LABEL_KEYS)})"
    )


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` to call the model with for one batch (labels dropped).

    Example:
        >>> import torch
        >>> args, kwargs = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> args[0].shape, kwargs
        (torch.Size([2, 3]), {})
        >>> args, _ = split_batch(((torch.zeros(2, 3), torch.ones(2, 5)), torch.tensor([0, 1])))
        >>> [tuple(a.shape) for a in args]
        [(2, 3), (2, 5)]
    """
    inputs, _ = unpack_batch(batch)
    if isinstance(inputs, dict):
        return (), inputs
    return (inputs if isinstance(inputs, tuple) else (inputs,)), {}


def input_args(inputs: Any, model: torch.nn.Module | None = None) -> tuple[Any, ...]:
    """The positional arguments for ``inputs``: a dict's values in ``model.forward``'s
    parameter order where its keys are that signature's first parameters, else in
    the dict's order.

    Example:
        >>> import torch
        >>> len(input_args((torch.zeros(1, 3), torch.zeros(1, 5)))), len(input_args(torch.zeros(1)))
        (2, 1)
        >>> class Two(torch.nn.Module):
        ...     def forward(self, ids, feats): return feats
        >>> input_args({"feats": 1, "ids": 0}, Two())
        (0, 1)
    """
    if isinstance(inputs, Mapping):
        params = forward_parameters(model) if model is not None else []
        if params and sorted(inputs) == sorted(params[:len(inputs)]):
            return positional(inputs, params)
        return tuple(inputs.values())
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


def map_inputs(inputs: Any, fn: Any) -> Any:
    """``fn`` applied to every tensor of a batch's inputs, keeping their structure
    (a tensor, a tuple of positional inputs or a dict of keyword inputs)."""
    if isinstance(inputs, Mapping):
        return {k: fn(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return tuple(fn(v) for v in inputs)
    return fn(inputs)


def slice_inputs(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a tensor, a tuple of tensors or a dict of tensors.

    Example:
        >>> import torch
        >>> slice_inputs({"ids": torch.arange(6).reshape(3, 2)}, 1, 3)["ids"].tolist()
        [[2, 3], [4, 5]]
    """
    return map_inputs(inputs, lambda v: v[start:stop])


def take_inputs(inputs: Any, index: torch.Tensor) -> Any:
    """Samples ``index`` (a 1-d index tensor) of a tensor, tuple or dict of tensors."""
    return map_inputs(inputs, lambda v: v[index])


def cat_inputs(parts: list[Any]) -> Any:
    """Batches' inputs (tensors, tuples or dicts of tensors) joined along the batch.

    Example:
        >>> import torch
        >>> a, b = (torch.zeros(2, 3), torch.ones(2)), (torch.zeros(1, 3), torch.ones(1))
        >>> [tuple(t.shape) for t in cat_inputs([a, b])]
        [(3, 3), (3,)]
    """
    first = parts[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple | list):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    return torch.cat(parts)


def inputs_size(inputs: Any) -> int:
    """The number of samples in a batch's inputs (the first dimension)."""
    return int(input_args(inputs)[0].shape[0])


def input_shapes(inputs: Any) -> Any:
    """The shapes of a batch's inputs, for messages."""
    return map_inputs(inputs, lambda v: tuple(v.shape))


def to_device(args: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    """Move tensor arguments to ``device``."""
    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def check_finite(args: tuple, kwargs: dict, where: str,
                 error: type[Exception] = ValueError) -> None:
    """Raise ``error`` with a clear message if a floating-point input holds NaN/Inf."""
    for value in (*args, *kwargs.values()):
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and not torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise error(
                f"{where} contains {bad} NaN/Inf value(s) (input shape "
                f"{tuple(value.shape)}); remove or clean those samples"
            )


def dtype_hint(args: tuple, kwargs: dict, model: torch.nn.Module) -> str:
    """For a forward pass that failed: the floating-point inputs of another type than
    ``model``'s floating-point weights and the cast to make ("" if none is); float64
    NumPy data in a float32 model fails inside the first layer with "mat1 and mat2
    must have the same dtype"."""
    weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(weights) != 1:
        return ""
    (dtype,) = weights
    for value in (*args, *kwargs.values()):
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and value.dtype != dtype):
            return (f" (the data is {str(value.dtype).removeprefix('torch.')} and the model's "
                    f"weights {str(dtype).removeprefix('torch.')}: convert the data, "
                    f"x.to({dtype}); NumPy arrays are often float64)")
    return ""


def call_hint(exc: TypeError) -> str:
    """Advice for a ``TypeError`` raised calling a model with a batch's inputs."""
    if "argument" not in str(exc):
        return ""
    return (" (a batch's first element is the model input and the second its label: "
            "give a model with several positional inputs ((x1, x2), y) batches, or "
            "dicts of keyword inputs)")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_class_labels(labels: np.ndarray | torch.Tensor, num_classes: int) -> None:
    """Refuse labels that are not class indices ``0 .. num_classes - 1`` (top-1 accuracy
    would silently count them as wrong).

    Example:
        >>> check_class_labels(np.array([0, 2, 1]), 3)
        >>> check_class_labels(np.array([0.0, 0.5]), 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: accuracy needs class-index labels, but a label is 0.5; ...
    """
    values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        return
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"accuracy needs integer class-index labels, got {values.dtype} "
                         "labels; give labels 0 to num_classes - 1")
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        bad = values[~(np.isfinite(values) & (values == np.round(values)))][0]
        raise ValueError(f"accuracy needs class-index labels, but a label is {bad}; give "
                         "integer labels 0 to num_classes - 1 (not one-hot or soft targets)")
    low, high = values.min(), values.max()
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"the data has label {int(bad)}, but the model gives {num_classes} "
                         f"class scores (labels must be 0 to {num_classes - 1}); fix the "
                         "labels or the model's output size")


def forward_parameters(model: torch.nn.Module) -> list[str]:
    """The names of ``model.forward``'s parameters, in order ([] when unknown)."""
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def positional(kwargs: Mapping[str, Any], parameters: Sequence[str]) -> tuple[Any, ...]:
    """Keyword inputs as positional ones, in the order of ``parameters`` (a model's
    ``forward`` parameters: the order an exported file numbers its inputs in).

    Example:
        >>> positional({"mask": 1, "ids": 0}, ["ids", "mask"])
        (0, 1)
    """
    return tuple(kwargs[name] for name in parameters if name in kwargs)


def backend_feed(batch: Any, input_names: Sequence[str],
                 parameters: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The feed of an exported file for ``batch``: its inputs as NumPy arrays by name.

    Keyword inputs go by name; where the file's inputs carry none of those names
    (LiteRT numbers them), by their position in ``parameters`` (the model's
    ``forward`` parameters, :func:`forward_parameters`), the order they were
    exported in. Positional inputs go in order.

    Example:
        >>> import torch
        >>> batch = {"mask": torch.ones(1, 4), "ids": torch.zeros(1, 4), "label": torch.tensor([1])}
        >>> sorted(backend_feed(batch, ["ids", "mask"]))
        ['ids', 'mask']
        >>> feed = backend_feed(batch, ["args_0", "args_1"], ["ids", "mask"])
        >>> feed["args_1"].tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """
    args, kwargs = split_batch(batch)
    if kwargs and parameters and not set(kwargs) & set(input_names):
        args = positional(kwargs, parameters)
    if args:
        return {name: np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a)
                for name, a in zip(input_names, args, strict=False)}
    return {k: v.detach().cpu().numpy() for k, v in kwargs.items() if k in input_names}
