"""The README's commands and examples stay true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "README must open with a bash block holding the two commands"
    assert README.index(block.group(0)) < 40, "the commands must be in the README's first lines"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = _first_commands()
    assert "torch==2.13.0" in demo and demo.endswith("quantaware demo")
    assert "torch==2.13.0" in tests and "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _first_commands()[1] in [line.strip() for line in ci]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "model-int8.onnx").is_file()
    assert (tmp_path / "model-qat-int8.onnx").is_file()
