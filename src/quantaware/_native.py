"""Quiet the progress chatter native libraries print straight to file descriptor 2.

LiteRT's converter and interpreter log through absl and TFLite's C++ logger,
which write to the process's stderr below Python: ``I0000 ... flatbuffer_export.cc]
Estimated count of arithmetic ops``, ``INFO: Created TensorFlow Lite XNNPACK
delegate for CPU.``, and so on. :func:`native_stderr_filtered` captures what is
written to descriptor 2 while a block runs and writes it back afterwards without
those informational lines; warnings and errors pass through unchanged.

Example:
    >>> import os
    >>> with native_stderr_filtered():
    ...     _ = os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
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
    out, dropped = [], False
    for line in text.splitlines(keepends=True):
        body = line.rstrip(b"\r\n")
        if _NOISE.match(body) or (dropped and not body.strip()):
            dropped = True
            continue
        dropped = False
        out.append(line)
    return b"".join(out)


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Run a block with descriptor 2 captured; write back all but informational lines.

    Output written to stderr in the block reaches the terminal when it ends, in
    order. Where descriptor 2 cannot be duplicated (no such descriptor), the block
    runs unchanged. A native crash inside the block (abort, segfault) loses what it
    captured: wrap library start-up, not long native work that may fail.
    """
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as capture:
        _flush()
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            _flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = filter_native_lines(capture.read())
            if kept:
                os.write(2, kept)


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
