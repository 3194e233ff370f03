"""Command-line interface: a thin layer over the Python API.

One module per command (``quantaware.cli.demo``, ...); each defines
``register(subparsers)`` that adds its parser and sets ``func``. Exit codes:
0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["COMMANDS", "build_parser", "main"]

# Command modules, in the order `quantaware --help` lists them.
COMMANDS = ("demo", "presets", "quantize", "evaluate", "export", "run", "qat", "verify", "bench",
            "predict", "report")

DESCRIPTION = """\
quantaware: quantize PyTorch models (PTQ, QAT) and deploy INT8 ONNX that
provably computes what you trained.

Start with `quantaware demo`: it trains a CNN on scikit-learn's bundled digits,
quantizes it five ways, exports each to ONNX and compares accuracy, size and
ONNX Runtime latency in one table."""


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``quantaware`` argument parser with every command registered."""
    parser = argparse.ArgumentParser(
        prog="quantaware", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"quantaware.cli.{name}").register(sub)
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written before any work starts (a folder given
    for a file, a file given for a folder, a folder that is not writable)."""
    from quantaware._files import check_writable_dir, check_writable_file

    files = [d for d in getattr(args, "output_files", ()) if getattr(args, d, None) is not None]
    dirs = [d for d in getattr(args, "output_dirs", ()) if getattr(args, d, None) is not None]
    checks = [(dest, check_writable_file) for dest in files]
    checks += [(dest, check_writable_dir) for dest in dirs]
    for dest, check in checks:
        try:
            check(getattr(args, dest), _flag(dest))
        except OSError as exc:
            raise UsageError(str(exc)) from exc
    _check_outputs_spare_inputs(args, files, dirs)


def _flag(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"


# Options that name input files or folders; of them, the folders read recursively
# (image folders, frame sources), where outputs placed inside would be read back.
_INPUT_PATHS = ("data", "eval_data", "weights", "quantized", "labels", "source", "results",
                "pipeline", "model")
_DATA_FOLDERS = ("data", "eval_data", "source")


def _check_outputs_spare_inputs(args: argparse.Namespace, files: list[str],
                                dirs: list[str]) -> None:
    """Refuse an output that would overwrite an input or another output, or a folder of
    outputs inside an input folder (later runs would read the outputs as inputs)."""
    inputs = {dest: Path(getattr(args, dest)).resolve() for dest in _INPUT_PATHS
              if isinstance(getattr(args, dest, None), str) and getattr(args, dest)
              and Path(getattr(args, dest)).exists()}
    seen: dict[Path, str] = {}
    for dest in files:
        path = Path(getattr(args, dest)).resolve()
        for source, given in inputs.items():
            if path == given:
                raise UsageError(f"{_flag(dest)} {getattr(args, dest)} is also the "
                                 f"{_flag(source)} input, which writing it would destroy; "
                                 "give another path")
        if path in seen:
            raise UsageError(f"{_flag(dest)} and {_flag(seen[path])} name the same file; "
                             "give each its own path")
        seen[path] = dest
        for folder in dirs:
            names = getattr(args, "written_names", {}).get(folder, ())
            if path.parent == Path(getattr(args, folder)).resolve() and path.name in names:
                raise UsageError(f"{_flag(dest)} {getattr(args, dest)} is a file the command "
                                 f"writes into {_flag(folder)}; give another path")
    for dest in dirs:
        folder = Path(getattr(args, dest)).resolve()
        for source, given in inputs.items():
            if source in _DATA_FOLDERS and given.is_dir() and (
                    folder == given or given in folder.parents):
                raise UsageError(f"{_flag(dest)} {getattr(args, dest)} lies inside the "
                                 f"{_flag(source)} folder, where its files would be read as "
                                 "inputs next time; give a folder outside it")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quantaware`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    new_dirs = _missing_output_dirs(args)
    code = 1
    try:
        _check_outputs(args)
        code = args.func(args)
        return code
    except (UsageError, FileNotFoundError) as exc:  # a missing input file is a usage error
        print(f"error: {exc}", file=sys.stderr)
        code = 2
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return code
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return code
    finally:
        if code != 0:
            _remove_empty(new_dirs)


def _missing_output_dirs(args: argparse.Namespace) -> list[Path]:
    """The output folders (and their missing parents) that do not exist yet."""
    missing = []
    for dest in getattr(args, "output_dirs", ()):
        value = getattr(args, dest, None)
        folder = Path(value) if value is not None else None
        while folder is not None and not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` a failed command created and left empty (deepest
    first), so a failure leaves no empty output folder behind."""
    for folder in folders:
        with contextlib.suppress(OSError):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
