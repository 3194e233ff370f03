"""Native libraries' informational stderr lines are dropped; warnings and errors kept."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from quantaware._native import filter_native_lines, native_stderr_filtered, quiet_loggers


def test_informational_lines_are_dropped_and_the_rest_kept_in_order(capfd):
    with native_stderr_filtered():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\n")
        os.write(2, b"I0000 00:00:1795424137.203372   12875 port.cc:153] oneDNN custom "
                    b"operations are on.\n\n")
        os.write(2, b"E0000 00:00:1795424137.2 12875 convert.cc:9] failed to legalize\n")
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"WARNING: kept\n")
    err = capfd.readouterr().err
    assert err == ("E0000 00:00:1795424137.2 12875 convert.cc:9] failed to legalize\n"
                   "WARNING: kept\n")


def test_output_survives_an_exception_in_the_block(capfd):
    try:
        with native_stderr_filtered():
            os.write(2, b"fatal: details\n")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert capfd.readouterr().err == "fatal: details\n"
    os.write(2, b"after\n")  # descriptor 2 is restored
    assert capfd.readouterr().err == "after\n"


def test_blank_lines_are_dropped_only_after_a_dropped_line():
    assert filter_native_lines(b"a\n\nINFO: x\n\n\nb\n") == b"a\n\nb\n"


def test_quiet_loggers_restores_the_levels():
    logger = logging.getLogger("quantaware.test.quiet")
    logger.setLevel(logging.INFO)
    with quiet_loggers("quantaware.test.quiet"):
        assert logger.level == logging.ERROR
    assert logger.level == logging.INFO


def test_a_native_crash_in_the_block_keeps_its_message():
    code = ("import os\n"
            "from quantaware._native import native_stderr_filtered\n"
            "with native_stderr_filtered():\n"
            "    os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
            "    os.write(2, b'F0000 xnnpack.cc:12] Check failed: channels > 0\\n')\n"
            "    os.abort()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode != 0
    assert b"Check failed: channels > 0" in done.stderr
    assert b"XNNPACK delegate" not in done.stderr


def test_partial_last_line_and_carriage_returns_pass_through(capfd):
    with native_stderr_filtered():
        os.write(2, b"INFO: dropped\r\nkept\r\nno newline")
    assert capfd.readouterr().err == "kept\r\nno newline"


def test_a_process_started_in_the_block_keeps_its_stderr_after_it():
    code = ("import subprocess, sys, time\n"
            "from quantaware import _native\n"
            "_native._CHILD_DRAIN_SECONDS = 0.5\n"
            "with _native.native_stderr_filtered():\n"
            "    child = subprocess.Popen([sys.executable, '-c', "
            "'import time, sys; time.sleep(2); sys.stderr.write(\"late warning\\\\n\")'])\n"
            "print(child.wait())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["0"], done  # the filter was not killed under it
    assert "late warning" in done.stderr
