"""``quantaware qat``: quantization-aware training with checkpoints and resume."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "qat", help="quantization-aware training (LSQ, distillation, BN folding, resume, DDP)",
        description="Train a quantized model: start from the float model (--model "
        "module:function, or the built-in model trained first for --data digits|mnist1d), "
        "calibrate, then QAT with learned step sizes (presets W4A4/W2A2) or "
        "straight-through scales (INT8). A checkpoint is written atomically after every "
        "epoch to OUT/checkpoints; --resume continues a killed run. Run under "
        "`torchrun --nproc_per_node=N -m quantaware qat ...` for DistributedDataParallel (gloo "
        "on CPU).",
    )
    parser.add_argument("--data", default="digits", metavar="NAME|MODULE:FUNCTION",
                        help="digits, mnist1d, or a function returning (train, test) "
                        "datasets (default: %(default)s)")
    parser.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                        help="function returning the trained float model (default: the "
                        "built-in model for --data, trained first)")
    parser.add_argument("--preset", default="W4A4", help="quantization preset, e.g. INT8, "
                        "W4A4, W2A2 (default: %(default)s)")
    parser.add_argument("--skip", action="append", default=[], metavar="LAYER",
                        help="keep LAYER in float (a module name or fnmatch pattern; a "
                        "module's name also covers the layers inside it); repeat for more")
    parser.add_argument("--epochs", type=int, default=10, help="QAT epochs (default: %(default)s)")
    parser.add_argument("--out", default="quantaware-qat", metavar="DIR",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out")
    parser.add_argument("--distill", action="store_true",
                        help="distil from the float model (KL on softened logits)")
    parser.add_argument("--temperature", type=float, default=4.0,
                        help="distillation temperature (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak QAT learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float-epochs", type=int, default=20,
                        help="epochs to train the built-in float model (default: %(default)s)")
    parser.add_argument("--calib-batches", type=int, default=8,
                        help="calibration batches for the initial scales")
    parser.add_argument("--freeze-bn-epoch", type=int, default=None,
                        help="freeze batch-norm statistics after this many QAT epochs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-export", action="store_true", help="skip the final ONNX export")
    parser.set_defaults(func=run, output_dirs=("out",))


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from quantaware import distributed as qdist
    from quantaware.cli import UsageError
    from quantaware.cli._sources import check_threads
    from quantaware.qat_run import QATRunSettings, run_qat

    check_threads(args.threads)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        settings = QATRunSettings(
            data=args.data, model=args.model, preset=args.preset, epochs=args.epochs,
            out=args.out, resume=args.resume, distill=args.distill,
            temperature=args.temperature, lr=args.lr, batch_size=args.batch_size,
            seed=args.seed, float_epochs=args.float_epochs, calib_batches=args.calib_batches,
            freeze_bn_epoch=args.freeze_bn_epoch, export=not args.no_export,
            skip=tuple(args.skip),
        )
        from quantaware import presets

        presets.get(args.preset)
    except (ValueError, KeyError) as exc:
        message = str(exc.args[0] if exc.args else exc)
        field = message.split(" ", 1)[0]
        if hasattr(args, field):  # a settings field named as its command-line flag
            message = f"--{field.replace('_', '-')}{message[len(field):]}"
        raise UsageError(message) from exc

    console = Console(width=None if sys.stdout.isatty() else 100, emoji=False)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}%"),
                        console=console, transient=not console.is_terminal)
    tasks: dict[int, Any] = {}
    steps = {"per_epoch": None}

    def on_event(event: dict[str, Any]) -> None:
        if event["kind"] == "start":
            steps["per_epoch"] = event["steps_per_epoch"]
            console.print(
                f"float {event['float_accuracy']:.2f}%, after calibration "
                f"{_percent(event['ptq_accuracy'])}; {event['steps_per_epoch']} steps/epoch on "
                f"{event['world_size']} rank(s)"
                + (f"; resuming after epoch {event['start_epoch']}" if event["start_epoch"]
                   else ""))
            progress.start()
        elif event["kind"] == "step":
            epoch = event["epoch"]
            if epoch not in tasks:
                tasks[epoch] = progress.add_task(f"epoch {epoch}", total=steps["per_epoch"],
                                                 loss=0.0, acc=0.0)
            progress.update(tasks[epoch], completed=event["step"], loss=event["loss"],
                            acc=event["train_accuracy"])
        elif event["kind"] == "epoch":
            progress.console.print(f"epoch {event['epoch']}: loss {event['loss']:.4f}, "
                                   f"test accuracy {event['test_accuracy']:.2f}%")

    try:
        summary = run_qat(settings, on_event)
    finally:
        progress.stop()
    if qdist.is_main_process():
        console.print(f"QAT {summary['preset']}: float {summary['float_accuracy']:.2f}%, "
                      f"calibrated {_percent(summary['ptq_accuracy'])}, QAT "
                      f"{summary['qat_accuracy']:.2f}%; results in {args.out}")
    return 0


def _percent(value: float | None) -> str:
    """An accuracy, or "n/a" (a run resumed from a checkpoint that did not record it)."""
    return "n/a" if value is None else f"{value:.2f}%"
