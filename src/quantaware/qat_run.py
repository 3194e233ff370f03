"""A complete, resumable QAT run: what ``quantaware qat`` executes.

Steps: load data and the float model (built-in data sets train their own float
model first), :func:`quantaware.qat.prepare_qat`, calibrate (initial scales),
train with optional distillation from the float model, evaluate every epoch,
write ``OUT/checkpoints/epoch_NNN.pt`` atomically after each epoch, and at the
end ``OUT/model.onnx`` and ``OUT/results.json``.

A run killed at any point and restarted with ``resume=True`` continues from the
newest checkpoint and ends with bit-identical weights: the checkpoint holds the
model (quantizer state included), optimizer, learning-rate schedule, freeze
schedule and RNG state, and each epoch's data order depends only on the seed
and the epoch number.

Under ``torchrun`` the run joins the process group from the environment, shards
data with ``DistributedSampler``, synchronises observers and wraps the model in
DistributedDataParallel; only rank 0 writes files.

Example:
    >>> import tempfile
    >>> settings = QATRunSettings(data="digits", preset="INT8", epochs=1, float_epochs=1,
    ...                           out=tempfile.mkdtemp(), export=False)
    >>> run_qat(settings)["qat_accuracy"] > 50.0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from quantaware import distributed as qdist
from quantaware import presets
from quantaware._batch import input_args, unpack_batch
from quantaware._spec import call_spec, load_spec
from quantaware.calibrate import calibrate
from quantaware.checkpoint import (
    RESUME_FIX,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from quantaware.fake_quant import FakeQuantizer
from quantaware.qat import QATSchedule, distillation_loss, prepare_qat
from quantaware.train import evaluate_accuracy, fit

__all__ = ["BUILTIN_DATA", "QATRunSettings", "load_spec", "run_qat"]

log = logging.getLogger(__name__)

BUILTIN_DATA = ("digits", "mnist1d")
CHECKPOINT_FORMAT = "quantaware-qat-checkpoint-v1"


@dataclass(frozen=True)
class QATRunSettings:
    """Everything a QAT run depends on (saved in every checkpoint).

    Args:
        data: ``"digits"``, ``"mnist1d"`` or ``"module:function"`` returning
            ``(train_dataset, test_dataset)`` of ``(x, y)`` samples.
        model: ``"module:function"`` returning the trained float model; ``None``
            with a built-in data set trains the built-in model first.
        preset: a preset name (:mod:`quantaware.presets`).
        epochs: QAT epochs.
        out: output folder.
        resume: continue from the newest checkpoint in ``out``.
        distill: add distillation from the float model (temperature, weight below).
        lr: peak learning rate (AdamW, cosine decay); quantizer scales get
            ``lr * scale_lr_factor`` and no weight decay.
        float_epochs, float_lr: training of the built-in float model.
        freeze_bn_epoch: freeze batch-norm statistics after this many QAT epochs.
        export: write ``model.onnx`` at the end.
        skip: layer names or ``fnmatch`` patterns kept in float (a module's name
            also covers the layers inside it).
    """

    data: str = "digits"
    model: str | None = None
    preset: str = "W4A4"
    epochs: int = 10
    out: str = "quantaware-qat"
    resume: bool = False
    distill: bool = False
    temperature: float = 4.0
    distill_weight: float = 0.5
    lr: float = 1e-3
    scale_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    float_epochs: int = 20
    float_lr: float = 3e-3
    calib_batches: int = 8
    freeze_bn_epoch: int | None = None
    export: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.skip, str) or not all(
                isinstance(p, str) and p.strip() for p in self.skip):
            raise ValueError(f"skip must be a list of layer names or patterns, got "
                             f"{self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        for name in ("epochs", "batch_size", "float_epochs", "calib_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "float_lr", "temperature", "scale_lr_factor"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("distill_weight", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.distill_weight > 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight!r}")
        if self.freeze_bn_epoch is not None and (
                isinstance(self.freeze_bn_epoch, bool) or not isinstance(self.freeze_bn_epoch, int)
                or self.freeze_bn_epoch < 0):
            raise ValueError(f"freeze_bn_epoch must be an integer >= 0 (QAT epochs before the "
                             f"batch-norm statistics freeze), got {self.freeze_bn_epoch!r}")
        if self.data not in BUILTIN_DATA and ":" not in self.data:
            raise ValueError(
                f"--data must be one of {BUILTIN_DATA} or a 'module:function' spec, got "
                f"{self.data!r}"
            )
        if self.data not in BUILTIN_DATA and self.model is None:
            raise ValueError(
                "a custom --data needs --model module:function returning the float model"
            )


def _datasets(data: str) -> tuple[Dataset, Dataset]:
    from quantaware.data import load_digits_split, load_mnist1d_split

    if data == "digits":
        return load_digits_split()
    if data == "mnist1d":
        return load_mnist1d_split()
    result = call_spec(data)
    if not (isinstance(result, tuple | list) and len(result) == 2
            and all(isinstance(d, Dataset) for d in result)):
        raise ValueError(
            f"{data!r} must return (train_dataset, test_dataset) torch Datasets of (x, y) "
            f"samples, got {type(result).__name__}"
        )
    return result[0], result[1]


def _builtin_model(data: str) -> nn.Module:
    from quantaware.models import MNIST1DCNN, DigitsCNN

    return DigitsCNN() if data == "digits" else MNIST1DCNN()


# Settings a resumed run must share with the checkpoint's: what is trained, and what
# its optimizer, learning-rate schedule and batch-norm freeze were built from (the
# schedule restores its length from the checkpoint, so other epochs would not end it).
_SAME_RUN = ("data", "model", "preset", "epochs", "batch_size", "lr", "scale_lr_factor",
             "weight_decay", "freeze_bn_epoch", "distill", "temperature", "distill_weight",
             "skip", "seed", "float_epochs", "float_lr", "calib_batches")
# What the built-in float model in OUT/float.pt was trained with.
_FLOAT_RUN = ("data", "seed", "float_epochs", "float_lr", "batch_size")


def _check_same_run(path: Path, saved: dict[str, Any], s: QATRunSettings) -> None:
    """Refuse to resume a checkpoint written with other settings (model, data, preset,
    epochs, batch size, optimizer and schedule)."""
    def same(a: Any, b: Any) -> bool:  # lists and tuples of names compare alike
        return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list)
                                                             else b)

    for name in _SAME_RUN:
        if name in saved and not same(saved[name], getattr(s, name)):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"cannot resume from {path}: it was written by a run with {name} "
                f"{saved[name]!r}, this run has {getattr(s, name)!r}; resume with the same "
                f"{flag}, or write to a new --out")


def _check_skip(s: QATRunSettings, model: nn.Module) -> None:
    if s.skip:
        from quantaware.workflow import check_skip_patterns

        check_skip_patterns(model, s.skip)


def _float_model(s: QATRunSettings, train: Dataset, test_loader: DataLoader,
                 out: Path) -> nn.Module:
    if s.model is not None:
        model = call_spec(s.model)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{s.model!r} must return a torch.nn.Module, got "
                             f"{type(model).__name__}")
        example = _example(train[0][0])
        try:
            with torch.no_grad():
                model.eval()(*(example if isinstance(example, tuple) else (example,)))
        except Exception as exc:  # the user's model: any exception type
            shapes = [tuple(t.shape) for t in (example if isinstance(example, tuple)
                                              else (example,))]
            raise ValueError(f"model {s.model} fails on a sample of {s.data} (inputs of "
                             f"shape {shapes}): {type(exc).__name__}: {exc}; check that "
                             "--model is the model for --data") from exc
        _check_skip(s, model)
        return model
    path = out / "float.pt"
    model = _builtin_model(s.data)
    _check_skip(s, model)
    trained_with = {name: getattr(s, name) for name in _FLOAT_RUN}
    saved: dict[str, Any] = {}
    if path.is_file():
        try:
            saved = load_checkpoint(path)
        except CheckpointError as exc:  # a cache this runner wrote: train again
            log.warning("%s; training the float model again", exc)
    if saved and saved.get("settings") != trained_with:
        log.warning("%s was trained with other settings (%s); training the float model "
                    "again", path, saved.get("settings", "not recorded"))
    elif saved:
        try:
            model.load_state_dict(saved["model"])
            return model.eval()
        except RuntimeError:  # a built-in model that changed since: train again
            log.warning("%s does not fit the built-in model; training it again", path)
            model = _builtin_model(s.data)
    torch.manual_seed(s.seed)
    loader = DataLoader(train, batch_size=s.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(s.seed))
    fit(model, loader, epochs=s.float_epochs, lr=s.float_lr, seed=s.seed)
    model.eval()
    if qdist.is_main_process():
        save_checkpoint(path, {"model": model.state_dict(), "settings": trained_with,
                               "accuracy": evaluate_accuracy(model, test_loader)})
    return model


def _param_groups(model: nn.Module, s: QATRunSettings) -> list[dict[str, Any]]:
    quant_ids = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer)
                 for p in m.parameters(recurse=False)}
    quant = [p for p in model.parameters() if id(p) in quant_ids]
    rest = [p for p in model.parameters() if id(p) not in quant_ids]
    groups = [{"params": rest, "weight_decay": s.weight_decay}]
    if quant:
        groups.append({"params": quant, "weight_decay": 0.0, "lr": s.lr * s.scale_lr_factor})
    return groups


def _example(sample: Any) -> Any:
    """One dataset sample's input as a batch of one: a tensor, or a tuple of the
    positional inputs of a sample ``((x1, x2), y)``."""
    if isinstance(sample, tuple | list):
        return tuple(torch.as_tensor(v).unsqueeze(0) for v in sample)
    if not isinstance(sample, torch.Tensor):
        raise ValueError(f"dataset samples must be (x, y) with x a tensor or a tuple of "
                         f"tensors, got x of type {type(sample).__name__}")
    return sample.unsqueeze(0)


def _check_labels(y: torch.Tensor, logits: torch.Tensor, step: int) -> None:
    """Class-index labels within the model's classes (cross-entropy's own error names
    neither the batch nor the fix)."""
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.numel() == 0 or logits.dim() < 2:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= logits.shape[1]:
        bad = low if low < 0 else high
        raise ValueError(f"batch {step} has label {bad}, but the model gives "
                         f"{logits.shape[1]} class scores (labels must be 0 to "
                         f"{logits.shape[1] - 1}); fix the labels or the model's output size")


def run_qat(settings: QATRunSettings,
            on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) QAT; returns the summary also written to ``OUT/results.json``.

    ``on_event`` receives ``{"kind": "start"|"step"|"epoch", ...}`` dicts (rank 0
    only) for progress display.
    """
    from quantaware.demo import write_json_atomic

    s = settings
    distributed = qdist.init_from_env()  # first: the rank decides who reports progress
    emit = on_event if (on_event is not None and qdist.is_main_process()) else (lambda e: None)
    out = Path(s.out)
    ckpt_dir = out / "checkpoints"
    config = presets.get(s.preset)
    torch.manual_seed(s.seed)

    train_set, test_set = _datasets(s.data)
    test_loader = DataLoader(test_set, batch_size=256)
    float_model = _float_model(s, train_set, test_loader, out)
    float_acc = evaluate_accuracy(float_model, test_loader)
    example = _example(train_set[0][0])

    if s.skip:  # the names were checked on the model before any training
        from quantaware.workflow import skip_rules

        config = config.with_overrides(*skip_rules(s.skip))
    model = prepare_qat(float_model, config, example)
    qdist.sync_observers(model)
    qdist.broadcast_quantizer_state(model)
    ws, rk = qdist.world_size(), qdist.rank()
    sampler = DistributedSampler(train_set, num_replicas=ws, rank=rk, shuffle=True,
                                 seed=s.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=s.batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set is smaller than one batch per rank "
                         f"({s.batch_size} x {ws}); lower --batch-size")

    state = None
    if not s.resume and qdist.is_main_process():
        # A new run: the epoch checkpoints and results of an earlier run in this
        # folder are not this run's (--resume would continue them as its own).
        for stale in [*ckpt_dir.glob("epoch_*.pt"), out / "final.pt", out / "results.json",
                      out / "model.onnx"]:
            stale.unlink(missing_ok=True)
    if distributed:
        torch.distributed.barrier()
    if s.resume:
        from quantaware.checkpoint import latest_checkpoint

        path = latest_checkpoint(ckpt_dir)
        if path is not None:
            state = load_checkpoint(path, fix=RESUME_FIX)
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path} is not a quantaware QAT checkpoint")
            _check_same_run(path, state.get("settings", {}), s)
            log.info("resuming from %s (epoch %d)", path, state["epoch"])
    if state is None:
        calib_sampler = DistributedSampler(train_set, num_replicas=ws, rank=rk, shuffle=False)
        calib = DataLoader(train_set, batch_size=s.batch_size, sampler=calib_sampler)
        calibrate(model, calib, num_batches=s.calib_batches)
    else:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # torch lists every key: keep the first lines short
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0] if lines else "")[:160]
            raise ValueError(
                f"cannot resume from {path}: its weights do not fit the model "
                f"{s.model or s.data!r} builds now ({detail}...); resume with the model "
                "that wrote it, or write to a new --out") from exc
    qdist.broadcast_quantizer_state(model)
    # After calibration; a resumed run reads it from the checkpoint (its model is
    # the QAT model of the last finished epoch by now).
    ptq_acc = (evaluate_accuracy(model, test_loader) if state is None
               else state.get("ptq_accuracy"))

    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(_param_groups(model, s), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs * steps_per_epoch)
    freeze_bn = None if s.freeze_bn_epoch is None else s.freeze_bn_epoch * steps_per_epoch
    schedule = QATSchedule(model, freeze_bn_step=freeze_bn)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        schedule.load_state_dict(state["qat_schedule"])
        schedule._apply()
        torch.set_rng_state(state["rng"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
    emit({"kind": "start", "epochs": s.epochs, "start_epoch": start_epoch,
          "steps_per_epoch": steps_per_epoch, "float_accuracy": float_acc,
          "ptq_accuracy": ptq_acc, "world_size": ws})

    for epoch in range(start_epoch + 1, s.epochs + 1):
        sampler.set_epoch(epoch)
        train_model.train()
        total = correct = 0
        loss_sum = 0.0
        t0 = time.perf_counter()
        for step, batch in enumerate(loader, 1):
            inputs, y = unpack_batch(batch)
            args = input_args(inputs)
            logits = train_model(*args)
            _check_labels(y, logits, step)
            if s.distill:
                with torch.no_grad():
                    teacher = float_model(*args)
                loss = distillation_loss(logits, teacher, y, s.temperature, s.distill_weight)
            else:
                loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            schedule.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"QAT loss became {value} in epoch {epoch}; lower --lr (now {s.lr})"
                )
            loss_sum += value * len(y)
            total += len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            emit({"kind": "step", "epoch": epoch, "step": step, "loss": loss_sum / total,
                  "train_accuracy": 100.0 * correct / total})
        acc = evaluate_accuracy(model, test_loader)
        history.append({"epoch": epoch, "loss": loss_sum / total, "test_accuracy": acc,
                        "seconds": time.perf_counter() - t0})
        if qdist.is_main_process():
            save_checkpoint(ckpt_dir / f"epoch_{epoch:03d}.pt", {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(),
                "qat_schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
                "history": history, "settings": dataclasses.asdict(s),
                "ptq_accuracy": ptq_acc,
            })
        if distributed:
            torch.distributed.barrier()
        emit({"kind": "epoch", "epoch": epoch, "loss": loss_sum / total,
              "test_accuracy": acc})

    summary: dict[str, Any] = {
        "preset": config.name, "data": s.data, "epochs": s.epochs, "world_size": ws,
        "skip": list(s.skip), "float_accuracy": float_acc, "ptq_accuracy": ptq_acc,
        "qat_accuracy": evaluate_accuracy(model, test_loader), "history": history,
    }
    if qdist.is_main_process():
        save_checkpoint(out / "final.pt", {"model": model.state_dict()})
        if s.export:
            from quantaware.export import export_onnx, verify

            path = export_onnx(model.eval(), out / "model.onnx", example)
            report = verify(path, model, test_loader)
            summary["onnx"] = str(path)
            summary["onnx_top1_agreement"] = report.top1_agreement
        write_json_atomic(out / "results.json", summary)
    if distributed:
        torch.distributed.barrier()
    return summary
