"""LSQ gradients, learned-scale export parity, QAT conv+BN folding, distillation."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from quantaware import calibrate, prepare, presets
from quantaware.config import ConfigError, QuantSpec
from quantaware.fake_quant import LearnableFakeQuantizer
from quantaware.prepare import quantizers
from quantaware.primitives import fake_quantize, fake_quantize_lsq, lsq_grad_scale
from quantaware.qat import (
    DistillationLoss,
    QATSchedule,
    distillation_loss,
    freeze_bn_stats,
    prepare_qat,
)


def _reference_lsq(x, s, z, qmin, qmax, g):
    """Esser et al. 2019 eq. 3-5, written element by element."""
    gx, gs = [], 0.0
    for v in x.tolist():
        q = round(v / s) if abs(v / s - int(v / s)) != 0.5 else float(torch.round(
            torch.tensor(v / s)))
        if q + z < qmin:
            gx.append(0.0)
            gs += qmin - z
        elif q + z > qmax:
            gx.append(0.0)
            gs += qmax - z
        else:
            gx.append(1.0)
            gs += q - v / s
    return torch.tensor(gx), gs * g


@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_lsq_gradients_match_hand_derived_reference(bits, signed):
    torch.manual_seed(bits)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    x = (torch.randn(37, dtype=torch.float64) * 3).requires_grad_()
    s = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(0.0 if signed else 1.0, dtype=torch.float64)
    g = lsq_grad_scale(37, qmax)
    y = fake_quantize_lsq(x, s, z, qmin, qmax, None, g)
    y.backward(torch.ones_like(y))
    ref_gx, ref_gs = _reference_lsq(x.detach(), 0.37, float(z), qmin, qmax, g)
    torch.testing.assert_close(x.grad, ref_gx.double())
    assert float(s.grad) == pytest.approx(ref_gs, rel=1e-12, abs=1e-12)
    # forward equals the straight-through (ONNX) fake quantization
    torch.testing.assert_close(y.detach(), fake_quantize(x.detach(), s.detach(), z.long(),
                                                         qmin, qmax))


def test_lsq_per_channel_gradient_and_offset():
    x = torch.tensor([[0.1, 0.6, 9.0], [-0.4, 0.26, -9.0]], requires_grad=True)
    s = torch.tensor([0.5, 0.25], requires_grad=True)
    z = torch.tensor([0.0, 2.0], requires_grad=True)
    y = fake_quantize_lsq(x, s, z, 0, 3, axis=0, grad_scale=0.5)
    y.sum().backward()
    # row 0: v = [0.2, 1.2, 18]; q = [0, 1, 18 -> clamp 3]; ds = [-0.2, -0.2, 3]
    # row 1: v = [-1.6, 1.04, -36]; q+z = [0, 3, -34 -> clamp 0]; ds = [-0.4, -0.04, -2]
    torch.testing.assert_close(s.grad, torch.tensor([2.6, -2.44]) * 0.5)
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(z.grad, torch.tensor([-0.5, -0.25]) * 0.5)


def test_learned_spec_validation_and_serialisation():
    spec = QuantSpec(bits=4, signed=False, symmetric=False, learned=True, learned_offset=True)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert "learned" not in QuantSpec().to_dict()
    with pytest.raises(ConfigError, match="learned_offset"):
        QuantSpec(learned_offset=True)
    assert presets.QuantConfig.from_dict(presets.W2A2.to_dict()) == presets.W2A2


def test_first_and_last_layers_stay_at_8_bits():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    q = prepare(net, presets.W4A4, torch.randn(1, 4))
    bits = {n: q.get_submodule(n).weight_quantizer.spec.bits for n in ("0", "2", "4")}
    assert bits == {"0": 8, "2": 4, "4": 8}
    assert isinstance(q.get_submodule("2").weight_quantizer, LearnableFakeQuantizer)
    all_low = prepare(net, dataclasses.replace(presets.W4A4, overrides=()), torch.randn(1, 4))
    assert all_low.get_submodule("0").weight_quantizer.spec.bits == 4


def _ort_max_error(model, x, path):
    import onnxruntime as ort

    from quantaware import export_onnx

    export_onnx(model, path, x[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(out - ref).max())


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)) + x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("preset", ["W4A4", "W2A2"])
def test_learned_scale_export_equals_fake_quant(tmp_path, preset):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    config = presets.get(preset)
    if preset == "W2A2":  # learned offsets too (LSQ+), every layer at 2 bits
        a = dataclasses.replace(config.activation, learned_offset=True)
        config = dataclasses.replace(config, activation=a, overrides=())
    model = calibrate(prepare(_Net().eval(), config, x[:1]), [x])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert _ort_max_error(model, x, tmp_path / "m.onnx") == 0.0


def test_qat_conv_bn_trains_with_batch_stats_and_exports_as_folded_conv(tmp_path):
    import onnx

    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    float_model = _Net().eval()
    model = prepare_qat(float_model, presets.W4A4, x[:1])
    assert type(model.get_submodule("c1")).__name__ == "QuantConvBn2d"
    calibrate(model, [x])
    model.train()
    before = model.get_submodule("c1").bn.running_mean.clone()
    schedule = QATSchedule(model, freeze_bn_step=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    distill = DistillationLoss(float_model)
    for _ in range(4):
        loss = distill(model(x), x, torch.randint(0, 4, (32,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    assert not torch.equal(before, model.get_submodule("c1").bn.running_mean)
    assert bool(model.get_submodule("c1").bn_frozen)
    # Frozen: training forward is the deployed folded conv.
    with torch.no_grad():
        train_out = model(x)
        model.eval()
        torch.testing.assert_close(model(x), train_out, rtol=0, atol=0)
    path = tmp_path / "bn.onnx"
    assert _ort_max_error(model, x, path) == 0.0
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert freeze_bn_stats(model) == 2


def test_qat_conv_bn_batch_stats_forward_matches_the_folded_reference():
    """Int8 per-channel weights: the training forward (weight quantized on its own
    grid, batch norm on batch statistics) equals the textbook fold -> quantize ->
    conv -> unfold -> batch norm, in values and in weight gradients."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    float_model = _Net().eval()
    with torch.no_grad():
        float_model.b1.weight.copy_(torch.tensor([2.0, -1.5, 0.3, 1.0, 4.0, -0.2, 0.7, 1.1]))
        float_model.b1.running_var.uniform_(0.2, 3.0)
    model = prepare_qat(float_model, presets.INT8, x[:1])
    calibrate(model, [x])
    model.train()
    c1 = model.get_submodule("c1")
    bn = c1.bn
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    factor = (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach()
    w = c1.weight.detach().clone().requires_grad_()
    folded = w * factor.reshape(-1, 1, 1, 1)
    scale = folded.detach().abs().amax((1, 2, 3)) / 127
    wq = fake_quantize(folded, scale, torch.zeros(8, dtype=torch.int32), -127, 127, 0)
    xin = c1.input_quantizer(x) if c1.input_quantizer is not None else x
    y = nn.functional.conv2d(xin.detach(), wq, None, 1, 1) / factor.reshape(1, -1, 1, 1)
    want = nn.functional.batch_norm(y, mean, var, bn.weight.detach(), bn.bias.detach(),
                                     True, 0.1, bn.eps)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    c1.output_quantizer = None
    c1.activation = None
    got = c1(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(c1.weight.grad, w.grad, rtol=1e-3, atol=1e-4)


def test_qat_conv_bn_negative_gamma_on_a_grid_not_symmetric_about_zero():
    """4-bit per-channel weights on [-8, 7]: a negative batch-norm scale mirrors the
    folded weight, whose codes are then not the raw weight's; the training forward
    still quantizes the folded (deployed) weight."""
    from quantaware.config import PerChannel, QuantConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, bias=False), nn.BatchNorm2d(2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, -1.0]))
    config = QuantConfig(weight=QuantSpec(bits=4, granularity=PerChannel(0)), activation=None)
    x = torch.randn(8, 3, 6, 6)
    model = prepare_qat(net, config, x[:1]).train()
    conv = model.get_submodule("0")
    bn = conv.bn
    factor = (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)
    folded = conv.weight.detach() * factor
    scale = folded.abs().amax((1, 2, 3)) / 7.5
    wq = fake_quantize(folded, scale, torch.zeros(2, dtype=torch.int32), -8, 7, 0)
    want = nn.functional.batch_norm(nn.functional.conv2d(x, wq / factor), None, None,
                                    bn.weight.detach(), bn.bias.detach(), True, 0.0, bn.eps)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_distillation_loss_reference():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    T = 3.0
    p = torch.softmax(t / T, -1)
    kl = (p * (p.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    ref = 0.7 * kl + 0.3 * nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(distillation_loss(s, t, y, temperature=T, weight=0.7), ref)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, temperature=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_learned_weight_scale_starts_at_least_squared_error(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 3, 5) * torch.tensor([0.01, 0.1, 1.0, 0.5, 2.0, 0.05]).reshape(6, 1, 1)
    spec = QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=True,
                     granularity=presets.W4A4.weight.granularity, learned=True)
    fq = LearnableFakeQuantizer(spec, channels=6, from_tensor=True)
    scale, zp = fq.qparams(w)

    def err(s):
        return (fake_quantize(w, s, zp, fq.qmin, fq.qmax, 0) - w).square().sum((1, 2))

    amax = w.abs().amax((1, 2))
    lsq = 2 * w.abs().mean((1, 2)) / fq.qmax ** 0.5
    assert torch.all(err(scale.detach()) <= err(amax / fq.qmax))
    assert torch.all(err(scale.detach()) <= err(torch.minimum(amax / fq.qmax, lsq)))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_qat_conv_bn_running_statistics_follow_torch_batch_norm(momentum):
    """momentum=None (a cumulative average in torch) was taken as 0.1."""
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=momentum),
                                nn.ReLU())
    reference = copy.deepcopy(float_model).train()
    model = prepare_qat(float_model, presets.INT8, torch.randn(1, 2, 8, 8)).train()
    for _, q in quantizers(model):
        q.disable()
    for _ in range(3):
        x = torch.randn(8, 2, 8, 8)
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    bn, ref = model.get_submodule("0").bn, reference[1]
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_qat_conv_bn_honours_bn_eval():
    """Calling .eval() on the batch norms (the usual way to freeze them) still updated
    the running statistics and normalised with batch statistics."""
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                nn.Flatten(), nn.Linear(144, 3))
    x = torch.randn(8, 1, 8, 8)
    model = calibrate(prepare_qat(float_model, presets.INT8, x[:1]), [x]).train()
    bn = model.get_submodule("0").bn
    bn.eval()
    mean = bn.running_mean.clone()
    out = model(x * 3 + 1)
    assert torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == 0
    model.eval()
    torch.testing.assert_close(out, model(x * 3 + 1))


def test_embedding_tables_learn_their_step_sizes_and_export_them(tmp_path):
    """Embeddings were rebuilt with a plain spec: no learned scale under W4A4."""
    import quantaware

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.fc = nn.Linear(16, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(ids).mean(1))

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (8, 6))
    config = dataclasses.replace(presets.W4A4, overrides=())
    model = calibrate(prepare_qat(Bag(), config, ids[:1]), [ids]).train()
    wq = model.get_submodule("emb").weight_quantizer
    assert isinstance(wq, LearnableFakeQuantizer)
    before = wq.scale.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(ids).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(before, wq.scale.detach())
    path = quantaware.export_onnx(model.eval(), tmp_path / "bag.onnx", ids[:1])
    report = quantaware.verify(path, model, [ids], threads=1)
    assert report.passed, report
