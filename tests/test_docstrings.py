"""Every example in the package's docstrings runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
from contextlib import redirect_stdout

import pytest

import quantaware

pytestmark = pytest.mark.usefixtures("single_thread")

MODULES = sorted(m.name for m in pkgutil.walk_packages(quantaware.__path__, "quantaware.")
                 if not m.name.endswith("__main__"))


def test_every_module_is_listed():
    assert {"quantaware.deploy", "quantaware.export.tflite", "quantaware.nn.linear"} <= set(
        MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    # The examples make folders with tempfile.mkdtemp(); keep them under pytest's
    # tmp_path, which pytest removes, instead of leaving them in the system temp dir.
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
    out = io.StringIO()
    with redirect_stdout(out):
        for test in finder.find(module, name):
            runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()
