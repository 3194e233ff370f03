"""Quantization under ``torch.distributed`` (DDP, launched with ``torchrun``).

Every rank must hold bit-identical quantizer state, or the ranks train and export
different models. Three mechanisms give that:

- observer statistics are all-reduced per batch (min/max with MIN/MAX, histogram
  counts with SUM) once :func:`sync_observers` has switched that on, so
  calibration and QAT observers see the union of all ranks' batches;
- learned scales are ``nn.Parameter`` objects, so DistributedDataParallel averages
  their gradients like any weight;
- :func:`broadcast_quantizer_state` copies rank 0's quantizer parameters and
  buffers to every rank (at start-up, and as a final guarantee).

:func:`quantizer_state_mismatches` compares all ranks and names any quantizer
tensor that differs.

Example:
    >>> import torch
    >>> from quantaware import prepare, presets
    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), presets.INT8, torch.randn(1, 4))
    >>> sync_observers(m)  # no process group: nothing to do
    0
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from quantaware.fake_quant import FakeQuantizer

__all__ = [
    "broadcast_quantizer_state",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "quantizer_state",
    "quantizer_state_mismatches",
    "rank",
    "sync_observers",
    "world_size",
]

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the only rank that writes files."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment, if any.

    Uses ``gloo`` on CPU and ``nccl`` when CUDA is available, unless ``backend``
    says otherwise. Returns True when running distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return is_distributed()


def _quantizer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer)]


def sync_observers(model: nn.Module, enabled: bool = True) -> int:
    """Make every observer all-reduce its statistics across ranks; returns how many.

    All ranks must then run the same number of forward passes while observers
    are on (equal-length shards, as ``DistributedSampler`` gives). Without a
    process group of more than one rank this does nothing and returns 0.
    """
    if not is_distributed():
        return 0
    count = 0
    for _, q in _quantizer_modules(model):
        if q.observer is not None:
            q.observer.sync_across_ranks = enabled
            count += 1
    return count


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer parameter and buffer (observers included), by full name."""
    state: dict[str, torch.Tensor] = {}
    for name, q in _quantizer_modules(model):
        for key, t in q.named_parameters():
            state[f"{name}.{key}"] = t
        for key, t in q.named_buffers():
            state[f"{name}.{key}"] = t
    return state


def broadcast_quantizer_state(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s quantizer parameters and buffers to every rank."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in quantizer_state(model).values():
            dist.broadcast(t.data, src=src)


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()
                          if data.numel() else b"").hexdigest()


def quantizer_state_mismatches(model: nn.Module) -> list[str]:
    """Names of quantizer tensors that are not bit-identical on all ranks (empty if none)."""
    if not is_distributed():
        return []
    mine = {k: _digest(v) for k, v in quantizer_state(model).items()}
    gathered: list[dict[str, str] | None] = [None] * world_size()
    dist.all_gather_object(gathered, mine)
    return sorted(k for k in mine if any(g is None or g.get(k) != mine[k] for g in gathered))
