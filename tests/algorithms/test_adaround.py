from __future__ import annotations

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
