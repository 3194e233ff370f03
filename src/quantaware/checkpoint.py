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
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint is unsafe, truncated or not one of ours; the message says which."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors and plain containers only) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain "
            "containers (a pickle that could run code on load). Only quantaware checkpoints "
            f"are accepted; delete the file or resume from another one. Detail: {exc}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            IndexError, TypeError, AttributeError) as exc:  # what torch.load raises on junk
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
            f"{str(exc)[:200]}); delete it to resume from the previous epoch's checkpoint"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path} holds a {type(payload).__name__}, not a quantaware checkpoint dict"
        )
    return payload


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "epoch_*.pt") -> Path | None:
    """The checkpoint in ``folder`` with the highest epoch number, or ``None``."""
    found = sorted(Path(folder).glob(pattern))
    return found[-1] if found else None
