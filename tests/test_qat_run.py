"""The QAT runner's checks on its settings, checkpoints and training batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantaware.qat_run import QATRunSettings, _check_labels, _check_same_run


def test_labels_outside_the_models_classes_are_named():
    """A label past the model's classes ended `quantaware qat` in cross-entropy's
    raw 'IndexError: Target 12 is out of bounds'."""
    logits = torch.zeros(4, 3)
    _check_labels(torch.tensor([0, 1, 2, 2]), logits, 1)
    _check_labels(torch.rand(4, 3), logits, 1)  # soft targets are not class indices
    with pytest.raises(ValueError, match=r"batch 7 has label 12, but the model gives 3 class "
                                         r"scores \(labels must be 0 to 2\)"):
        _check_labels(torch.tensor([0, 12, 1, 2]), logits, 7)
    with pytest.raises(ValueError, match="batch 2 has label -1"):
        _check_labels(torch.tensor([0, -1, 1, 2]), logits, 2)


@pytest.mark.parametrize("field, value, message", [
    ("lr", float("nan"), "lr must be a positive number, got nan"),
    ("temperature", 0.0, "temperature must be a positive number"),
    ("distill_weight", 1.5, r"distill_weight must be in \[0, 1\]"),
    ("weight_decay", -1e-4, "weight_decay must be a number >= 0"),
    ("freeze_bn_epoch", -1, "freeze_bn_epoch must be an integer >= 0"),
    ("freeze_bn_epoch", 1.5, "freeze_bn_epoch must be an integer >= 0"),
    ("seed", 10**23, r"seed must be an integer from 0 to 2\*\*63 - 1"),
    ("seed", -1, "seed must be an integer from 0"),
    ("skip", "fc", "skip must be a list of layer names or patterns, got 'fc'"),
    ("skip", ("fc", ""), "skip must be a list of layer names"),
])
def test_bad_settings_are_refused_before_any_training(field, value, message):
    with pytest.raises(ValueError, match=message):
        QATRunSettings(**{field: value})


def test_resuming_a_checkpoint_of_another_preset_is_refused(tmp_path):
    saved = dataclasses.asdict(QATRunSettings(preset="INT8"))
    _check_same_run(tmp_path / "epoch_001.pt", saved, QATRunSettings(preset="INT8", export=False))
    # the learning-rate schedule restores its length from the checkpoint: other epochs
    # would train on a schedule that does not end with the run
    with pytest.raises(ValueError, match="epochs 10, this run has 3; resume with the same "
                                         "--epochs"):
        _check_same_run(tmp_path / "epoch_001.pt", saved, QATRunSettings(preset="INT8",
                                                                          epochs=3))
    with pytest.raises(ValueError, match="--batch-size"):
        _check_same_run(tmp_path / "epoch_001.pt", saved,
                        QATRunSettings(preset="INT8", batch_size=8))
    with pytest.raises(ValueError, match=r"epoch_001\.pt: it was written by a run with preset "
                                         r"'INT8', this run has 'W4A4'; resume with the same "
                                         r"--preset, or write to a new --out"):
        _check_same_run(tmp_path / "epoch_001.pt", saved, QATRunSettings(preset="W4A4"))
    # layers kept in float are part of the model trained; a list reads like a tuple
    saved = {**dataclasses.asdict(QATRunSettings(skip=("fc",))), "skip": ["fc"]}
    _check_same_run(tmp_path / "epoch_001.pt", saved, QATRunSettings(skip=("fc",)))
    with pytest.raises(ValueError, match=r"skip \['fc'\], this run has \(\); resume with "
                                         "the same --skip"):
        _check_same_run(tmp_path / "epoch_001.pt", saved, QATRunSettings())
    # another seed shuffles the data in another order: not the run that was killed
    with pytest.raises(ValueError, match="seed 0, this run has 5"):
        _check_same_run(tmp_path / "epoch_001.pt", saved, QATRunSettings(skip=("fc",), seed=5))


def test_a_model_that_does_not_fit_the_data_is_named_before_training(tmp_path):
    """`qat --model` for other data failed with "mat1 and mat2 shapes cannot be
    multiplied" and no hint."""
    from quantaware.qat_run import run_qat

    settings = QATRunSettings(data="digits", model="quantaware.models:MNIST1DCNN", epochs=1,
                              out=str(tmp_path / "out"), export=False)
    with pytest.raises(ValueError, match=r"fails on a sample of digits.*--model is the model "
                                         "for --data"):
        run_qat(settings)


def test_a_float_model_trained_with_other_settings_is_trained_again(tmp_path, caplog):
    """OUT/float.pt was reused whatever it had been trained with: a second run with
    more float epochs reported the first run's float accuracy, and another --data
    failed with a raw load_state_dict error."""
    from torch.utils.data import DataLoader

    from quantaware.checkpoint import load_checkpoint
    from quantaware.data import load_digits_split
    from quantaware.qat_run import _float_model

    train, test = load_digits_split()
    loader = DataLoader(test, batch_size=256)
    first = QATRunSettings(float_epochs=1, batch_size=256, out=str(tmp_path))
    _float_model(first, train, loader, tmp_path)
    saved = load_checkpoint(tmp_path / "float.pt")
    assert saved["settings"]["float_epochs"] == 1
    again = _float_model(first, train, loader, tmp_path)  # same settings: loaded
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 saved["model"].values(), strict=True))
    with caplog.at_level("WARNING"):
        _float_model(QATRunSettings(float_epochs=2, batch_size=256, out=str(tmp_path)), train,
                     loader, tmp_path)
    assert "trained with other settings" in caplog.text
    assert load_checkpoint(tmp_path / "float.pt")["settings"]["float_epochs"] == 2
    _float_model(QATRunSettings(data="mnist1d", float_epochs=1, batch_size=512,
                                out=str(tmp_path)),
                 *_mnist1d(), tmp_path)
    assert load_checkpoint(tmp_path / "float.pt")["settings"]["data"] == "mnist1d"


def _mnist1d():
    from torch.utils.data import DataLoader

    from quantaware.qat_run import _datasets

    train, test = _datasets("mnist1d")
    return train, DataLoader(test, batch_size=256)


def test_only_rank_0_reports_progress(tmp_path, monkeypatch):
    """Progress was decided before joining the process group, when every rank still
    reads as rank 0: each line came once per rank, with each rank's numbers."""
    from quantaware import distributed as qdist
    from quantaware.qat_run import run_qat

    def join_as_rank_1(backend=None):
        monkeypatch.setattr(qdist, "rank", lambda: 1)
        monkeypatch.setattr(qdist, "world_size", lambda: 2)  # this rank's half of the data
        return False

    monkeypatch.setattr(qdist, "init_from_env", join_as_rank_1)
    events: list[dict] = []
    run_qat(QATRunSettings(data="tests.cli._tiny:data", model="tests.cli._tiny:model",
                           preset="INT8", epochs=1, out=str(tmp_path), export=False),
            events.append)
    assert events == []


def test_python_dash_m_quantaware_runs_the_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "quantaware", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage: quantaware" in done.stdout


def _quick(tmp_path, **changes) -> QATRunSettings:
    return QATRunSettings(**{"preset": "INT8", "epochs": 1, "float_epochs": 1, "batch_size": 256,
                             "calib_batches": 1, "out": str(tmp_path), "export": False,
                             **changes})


def test_a_new_run_does_not_leave_an_earlier_runs_checkpoints_to_resume(tmp_path):
    """A fresh run into a folder kept the earlier run's epoch checkpoints; killed
    and resumed, it continued the earlier run and reported its accuracy as its own."""
    from quantaware.checkpoint import save_checkpoint
    from quantaware.qat_run import run_qat

    save_checkpoint(tmp_path / "checkpoints" / "epoch_003.pt", {"epoch": 3})
    (tmp_path / "results.json").write_text("{}")
    run_qat(_quick(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_001.pt"]
    assert (tmp_path / "results.json").read_text() != "{}"


def test_resuming_weights_that_do_not_fit_the_model_names_the_checkpoint(tmp_path):
    """The model function changed under the same name: torch's load_state_dict error
    listed every key (6 KB) and named neither the checkpoint nor a fix."""
    from quantaware.checkpoint import save_checkpoint
    from quantaware.qat_run import CHECKPOINT_FORMAT, run_qat

    settings = _quick(tmp_path, resume=True)
    save_checkpoint(tmp_path / "checkpoints" / "epoch_001.pt", {
        "format": CHECKPOINT_FORMAT, "epoch": 1, "model": {"fc.weight": torch.zeros(2, 2)},
        "settings": dataclasses.asdict(settings)})
    with pytest.raises(ValueError, match=r"cannot resume from .*epoch_001\.pt: its weights do "
                                         r"not fit the model 'digits' builds now \(.*resume "
                                         "with the model that wrote it"):
        run_qat(settings)


def test_a_corrupt_float_model_cache_is_trained_again(tmp_path, caplog):
    """OUT/float.pt is the runner's own cache: a corrupt one ended every run with
    "truncated or corrupt ...; write it again"."""
    from torch.utils.data import DataLoader

    from quantaware.checkpoint import load_checkpoint
    from quantaware.data import load_digits_split
    from quantaware.qat_run import _float_model

    train, test = load_digits_split()
    (tmp_path / "float.pt").write_bytes(b"PK\x03\x04 not a zip")
    with caplog.at_level("WARNING"):
        _float_model(_quick(tmp_path), train, DataLoader(test, batch_size=256), tmp_path)
    assert "truncated or corrupt" in caplog.text and "training the float model again" in (
        caplog.text)
    assert load_checkpoint(tmp_path / "float.pt")["settings"]["float_epochs"] == 1
