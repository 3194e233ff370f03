from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quantaware
from quantaware import calibrate, prepare, presets
from quantaware.algorithms import bias_correction
from quantaware.config import PerChannel, QuantConfig, QuantSpec


def test_bias_correction_reduces_mean_output_error(net, images):
    q = calibrate(prepare(net, presets.W4A8, images[0][:1]), images)
    original = copy.deepcopy(q)
    before = bias_correction.output_mean_errors(q, images)
    bias_correction.apply(q, images)
    after = bias_correction.output_mean_errors(q, images, reference=original)
    total_before = sum(float(e.abs().mean()) for e in before.values())
    total_after = sum(float(e.abs().mean()) for e in after.values())
    assert total_after < 0.5 * total_before
    # Every layer that had a shift worth correcting ends with a smaller one.
    for name in before:
        if float(before[name].abs().mean()) > 1e-3:
            assert float(after[name].abs().mean()) < float(before[name].abs().mean()), name
    # Layers without a bias (BN-free convs) got one, and the model still runs.
    assert all(m.bias is not None for m in q.modules() if hasattr(m, "weight_quantizer"))
    with torch.no_grad():
        assert torch.isfinite(q(images[0])).all()


def test_bias_correction_one_pass_equals_layer_by_layer(net, images):
    """One batch: all layers corrected in one pass; several: one pass per layer."""
    q = calibrate(prepare(net, presets.W4A8, images[0][:1]), images)
    one = bias_correction.apply(copy.deepcopy(q), [torch.cat(images)])
    many = bias_correction.apply(copy.deepcopy(q), images)
    for (name, a), (_, b) in zip(one.named_parameters(), many.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    first = bias_correction.apply(copy.deepcopy(q), images, num_batches=1)
    only = bias_correction.apply(copy.deepcopy(q), images[:1])
    for a, b in zip(first.parameters(), only.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["sequence_linear", "transposed_conv", "conv1d"])
def test_bias_correction_per_output_channel_of_every_layer_kind(kind):
    """A linear layer on (N, L, F) has its channels last (they were read from the
    sequence axis: wrong corrections when L == F, a crash otherwise); a transposed
    conv without bias gets one of its output channels (it crashed)."""
    torch.manual_seed(0)
    layer, x, dims = {
        "sequence_linear": (torch.nn.Linear(16, 8),
                            torch.randn(64, 8, 16) + torch.linspace(-3, 3, 8).reshape(1, 8, 1),
                            (0, 1)),
        "transposed_conv": (torch.nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False),
                            torch.rand(32, 4, 5, 5) * 3, (0, 2, 3)),
        "conv1d": (torch.nn.Conv1d(4, 6, 3), torch.rand(32, 4, 20) * 3, (0, 2)),
    }[kind]
    net = torch.nn.Sequential(layer).eval()
    config = QuantConfig(weight=QuantSpec(bits=3, narrow_range=True,
                                          granularity=PerChannel(0)), activation=None)
    q = calibrate(prepare(net, config, x[:1]), [x])
    with torch.no_grad():
        before = (q(x) - net(x)).mean(dims).abs().max()
    bias_correction.apply(q, [x[:16], x[16:]])
    with torch.no_grad():
        after = (q(x) - net(x)).mean(dims).abs().max()
    assert before > 0.005 and after < 1e-4, (float(before), float(after))


@pytest.mark.parametrize("algorithm", ["bias_correction", "adaround"])
def test_a_model_in_train_mode_is_corrected_as_in_eval_mode(algorithm):
    """quantize() gives back a train-mode model in train mode; bias correction and
    AdaRound then measured with dropout on (SQNR 16.5 -> 13.2 dB, where eval mode
    gives 22.2 dB). They measure the eval-mode function and leave the mode as given."""
    import copy

    from quantaware.algorithms import adaround, bias_correction

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))
    x = torch.rand(256, 16) * 4
    q = quantaware.quantize(net.eval(), presets.W4A8, [x], x[:1])
    apply = (bias_correction.apply if algorithm == "bias_correction"
             else lambda m, d: adaround.apply(m, d, iterations=50, num_samples=256))
    done = []
    for mode in (False, True):
        model = copy.deepcopy(q).train(mode)
        torch.manual_seed(1)
        apply(model, [x])
        assert model.training is mode
        done.append(model.eval())
    for (name, a), b in zip(done[0].state_dict().items(), done[1].state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
