"""Crash-safe training checkpoints that never execute code when loaded.

Checkpoints are written to a temporary file in the target folder, flushed to
disk and renamed over the target (``os.replace`` is atomic on POSIX), so a run
killed while saving leaves the previous checkpoint untouched. They are read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain Python
containers: a file crafted to run code when unpickled is refused.

Example:
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "epoch_001.pt")
    >>> _ = save_checkpoint(path, {"epoch": 1, "w": torch.ones(2)})
    >>> load_checkpoint(path)["epoch"]
    1
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from quantaware._files import atomic_path

__all__ = ["RESUME_FIX", "CheckpointError", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint is unsafe, truncated or not one of ours; the message says which."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors and plain containers only) to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path


#: The advice for a truncated epoch checkpoint met when resuming.
RESUME_FIX = "delete it to resume from the previous epoch's checkpoint"


def refused_pickle_detail(exc: BaseException) -> str:
    r"""What ``torch.load(weights_only=True)`` refused, from its error (e.g. ``Trying to
    load unsupported GLOBAL posix.system ...``), without torch's advice to retry with
    ``weights_only=False``, which would run the file's code.

    Example:
        >>> refused_pickle_detail(RuntimeError("Weights only load failed. Re-running ... "
        ...     "weights_only=False ...\n\nUnsupported global: GLOBAL os.system\n\nCheck docs"))
        'it loads the global os.system, which is not a tensor type'
    """
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
    for line in lines:
        found = re.search(r"GLOBAL ([\w.]+)", line)
        if found:  # the rest of the line is torch's advice on allowlisting it
            return f"it loads the global {found.group(1)}, which is not a tensor type"
        if line.startswith("Unsupported"):
            return line
    useful = [line for line in lines if line and "weights_only" not in line
              and not line.startswith("Check the documentation")]
    return useful[0][:200] if useful else type(exc).__name__


# Files met where a checkpoint was expected, by suffix: named rather than called corrupt.
_OTHER_KINDS = {".onnx": "an ONNX model", ".tflite": "a LiteRT model",
                ".json": "a JSON file", ".yaml": "a YAML file", ".yml": "a YAML file",
                ".npz": "a numpy archive", ".safetensors": "a safetensors file"}


def _not_readable(path: Path, detail: str, fix: str) -> CheckpointError:
    kind = _OTHER_KINDS.get(path.suffix.lower())
    if kind is not None:
        return CheckpointError(f"{path} is {kind}, not a quantaware checkpoint; pass the "
                               ".pt file quantaware wrote (e.g. model-int8.pt beside "
                               "model-int8.onnx)")
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({detail}); {fix}")


def load_checkpoint(path: str | os.PathLike, fix: str = "write it again") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); raise :class:`CheckpointError`.

    ``fix`` is the advice for a truncated or corrupt file (the QAT runners say to delete
    it and resume from the previous epoch).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = refused_pickle_detail(exc)
        if "global" not in detail:  # not a crafted pickle: junk or a cut-off file
            raise _not_readable(path, detail, fix) from exc
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain "
            "containers (a pickle that could run code on load). Only files quantaware "
            f"wrote are accepted. Detail: {detail}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            IndexError, TypeError, AttributeError) as exc:  # what torch.load raises on junk
        raise _not_readable(path, f"{type(exc).__name__}: {str(exc)[:200]}", fix) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path} holds a {type(payload).__name__}, not a quantaware checkpoint dict"
        )
    return payload


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "epoch_*.pt") -> Path | None:
    """The checkpoint in ``folder`` with the highest epoch number, or ``None``
    (numbers compared as numbers: ``epoch_1000.pt`` comes after ``epoch_999.pt``).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name in ("epoch_999.pt", "epoch_1000.pt"):
        ...     _ = (folder / name).write_bytes(b"")
        >>> latest_checkpoint(folder).name
        'epoch_1000.pt'
    """
    def number(path: Path) -> tuple[int, str]:
        digits = re.findall(r"\d+", path.stem)
        return (int(digits[-1]) if digits else -1, path.name)

    found = sorted(Path(folder).glob(pattern), key=number)
    return found[-1] if found else None
