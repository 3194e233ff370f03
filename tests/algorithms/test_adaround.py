from __future__ import annotations

import torch

from quantaware import calibrate, prepare, presets
from quantaware.algorithms import adaround, weight_range
from quantaware.prepare import quantizers


def test_adaround_never_worse_than_nearest_on_its_objective(net, images):
    q = calibrate(prepare(net, presets.W4A8, images[0][:1]), images)
    weight_range.apply(q)
    results = adaround.apply(q, images, iterations=40, num_samples=256, batch_size=128,
                              stages=1)
    assert results
    for name, r in results.items():
        assert r.adaround <= r.nearest, name
    assert sum(r.adaround for r in results.values()) < sum(r.nearest for r in results.values())


def test_adaround_weights_sit_on_the_pinned_grid(net, images):
    q = calibrate(prepare(net, presets.W4A8, images[0][:1]), images)
    adaround.apply(q, images, iterations=5, num_samples=64, stages=1)
    for name, fq in quantizers(q):
        if not (fq.from_tensor and name.endswith("weight_quantizer")):
            continue
        module = q.get_submodule(name.rsplit(".", 1)[0])
        assert bool(fq.calibrated)
        steps = module.weight.detach() / fq.scale.reshape(-1, *[1] * (module.weight.dim() - 1))
        torch.testing.assert_close(steps, torch.round(steps), atol=1e-3, rtol=0)
