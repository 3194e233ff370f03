from __future__ import annotations

import pytest
import torch

from quantaware import calibrate, prepare, presets
from quantaware.algorithms import adaround, weight_range
from quantaware.prepare import quantizers


def test_adaround_never_worse_than_nearest_on_its_objective(net, images):
    q = calibrate(prepare(net, presets.W4A8, images[0][:1]), images)
    weight_range.apply(q)
    results = adaround.apply(q, images, iterations=40, num_samples=256, batch_size=128)
    assert results
    for name, r in results.items():
        assert r.adaround <= r.nearest, name
    assert sum(r.adaround for r in results.values()) < sum(r.nearest for r in results.values())


def test_adaround_weights_sit_on_the_pinned_grid(net, images):
    q = calibrate(prepare(net, presets.W4A8, images[0][:1]), images)
    adaround.apply(q, images, iterations=5, num_samples=64)
    for name, fq in quantizers(q):
        if not (fq.from_tensor and name.endswith("weight_quantizer")):
            continue
        module = q.get_submodule(name.rsplit(".", 1)[0])
        assert bool(fq.calibrated)
        steps = module.weight.detach() / fq.scale.reshape(-1, *[1] * (module.weight.dim() - 1))
        torch.testing.assert_close(steps, torch.round(steps), atol=1e-3, rtol=0)


def test_adaround_brings_the_model_output_closer_to_float(net):
    """Each layer is fitted to the input the final model really feeds it (earlier
    layers already rounded), so the whole model's output error drops too."""
    gen = torch.Generator().manual_seed(3)
    fit = [torch.randn(16, 3, 16, 16, generator=gen) for _ in range(4)]
    held_out = torch.randn(64, 3, 16, 16, generator=gen)
    with torch.no_grad():
        want = net.eval()(held_out)
    q = calibrate(prepare(net, presets.W4A8, fit[0][:1]), fit)
    weight_range.apply(q)
    with torch.no_grad():
        nearest = (q(held_out) - want).pow(2).mean()
    adaround.apply(q, fit, iterations=200, num_samples=512, batch_size=128)
    with torch.no_grad():
        learned = (q(held_out) - want).pow(2).mean()
    assert learned < 0.8 * nearest, (float(learned), float(nearest))


def test_adaround_on_1d_convs_with_their_own_padding():
    """1-d convs (they crashed), 'same' and reflect padding: the sampled patches times
    the weight are the conv's own outputs, and rounding lowers the objective."""
    from quantaware.algorithms.adaround import _layer_out, _patches

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(4, 8, 5, padding="same", padding_mode="reflect", groups=2),
        torch.nn.ReLU(), torch.nn.Conv1d(8, 8, 3, stride=2, dilation=2, padding=1)).eval()
    x = torch.randn(16, 4, 30)
    q = calibrate(prepare(net, presets.W4A8, x[:1]), [x])
    conv = q.get_submodule("0")
    patches = _patches(conv, x, 32, torch.Generator().manual_seed(0))
    rows = _layer_out(conv, patches, net[0].weight.detach())
    outputs = torch.relu(net[0](x)).transpose(1, 2).reshape(-1, 8)
    assert torch.cdist(rows, outputs).min(1).values.max() < 1e-3
    results = adaround.apply(q, [x], iterations=100, num_samples=256)
    assert set(results) == {"0", "2"}
    assert sum(r.adaround for r in results.values()) < sum(r.nearest for r in results.values())


def test_adaround_leaves_layers_it_cannot_round():
    """Transposed convs (axis-1 scales, no patch form) and QAT conv + batch norm (the
    quantized weight is folded) keep nearest rounding; naming one is an error."""
    from quantaware.qat import prepare_qat

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.ConvTranspose2d(4, 4, 2, stride=2)).eval()
    x = torch.randn(8, 3, 8, 8)
    q = calibrate(prepare(net, presets.W4A8, x[:1]), [x])
    before = q.get_submodule("2").weight.detach().clone()
    assert set(adaround.apply(q, [x], iterations=5, num_samples=64)) == {"0"}
    assert torch.equal(q.get_submodule("2").weight, before)
    with pytest.raises(ValueError, match="transposed convolution"):
        adaround.apply(q, [x], iterations=5, layers=["2"])
    qat = calibrate(prepare_qat(net, presets.W4A8, x[:1]), [x])
    assert adaround.apply(qat, [x], iterations=5, num_samples=64) == {}

