"""``quantaware qat``: runs, resumes after SIGKILL bit-identically, refuses bad checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch

from quantaware.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from quantaware.cli import main

HERE = Path(__file__).parent
SRC = HERE.parent.parent / "src"
TINY = ["--data", "tests.cli._tiny:data", "--model", "tests.cli._tiny:model"]


def _cmd(out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantaware.cli", "qat", *TINY, "--preset", "W4A4",
            "--epochs", str(epochs), "--out", str(out), "--threads", "1", "--no-export",
            "--batch-size", "8", "--distill", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(HERE.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), root, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "final.pt")["model"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    epochs = 6
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, epochs), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first = killed / "checkpoints" / "epoch_001.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() else "timeout"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pt").exists(), "the run ended before it could be killed"
    done = sorted(p.name for p in (killed / "checkpoints").glob("epoch_*.pt"))
    assert len(done) < epochs

    resumed = subprocess.run(_cmd(killed, epochs, "--resume"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch" in resumed.stdout

    straight = tmp_path / "straight"
    full = subprocess.run(_cmd(straight, epochs), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    a, b = _final_state(killed), _final_state(straight)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the accuracy after calibration comes from the checkpoint, not the resumed QAT model
    results = [json.loads((out / "results.json").read_text()) for out in (killed, straight)]
    assert results[0]["ptq_accuracy"] == results[1]["ptq_accuracy"]
    assert results[0]["qat_accuracy"] == results[1]["qat_accuracy"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    path = out / "checkpoints" / "epoch_001.pt"
    path.parent.mkdir(parents=True)
    torch.save({"format": "x", "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refusing to load") as refused:
        load_checkpoint(path)
    assert "the global posix.system" in str(refused.value)
    assert "weights_only" not in str(refused.value)
    code = main(["qat", *TINY, "--epochs", "2", "--out", str(out), "--resume", "--no-export",
                 "--threads", "1"])
    assert code == 1
    assert "refusing to load" in capsys.readouterr().err


def test_truncated_checkpoint_errors_and_previous_survives(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    first = save_checkpoint(folder / "epoch_001.pt", {"epoch": 1, "w": torch.arange(1000.0)})
    good = first.read_bytes()
    # A crash in the middle of writing epoch 2 leaves epoch 1 untouched and no epoch 2.
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder / "epoch_002.pt", {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_001.pt"]
    assert first.read_bytes() == good
    # A truncated file (copied from elsewhere, disk full...) gives a clear error.
    broken = folder / "epoch_002.pt"
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(broken)
    assert load_checkpoint(first)["epoch"] == 1


def test_bad_spec_is_a_usage_error(tmp_path, capsys):
    code = main(["qat", "--data", "no_such_data", "--out", str(tmp_path)])
    assert code == 2
    assert "module:function" in capsys.readouterr().err


def test_qat_of_a_model_with_two_positional_inputs(tmp_path, capsys):
    """Dataset samples ((signal, side), label): trained, exported with both inputs
    and verified."""
    out = tmp_path / "two"
    code = main(["qat", "--data", "tests.cli._tiny:two_datasets", "--model",
                 "tests.cli._tiny:two", "--preset", "INT8", "--epochs", "1", "--out", str(out),
                 "--threads", "1", "--batch-size", "16", "--distill"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["onnx_top1_agreement"] == 1.0
    assert len(onnx.load(str(out / "model.onnx")).graph.input) == 2


@pytest.mark.parametrize("flag, value", [("--temperature", "0"), ("--lr", "nan"),
                                         ("--freeze-bn-epoch", "-1"), ("--threads", "0")])
def test_bad_values_are_usage_errors_naming_the_flag(flag, value, tmp_path, capsys):
    code = main(["qat", "--out", str(tmp_path / "out"), flag, value])
    assert code == 2
    assert f"error: {flag} must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the float model was trained


def test_skip_keeps_layers_float_and_a_wrong_name_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "skip"
    code = main(["qat", "--data", "tests.cli._tiny:data", "--model", "tests.cli._tiny:model",
                 "--preset", "INT8", "--epochs", "1", "--out", str(out), "--threads", "1",
                 "--batch-size", "64", "--skip", "4"])
    assert code == 0, capsys.readouterr().err
    graph = onnx.load(str(out / "model.onnx")).graph
    linear = [i for i in graph.initializer if i.name.startswith("4.")]
    assert linear and all(i.data_type == onnx.TensorProto.FLOAT for i in linear)
    assert json.loads((out / "results.json").read_text())["skip"] == ["4"]
    capsys.readouterr()
    code = main(["qat", "--out", str(tmp_path / "typo"), "--float-epochs", "1",
                 "--skip", "fc9"])
    assert code != 0
    assert "--skip 'fc9' matches no layer of DigitsCNN" in capsys.readouterr().err
    assert not (tmp_path / "typo" / "float.pt").exists()
