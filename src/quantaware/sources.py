"""Models and data named on the command line (or in a pipeline file).

Model sources (:func:`load_model`):

- ``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION``: a function returning an
  ``nn.Module``, optionally with ``weights`` (a state dict in a ``.pt``/``.pth``
  file, read with ``torch.load(weights_only=True)`` so a file crafted to run
  code is refused, or a ``.safetensors`` file);
- a local Hugging Face model folder (``config.json`` + ``model.safetensors``) of a
  BERT-family encoder such as all-MiniLM-L6-v2, with its ``tokenizer.json``
  (mean-pooled sentence embeddings, :mod:`quantaware.zoo.minilm`); offline;
- an exported ``.onnx`` file, where only inference is needed.

Data sources (:func:`load_data`):

- ``digits`` / ``mnist1d``: the built-in data sets (``split`` picks train or test);
- a folder of images: one subfolder per class (labelled) or images only
  (unlabelled, for calibration), read by :class:`quantaware.image_folder.ImageFolder`;
- a ``.txt`` file of sentences, one per line, tokenised with the model's tokenizer;
- ``MODULE:FUNCTION`` returning an iterable of batches: tensors, ``(inputs,
  labels)`` pairs or dicts of tensors.

Example:
    >>> model = load_model("quantaware.models:DigitsCNN")
    >>> data = load_data("digits", model, split="test", limit=64)
    >>> data.labeled, data.num_samples, tuple(data.example.shape)
    (True, 64, (1, 1, 8, 8))
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantaware._batch import (
    cat_inputs,
    check_finite,
    input_args,
    inputs_size,
    map_inputs,
    slice_inputs,
)
from quantaware._spec import call_spec

__all__ = ["BUILTIN_DATA", "DataSource", "LabelsError", "LoadedModel", "SourceError", "load_data",
           "load_model", "load_weights", "read_labels"]

BUILTIN_DATA = ("digits", "mnist1d")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
TEXT_SUFFIXES = (".txt",)
DEFAULT_BATCH_SIZE = 32


class SourceError(ValueError):
    """A model or data source that cannot be used; the message names it and the fix."""


class LabelsError(SourceError):
    """A labels file that cannot be read or does not match the model's classes."""


@dataclass
class LoadedModel:
    """A model from :func:`load_model`.

    Attributes:
        name: the spec it came from.
        module: the float ``nn.Module`` (eval mode), or ``None`` for an ONNX file.
        onnx_path: the ``.onnx`` file for ONNX sources.
        tokenizer: ``list[str] -> dict of input tensors`` for text models.
        input_names: names of the forward arguments, in order.
    """

    name: str
    module: nn.Module | None = None
    onnx_path: Path | None = None
    tokenizer: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
    input_names: tuple[str, ...] = ("input",)

    @property
    def is_onnx(self) -> bool:
        return self.module is None

    def require_torch(self, purpose: str) -> nn.Module:
        """The ``nn.Module``, or a clear error for ONNX sources."""
        if self.module is None:
            raise SourceError(
                f"{purpose} needs the PyTorch model; {self.name} is an exported ONNX file, "
                "which only runs inference. Pass MODULE:FUNCTION (and --weights) or a "
                "model folder instead.")
        return self.module


@dataclass
class DataSource:
    """Batches from :func:`load_data`.

    Attributes:
        name: the spec it came from.
        batches: inputs (a tensor or a dict of tensors) or ``(inputs, labels)`` pairs.
        labeled: whether every batch carries labels.
        classes: class names (image folders), else ``None``.
        label_names: the model's class names the labels index (a labels file), if given.
    """

    name: str
    batches: list[Any]
    labeled: bool
    classes: list[str] | None = field(default=None)
    label_names: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        for index, inputs in enumerate(self.inputs):
            check_finite(input_args(inputs), {}, f"{self.name}: batch {index}", SourceError)

    @property
    def inputs(self) -> list[Any]:
        """The batches without labels."""
        return [b[0] for b in self.batches] if self.labeled else list(self.batches)

    @property
    def unlabeled(self) -> list[Any]:
        """The batches without labels, as quantaware's APIs take them (several
        positional inputs as ``((x1, x2),)``, not as an input and its label)."""
        return [(x,) if isinstance(x, tuple) else x for x in self.inputs]

    @property
    def labels(self) -> torch.Tensor | None:
        """All labels, concatenated (``None`` for unlabelled data)."""
        return torch.cat([b[1].reshape(-1) for b in self.batches]) if self.labeled else None

    @property
    def example(self) -> Any:
        """The first sample of the first batch, as a batch of one."""
        return slice_inputs(self.inputs[0], 0, 1)

    @property
    def num_samples(self) -> int:
        return sum(inputs_size(x) for x in self.inputs)


# -- models --------------------------------------------------------------------------


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict from ``path`` into ``model``, safely, and return the model.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (tensors and plain containers only). A dict
    that holds the state dict under ``state_dict`` or ``model`` is accepted too.

    Raises:
        FileNotFoundError: no such file.
        SourceError: unsafe or unreadable file, or keys/shapes that do not match.

    Example:
        >>> import tempfile, os
        >>> net = nn.Linear(2, 2); path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(net.state_dict(), path)
        >>> torch.equal(load_weights(nn.Linear(2, 2), path).weight, net.weight)
        True
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError("reading .safetensors needs: pip install safetensors") from exc
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise SourceError(f"cannot read {str(path)!r} as safetensors: {exc}") from exc
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            from quantaware.checkpoint import refused_pickle_detail

            detail = refused_pickle_detail(exc)
            with open(path, "rb") as f:  # pickle.dump: PROTO 2-5 first, STOP last
                head = f.read(2)
                f.seek(-1, os.SEEK_END)
                raw_pickle = len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and (
                    f.read(1) == b".")
            if raw_pickle and "global" not in detail:
                raise SourceError(
                    f"{str(path)!r} is a raw pickle (pickle.dump), which only loads by "
                    f"running it: loading it would run code ({detail}). Save the weights "
                    "with torch.save(model.state_dict(), path).") from exc
            if "global" not in detail:  # junk or a cut-off file, not a crafted pickle
                raise SourceError(f"cannot read weights file {str(path)!r}: it is not a torch "
                                  f"file (or it is truncated): {detail}") from exc
            raise SourceError(
                f"{str(path)!r} is not a plain state dict: loading it would run code "
                f"({refused_pickle_detail(exc)}). Save the weights with "
                "torch.save(model.state_dict(), path).") from exc
        except Exception as exc:  # torch.load raises many types on corrupt files
            raise SourceError(f"cannot read weights file {str(path)!r} (truncated or not a "
                              f"torch file): {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise SourceError(f"{str(path)!r} does not hold a state dict (name -> tensor); save "
                          "it with torch.save(model.state_dict(), path)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        details = "; ".join(part for part in (
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatch {wrong[:3]}" if wrong else "") if part)
        raise SourceError(f"weights {str(path)!r} do not fit the model ({details}); check "
                          "that the function builds the architecture the weights were "
                          "saved from")
    model.load_state_dict(state)
    return model


def _hf_folder(folder: Path) -> LoadedModel:
    from quantaware.zoo.minilm import MiniLMTokenizer, load_minilm

    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as exc:
        raise SourceError(f"cannot read {str(folder / 'config.json')!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{str(folder / 'config.json')!r} is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in ("bert",):
        raise SourceError(
            f"{str(folder)!r} holds a {model_type!r} model; quantaware reads BERT-family "
            "encoders (model_type 'bert', e.g. all-MiniLM-L6-v2) from model folders. Wrap "
            "other architectures in a MODULE:FUNCTION that returns the nn.Module.")
    if not (folder / "tokenizer.json").is_file():
        raise SourceError(f"{str(folder)!r} has no tokenizer.json (the fast tokenizer file)")
    try:
        model = load_minilm(folder)
    except (FileNotFoundError, SourceError):
        raise
    except Exception as exc:  # safetensors and config errors
        raise SourceError(f"cannot load the model in {str(folder)!r} (config.json / "
                          f"model.safetensors): {type(exc).__name__}: {exc}") from exc
    seq_len = min(int(config.get("max_position_embeddings", 512)), 128)
    try:
        tok = MiniLMTokenizer(seq_len, model_dir=folder)
    except ImportError:
        raise
    except Exception as exc:  # the tokenizers package raises a bare Exception
        raise SourceError(f"cannot read {str(folder / 'tokenizer.json')!r}: {exc}") from exc

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = tok(texts)
        return {"input_ids": ids, "attention_mask": mask}

    return LoadedModel(str(folder), module=model, tokenizer=tokenize,
                       input_names=("input_ids", "attention_mask"))


def load_model(spec: str, weights: str | os.PathLike | None = None) -> LoadedModel:
    """Resolve a model source (see the module docstring).

    Raises:
        FileNotFoundError: a file or folder that does not exist.
        SourceError: anything else that makes the source unusable.

    Example:
        >>> load_model("torch.nn:Identity").module
        Identity()
    """
    if not isinstance(spec, str) or not spec:
        raise SourceError(f"model must be a non-empty string, got {spec!r}")
    path = Path(spec)
    if spec.endswith(".onnx"):
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {spec!r} does not exist")
        if weights is not None:
            raise SourceError("--weights applies to MODULE:FUNCTION models, not ONNX files")
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and friends
            raise SourceError(f"{spec!r} is not a readable ONNX model: {exc}") from exc
        if not proto.graph.node or not proto.graph.input or not proto.graph.output:
            raise SourceError(f"{spec!r} is not a usable ONNX model (no nodes, inputs or "
                              "outputs); export it again")
        names = tuple(i.name for i in proto.graph.input)
        return LoadedModel(spec, onnx_path=path, input_names=names)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"{spec!r} is a folder without config.json; a model folder needs "
                              "config.json, model.safetensors and tokenizer.json")
        if weights is not None:
            raise SourceError("--weights applies to MODULE:FUNCTION models; a model folder "
                              "carries its own weights")
        return _hf_folder(path)
    if ":" not in spec:
        if path.is_file() and path.suffix.lower() == ".tflite":
            raise SourceError(
                f"{spec!r} is a LiteRT file: give the torch model it was exported from "
                "(MODULE:FUNCTION) as --model; a LiteRT file runs as `quantaware evaluate "
                "--quantized FILE.tflite` (beside the torch model exported to LiteRT)")
        if path.is_file():
            raise SourceError(
                f"{spec!r} is a file, not a model source: give MODULE:FUNCTION (or "
                f"file.py:FUNCTION) that builds the architecture, with --weights {spec} if it "
                "holds a state dict. Pickled whole models are not loaded: unpickling them "
                "runs code.")
        if path.suffix or os.sep in spec:
            raise FileNotFoundError(f"model {spec!r} does not exist")
        raise SourceError(f"unknown model {spec!r}: use MODULE:FUNCTION (a function returning "
                          "an nn.Module), a Hugging Face model folder or an .onnx file")
    try:
        model = call_spec(spec)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc
    if not isinstance(model, nn.Module):
        raise SourceError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    import inspect

    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = ["input"]
    return LoadedModel(spec, module=model.eval(), input_names=tuple(params) or ("input",))


# -- data ----------------------------------------------------------------------------


def _builtin(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from quantaware.data import load_digits_split, load_mnist1d_split

    train, test = (load_digits_split() if name == "digits" else load_mnist1d_split())
    return (train if split == "train" else test).tensors  # type: ignore[return-value]


def _split(x: Any, y: torch.Tensor | None, batch_size: int) -> list[Any]:
    n = inputs_size(x)
    out = []
    for i in range(0, n, batch_size):
        part = slice_inputs(x, i, i + batch_size)
        out.append(part if y is None else (part, y[i:i + batch_size]))
    return out


def _user_batches(spec: str, items: Iterable[Any], limit: int | None) -> tuple[list[Any], bool]:
    batches: list[Any] = []
    labeled: bool | None = None
    seen = 0
    from quantaware._batch import LABEL_KEYS, unpack_batch

    for i, item in enumerate(_guarded(spec, items)):
        raw = item
        try:  # the batch convention of every API: tensor, (x, y, ...), dict with a label key
            x, y = unpack_batch(item)
        except (TypeError, ValueError) as exc:
            raise SourceError(f"{spec}: batch {i}: {exc}") from exc
        this_labeled = y is not None
        if this_labeled:
            y = torch.as_tensor(y)
            item = (x, y)
        else:
            item = x
        if isinstance(x, dict):
            if not x or not all(isinstance(v, torch.Tensor) for v in x.values()):
                raise SourceError(f"{spec}: batch {i} is a dict whose values are not all "
                                  "tensors")
        elif isinstance(x, tuple):
            if not all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in x) or len(
                    {v.shape[0] for v in x}) != 1:
                raise SourceError(f"{spec}: batch {i}'s inputs are not tensors with one batch "
                                  f"size (shapes {[getattr(v, 'shape', v) for v in x]})")
        elif not isinstance(x, torch.Tensor):
            raise SourceError(f"{spec}: batch {i} is a {type(x).__name__}; yield tensors, "
                              "(inputs, labels) pairs, ((x1, x2), labels) for several "
                              "inputs, or dicts of tensors")
        if isinstance(x, torch.Tensor) and x.dim() == 0:
            raise SourceError(f"{spec}: batch {i} is a 0-d tensor; yield batches (N, ...)")
        if labeled is not None and this_labeled != labeled:
            raise SourceError(f"{spec}: some batches carry labels and some do not (batch {i})")
        labeled = this_labeled
        if this_labeled and item[1].reshape(-1).shape[0] != inputs_size(x):
            key = next((k for k in LABEL_KEYS if isinstance(raw, dict) and k in raw), None)
            where = (f" (its {key!r} key is read as the labels, as every key in "
                     f"{', '.join(LABEL_KEYS)} is; rename it if it is a model input)"
                     if key else "")
            raise SourceError(f"{spec}: batch {i} has {inputs_size(x)} inputs but "
                              f"{item[1].numel()} labels{where}")
        batches.append(item)
        seen += inputs_size(x)
        if limit is not None and seen >= limit:
            break
    if not batches:
        raise SourceError(f"{spec} yielded no batches; return a non-empty iterable")
    return batches, bool(labeled)


def is_function_spec(spec: str) -> bool:
    """Whether a data source names a ``MODULE:FUNCTION`` (not a file or folder).

    Example:
        >>> is_function_spec("mypkg.data:batches"), is_function_spec("digits")
        (True, False)
    """
    return ":" in spec and not Path(spec).exists()


def _regroup(spec: str, batches: list[Any], labeled: bool, batch_size: int) -> list[Any]:
    """A function's batches joined and split again into ``batch_size`` samples."""
    inputs = [b[0] if labeled else b for b in batches]
    if all(inputs_size(x) == batch_size for x in inputs[:-1]) and (
            inputs_size(inputs[-1]) <= batch_size):
        return batches
    shapes = {str(map_inputs(x, lambda v: tuple(v.shape[1:]))) for x in inputs}
    if len(shapes) > 1:
        raise SourceError(
            f"{spec}: the batch size cannot regroup its batches, whose samples differ in "
            f"shape ({', '.join(sorted(shapes)[:3])}); leave the batch size out to use the "
            "batches as they are, or yield batches of the size you want")
    x = cat_inputs(inputs)
    y = torch.cat([b[1].reshape(-1) for b in batches]) if labeled else None
    return _split(x, y, batch_size)


def _guarded(spec: str, items: Iterable[Any]) -> Iterator[Any]:
    """``items``, with what the user's iterable raises (a generator, a DataLoader's
    dataset) named as coming from ``spec``."""
    iterator = iter(items)
    index = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # the user's code: any exception type
            raise SourceError(f"{spec}: producing batch {index} raised "
                              f"{type(exc).__name__}: {exc}") from exc
        yield item
        index += 1


def _truncate(batches: list[Any], labeled: bool, limit: int | None) -> list[Any]:
    if limit is None:
        return batches
    out, seen = [], 0
    for b in batches:
        x = b[0] if labeled else b
        n = inputs_size(x)
        if seen + n > limit:
            keep = limit - seen
            cut = slice_inputs(x, 0, keep)
            out.append((cut, b[1][:keep]) if labeled else cut)
            break
        out.append(b)
        seen += n
        if seen >= limit:
            break
    return out


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a labels file: one per line in the model's output order (UTF-8).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "labels.txt")
        >>> with open(path, "w") as f:
        ...     _ = f.write("cat\\ndog\\n")
        >>> read_labels(path)
        ['cat', 'dog']
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"labels file {str(file)!r} does not exist (or is not a file)")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise LabelsError(f"labels file {str(file)!r} is not UTF-8 text ({exc}); give a text "
                          "file with one class name per line") from exc
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise LabelsError(f"labels file {str(file)!r} is empty; give one class name per line")
    if "" in lines:
        raise LabelsError(f"line {lines.index('') + 1} of labels file {str(file)!r} is empty; "
                          "give one class name per line, without blank lines")
    return lines


def _class_indices(spec: str, classes: list[str], class_names: list[str] | None) -> list[int]:
    if class_names is not None:
        lookup = {name: i for i, name in enumerate(class_names)}
        twice = sorted({c for c in classes if class_names.count(c) > 1})
        if twice:
            raise SourceError(
                f"class folder(s) {twice[:5]} of {spec!r} match several lines of the labels "
                "file; name those folders by their class index (e.g. 517/) instead")
        unknown = [c for c in classes if c not in lookup]
        if unknown:
            raise SourceError(
                f"class folder(s) {unknown[:5]} of {spec!r} are not in the labels file "
                f"({len(class_names)} names, e.g. {class_names[:3]}); name each folder "
                "exactly as its class in the labels file")
        return [lookup[c] for c in classes]
    if all(c.isdigit() for c in classes):
        return [int(c) for c in classes]
    return list(range(len(classes)))


def load_data(
    spec: str,
    model: LoadedModel | None = None,
    *,
    split: str = "test",
    batch_size: int | None = None,
    limit: int | None = None,
    size: int = 224,
    resize: int | None = None,
    labeled: bool | None = None,
    class_names: list[str] | None = None,
) -> DataSource:
    """Resolve a data source (see the module docstring) into batches.

    Args:
        spec: ``digits``, ``mnist1d``, an image folder, a ``.txt`` file of sentences
            or ``MODULE:FUNCTION``.
        model: the model the data feeds (text files need its tokenizer).
        split: ``"train"`` or ``"test"`` for the built-in data sets.
        batch_size: samples per batch (default 32; ``MODULE:FUNCTION`` data keeps
            the function's own batches unless it is given, and is regrouped to it
            when it is).
        limit: use at most this many samples.
        size, resize: image preprocessing (see :class:`ImageFolder`).
        labeled: image folders: force labelled (class subfolders) or unlabelled; by
            default a folder holding only subfolders is labelled.
        class_names: the model's classes in output order (e.g. read from a labels
            file): class folders are matched to them by name. Without it, folders
            named by integers take that integer as the label (``207/``, ``281/``
            for ImageNet classes 207 and 281), others their sorted position.

    Example:
        >>> load_data("digits", split="train", batch_size=100, limit=250).num_samples
        250
    """
    if not isinstance(spec, str) or not spec:
        raise SourceError(f"data must be a non-empty string, got {spec!r}")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, int) or batch_size < 1):
        raise SourceError(f"batch size must be a positive integer, got {batch_size!r}")
    regroup, batch_size = batch_size, batch_size or DEFAULT_BATCH_SIZE
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise SourceError(f"the sample limit must be a positive integer, got {limit!r}")
    if split not in ("train", "test"):
        raise SourceError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(spec)
    if spec in BUILTIN_DATA:
        x, y = _builtin(spec, split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return DataSource(spec, _split(x, y, batch_size), labeled=True)
    if path.is_dir():
        from quantaware.image_folder import ImageFolder

        if labeled is None:
            entries = [p for p in path.iterdir() if not p.name.startswith(".")]
            labeled = bool(entries) and all(p.is_dir() for p in entries)
        folder = ImageFolder(path, labeled=labeled, size=size, resize=resize)
        batches = folder.batches(batch_size, limit)
        if labeled:
            index = torch.tensor(_class_indices(spec, folder.classes, class_names))
            batches = [(x, index[y]) for x, y in batches]
        return DataSource(spec, batches, labeled=labeled,
                          classes=folder.classes if labeled else None,
                          label_names=class_names if labeled else None)
    if path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"text file {spec!r} does not exist")
        if model is None or model.tokenizer is None:
            raise SourceError(f"{spec!r} holds sentences, which need the model's tokenizer: "
                              "use a Hugging Face model folder as the model")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise SourceError(f"{spec!r} is not UTF-8 text: {exc}") from exc
        sentences = [line.strip() for line in lines if line.strip()]
        if not sentences:
            raise SourceError(f"{spec!r} has no sentences: write one sentence per line")
        sentences = sentences[:limit] if limit is not None else sentences
        batches = [model.tokenizer(sentences[i:i + batch_size])
                   for i in range(0, len(sentences), batch_size)]
        return DataSource(spec, batches, labeled=False)
    if is_function_spec(spec):
        try:
            items = call_spec(spec)
        except ValueError as exc:
            raise SourceError(str(exc)) from exc
        if isinstance(items, torch.Tensor) or not isinstance(items, Iterable):
            raise SourceError(f"{spec} returned {type(items).__name__}; return an iterable of "
                              "batches (a list or a DataLoader)")
        batches, is_labeled = _user_batches(spec, items, limit)
        batches = _truncate(batches, is_labeled, limit)
        if regroup is not None:
            batches = _regroup(spec, batches, is_labeled, regroup)
        return DataSource(spec, batches, labeled=is_labeled)
    if path.exists():
        raise SourceError(f"data file {spec!r} is not a source quantaware reads: use an image "
                          "folder, a .txt file of sentences, digits, mnist1d or MODULE:FUNCTION")
    raise FileNotFoundError(f"data {spec!r} does not exist (expected {', '.join(BUILTIN_DATA)},"
                            " an image folder, a .txt file or MODULE:FUNCTION)")
