"""Two-process torchrun (gloo) QAT: quantizer state bit-identical on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SRC = HERE.parent / "src"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_rank_qat_keeps_quantizer_state_identical(tmp_path):
    pytest.importorskip("torch.distributed")
    out = tmp_path / "result.json"
    # --log-dir keeps torchrun's per-run log folder under tmp_path (it otherwise
    # leaves a torchelastic_* folder in the system temp dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--log-dir={tmp_path / 'logs'}", "--master_port=0", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0",
           str(HERE / "_ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["num_quantizer_tensors"] > 10
    assert result["after_calibration"] == []
    assert result["after_training"] == []
    assert result["weights_equal"]
    # learned scales moved during training and are finite
    assert all(s > 0 for s in result["scales"])
