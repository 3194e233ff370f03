"""Quiet the progress chatter native libraries print straight to file descriptor 2.

LiteRT's converter and interpreter log through absl and TFLite's C++ logger,
which write to the process's stderr below Python: ``I0000 ... flatbuffer_export.cc]
Estimated count of arithmetic ops``, ``INFO: Created TensorFlow Lite XNNPACK
delegate for CPU.``, and so on. :func:`native_stderr_filtered` captures what is
written to descriptor 2 while a block runs and passes it on without those
informational lines; warnings and errors pass through unchanged, in order. The
filtering runs in a small child process reading a pipe, so even a native crash in
the block (abort, segfault) leaves its last message on the terminal.

Example:
    >>> import os
    >>> with native_stderr_filtered():
    ...     _ = os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator

# Informational lines only: absl INFO records, absl's note about logging before
# InitializeLog, TFLite's INFO lines. absl W/E records and TFLite WARNING/ERROR stay.
_NOISE = re.compile(
    rb"^(?:I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]]*\] .*"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR"
    rb"|INFO: .*)$")


def filter_native_lines(text: bytes) -> bytes:
    """``text`` without the informational lines (and the blank lines right after them).

    Example:
        >>> filter_native_lines(b"I0000 00:00:17.5 11 port.cc:153] oneDNN on\\n\\nW: kept\\n")
        b'W: kept\\n'
    """
    keep = _LineFilter().keep
    return b"".join(line for line in text.splitlines(keepends=True) if keep(line))


class _LineFilter:
    """Whether each line in turn is kept: not informational, and not a blank line
    right after a dropped one. (Its source also runs in the filter's child process.)"""

    def __init__(self) -> None:
        self.dropped = False

    def keep(self, line: bytes) -> bool:
        body = line.rstrip(b"\r\n")
        self.dropped = bool(_NOISE.match(body)) or (self.dropped and not body.strip())
        return not self.dropped


# The filter's child process: reads the pipe, writes kept lines to its stdout (the
# real descriptor 2). Standard library only, started isolated (-I -S): quick, and
# independent of the parent's environment; it runs _LineFilter's own source.
_CHILD = f"""
import os, re
_NOISE = re.compile({_NOISE.pattern!r})
{inspect.getsource(_LineFilter)}
keep, rest = _LineFilter().keep, b""
while chunk := os.read(0, 65536):
    lines = (rest + chunk).splitlines(keepends=True)
    rest = lines.pop() if not lines[-1].endswith((b"\\n", b"\\r")) else b""
    for line in lines:
        if keep(line):
            os.write(1, line)
if rest and keep(rest):
    os.write(1, rest)
"""

#: How long the filter may take to pass on the last lines after its block ends.
_CHILD_DRAIN_SECONDS = 2.0


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Run a block with descriptor 2 filtered: all but informational lines go through.

    Output written to stderr in the block reaches the terminal as it is written
    (through a child process), in order, and is complete when the block ends, also
    when the block raises. If the process dies in the block (abort, segfault), the
    child still writes what it read, so the crash's own message is not lost. Where
    descriptor 2 cannot be duplicated or no child can be started, the block runs
    with stderr unchanged.
    """
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
            stdout=saved, stderr=saved, close_fds=True)
    except (OSError, ValueError):
        os.close(saved)
        yield
        return
    assert child.stdin is not None
    try:
        _flush()
        os.dup2(child.stdin.fileno(), 2)
        try:
            yield
        finally:
            _flush()
            os.dup2(saved, 2)
    finally:
        os.close(saved)
        child.stdin.close()  # end of input: the child writes what is left and exits
        try:
            child.wait(timeout=_CHILD_DRAIN_SECONDS)
        except subprocess.TimeoutExpired:
            # A process started in the block still holds the pipe: leave the filter
            # running for it (it ends when that process closes its stderr).
            child.returncode = 0  # not ours to wait for any more


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Python loggers ``names`` at ERROR level while a block runs (restored after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
