"""SmoothQuant scale migration and label-free distillation on small models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.distill import distill, distillation_loss
from quantaware.smoothquant import smooth_quant


def _outlier_data() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    x[:, 3] *= 80.0  # one outlier channel, as after a transformer's LayerNorm
    return x


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def test_smoothing_is_exact_in_float_and_helps_int8(tmp_path):
    x, net = _outlier_data(), _mlp()
    plain = quantaware.quantize(net, presets.INT8, [x], x[:1])
    smooth = quantaware.prepare(net, presets.INT8, x[:1])
    assert smooth_quant(smooth, [x]) == 2
    for q in quantaware.prepare.__globals__["quantizers"](smooth):
        q[1].disable()
    torch.testing.assert_close(smooth(x), net(x), rtol=1e-4, atol=1e-4)
    smooth = quantaware.calibrate(smooth, [x])
    ref = net(x)
    assert (smooth(x) - ref).pow(2).mean() < 0.5 * (plain(x) - ref).pow(2).mean()
    path = quantaware.export_onnx(smooth, tmp_path / "s.onnx", x[:1])
    report = quantaware.verify(path, smooth, [x])
    assert report.cosine > 0.999 and report.first_divergent_layer is None, report
    assert report.max_error_lsb <= 1.001, report  # one rounding step at most


def test_distillation_moves_student_towards_teacher():
    x, net = _outlier_data(), _mlp()
    student = quantaware.quantize(net, presets.W4A8, [x], x[:1])
    with torch.no_grad():
        before = float(distillation_loss(student(x), net(x)))
    distill(student, net, [x], steps=100, lr=3e-4)
    with torch.no_grad():
        after = float(distillation_loss(student(x), net(x)))
    assert after < before


def test_auto_alpha_chooses_per_quantizer_and_helps_int8():
    x, net = _outlier_data(), _mlp()
    plain = quantaware.quantize(net, presets.INT8, [x], x[:1])
    smooth = quantaware.prepare(net, presets.INT8, x[:1])
    assert smooth_quant(smooth, [x[:128], x[128:]], alpha="auto") == 2
    smooth = quantaware.calibrate(smooth, [x])
    ref = net(x)
    assert (smooth(x) - ref).pow(2).mean() < 0.5 * (plain(x) - ref).pow(2).mean()


def test_smoothing_rejects_bad_alpha():
    x, net = _outlier_data(), _mlp()
    prepared = quantaware.prepare(net, presets.INT8, x[:1])
    for bad in (1.5, -0.1, "best"):
        with pytest.raises(ValueError, match="alpha must be"):
            smooth_quant(prepared, [x], alpha=bad)


def test_smoothing_twice_is_refused_and_keeps_the_float_function():
    """A second call measured the raw inputs, replaced the quantizers' factors and
    multiplied the weights again: the float function was off by 200."""
    x, net = _outlier_data(), _mlp()
    prepared = quantaware.prepare(net, presets.INT8, x[:1])
    smooth_quant(prepared, [x])
    with pytest.raises(ValueError, match="already applied"):
        smooth_quant(prepared, [x])
    for _, q in quantaware.prepare.__globals__["quantizers"](prepared):
        q.disable()
    torch.testing.assert_close(prepared(x), net(x), rtol=1e-4, atol=1e-4)


def test_a_weight_tied_to_an_embedding_is_not_smoothed():
    """The factor went into the shared Parameter: the embedding table changed by up to
    13.6 and its lookups were 2.3x their own size off."""

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.ln = nn.Embedding(50, 32), nn.LayerNorm(32)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.ln(self.emb(ids)))

    torch.manual_seed(0)
    model = TinyLM().eval()
    with torch.no_grad():
        model.ln.weight.copy_(torch.rand(32) * 4)
    ids = torch.randint(0, 50, (8, 12))
    prepared = quantaware.prepare(model, presets.INT8, (ids[:1],))
    table = prepared.get_submodule("emb").weight.detach().clone()
    assert smooth_quant(prepared, [ids]) == 0
    assert torch.equal(prepared.get_submodule("emb").weight, table)


def test_auto_alpha_scores_each_candidate_with_its_own_learned_scale():
    """A learned weight quantizer kept the scale of the first candidate (alpha 0.3) and
    scored every other one with it: "auto" always chose 0.3."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
    with torch.no_grad():
        net[0].weight.copy_(torch.linspace(0.1, 20, 16))
    x = torch.randn(64, 16)
    prepared = quantaware.prepare(net.eval(), presets.W4A4, (x[:1],))
    wq = prepared.get_submodule("1").weight_quantizer
    assert not bool(wq.calibrated)
    smooth_quant(prepared, [x], alpha="auto")
    assert not bool(wq.calibrated)  # the search left the quantizer as it found it


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln = nn.Linear(16, 32), nn.LayerNorm(32)
        self.drop, self.fc2 = nn.Dropout(0.5), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.ln(self.fc1(x))))


def test_smooth_quant_measures_the_eval_mode_model_and_reads_only_what_it_uses():
    """A train-mode model was measured with dropout on (other factors, 36.98 dB where
    eval mode gives 37.07); num_batches=k pulled k + 1 batches; no data gave 0."""
    torch.manual_seed(0)
    x, net = torch.randn(64, 16), _Block().eval()
    smoothed = []
    for mode in (False, True):
        p = quantaware.prepare(net, presets.INT8, x[:1]).train(mode)
        torch.manual_seed(1)
        pulled = []

        def stream(pulled=pulled):
            for i in range(4):
                pulled.append(i)
                yield x[16 * i:16 * i + 16]

        assert smooth_quant(p, stream(), num_batches=2) > 0
        assert pulled == [0, 1] and p.training is mode
        smoothed.append(p.get_submodule("fc2").weight.detach().clone())
    assert torch.equal(*smoothed)
    with pytest.raises(ValueError, match="needs data"):
        smooth_quant(quantaware.prepare(_Block().eval(), presets.INT8, x[:1]), [])


def test_distill_takes_any_batch_form_and_gives_back_the_modes():
    """(x, y) loaders, TensorDataset(x) loaders, NumPy and dict batches reached the
    model as one argument (a raw TypeError); both models were left in eval mode."""
    from torch.utils.data import DataLoader, TensorDataset

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

        def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.body(features)}

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    teacher = Named().train()
    forms = [DataLoader(TensorDataset(x, y), batch_size=16),
             DataLoader(TensorDataset(x), batch_size=16), [x.numpy()],
             [{"features": x, "labels": y}], (b for b in [x[:16], x[16:]])]
    for data in forms:
        student = quantaware.quantize(teacher, presets.INT8, [x], x[:1]).train()
        distill(student, teacher, data, steps=3)
        assert teacher.training and student.training


def test_distill_reads_a_loader_as_it_goes():
    """Every batch of a loader was read into memory first (20,000 samples for 2 steps)."""
    read = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1000

        def __getitem__(self, i: int) -> torch.Tensor:
            read.append(i)
            return torch.randn(8)

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(32, 8)
    student = quantaware.quantize(teacher, presets.INT8, [x], x[:1])
    distill(student, teacher, torch.utils.data.DataLoader(Counting(), batch_size=8), steps=2)
    assert len(read) == 16
