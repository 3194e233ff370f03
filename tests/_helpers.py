"""Helpers shared by the source, workflow and command-line tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from quantaware.cli import main


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with its output captured (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def save_photo(array: np.ndarray, path: Path, side: int = 64) -> None:
    """A real photo, shrunk to ``side`` x ``side``, written where the test wants it."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).resize((side, side)).save(path)


class Exploit:
    """Unpickling this writes a file: the side effect a crafted weights file would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))
