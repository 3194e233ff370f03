"""quantaware.fusion: BatchNorm folding, on its own and inside prepare()."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.fusion import can_fold, fold_bn
from quantaware.prepare import quantizers

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: nn.BatchNorm1d(6), (5, 4, 11)),
    "conv2d": (lambda: nn.Conv2d(3, 8, 3, stride=2), lambda: nn.BatchNorm2d(8), (2, 3, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), lambda: nn.BatchNorm2d(6),
                  (2, 6, 7, 7)),
    "grouped": (lambda: nn.Conv2d(4, 8, 1, groups=2), lambda: nn.BatchNorm2d(8), (2, 4, 5, 5)),
    "no_bias": (lambda: nn.Conv2d(3, 5, 3, bias=False), lambda: nn.BatchNorm2d(5),
                (2, 3, 6, 6)),
    "linear": (lambda: nn.Linear(10, 7), lambda: nn.BatchNorm1d(7), (16, 10)),
    "linear_no_bias": (lambda: nn.Linear(10, 7, bias=False), lambda: nn.BatchNorm1d(7),
                       (16, 10)),
    "bn_no_affine": (lambda: nn.Conv2d(3, 4, 1), lambda: nn.BatchNorm2d(4, affine=False),
                     (2, 3, 4, 4)),
    # weights (in, out / groups, *kernel): the per-channel factor is along axis 1
    "transposed2d": (lambda: nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1),
                     lambda: nn.BatchNorm2d(6), (2, 4, 5, 5)),
    "transposed2d_grouped": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                             lambda: nn.BatchNorm2d(6), (2, 4, 5, 5)),
    "transposed1d_no_bias": (lambda: nn.ConvTranspose1d(3, 5, 4, stride=2, bias=False),
                             lambda: nn.BatchNorm1d(5), (2, 3, 9)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_folded_layer_equals_eval_mode_pair(case, randomize_bn):
    make_layer, make_bn, shape = CASES[case]
    torch.manual_seed(0)
    layer, bn = make_layer(), make_bn()
    randomize_bn(bn, torch.Generator().manual_seed(1))
    bn.eval()
    x = torch.randn(shape)
    expected = bn(layer(x))
    folded = fold_bn(layer, bn)
    assert type(folded) is type(layer)
    assert folded.bias is not None
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    # the transform is not the identity (the check above is meaningful)
    assert not torch.allclose(layer(x), expected, atol=1e-3)
    # the original layer is untouched, and the folded parameters are trainable copies
    assert not torch.equal(folded.weight, layer.weight)
    assert isinstance(folded.weight, nn.Parameter) and folded.weight.requires_grad
    assert isinstance(folded.bias, nn.Parameter)


def test_fold_uses_running_statistics_not_batch_statistics(randomize_bn):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)
    randomize_bn(bn, torch.Generator().manual_seed(0))
    bn.train()  # folding must still use the running statistics
    folded = fold_bn(conv, bn)
    x = torch.randn(4, 2, 5, 5)
    torch.testing.assert_close(folded(x), bn.eval()(conv(x)), rtol=1e-5, atol=1e-5)


def test_cannot_fold_mismatched_or_untracked():
    assert not can_fold(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    assert not can_fold(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    assert not can_fold(nn.ReLU(), nn.BatchNorm2d(4))
    assert not can_fold(nn.ConvTranspose2d(3, 4, 1), nn.BatchNorm2d(3))
    assert can_fold(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="cannot fold"):
        fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))


def _disable_all(model: nn.Module) -> None:
    for _, q in quantizers(model):
        q.disable()


def test_prepare_folds_batchnorm_out_of_the_graph(residual_cnn):
    x = torch.randn(4, 3, 8, 8)
    prepared = quantaware.prepare(residual_cnn, presets.INT8, x[:1])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            assert "bn" not in node.target, node.target
    _disable_all(prepared)
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), residual_cnn(x), rtol=1e-4, atol=1e-5)


def test_prepare_without_fold_keeps_batchnorm(residual_cnn):
    x = torch.randn(4, 3, 8, 8)
    cfg = dataclasses.replace(presets.INT8, fold_bn=False)
    prepared = quantaware.prepare(residual_cnn, cfg, x[:1])
    bns = [m for m in prepared.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2
    _disable_all(prepared)
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), residual_cnn(x), rtol=1e-4, atol=1e-5)


def test_prepare_folds_linear_batchnorm1d(randomize_bn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    randomize_bn(model, torch.Generator().manual_seed(3))
    model.eval()
    x = torch.randn(8, 6)
    prepared = quantaware.prepare(model, presets.INT8, x[:2])
    assert not any(isinstance(m, nn.BatchNorm1d) for m in prepared.modules())
    _disable_all(prepared)
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)


def test_batchnorm_with_two_consumers_of_the_conv_is_not_folded(randomize_bn):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use of y

    torch.manual_seed(0)
    model = randomize_bn(Branchy(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 3, 5, 5)
    prepared = quantaware.prepare(model, presets.INT8, x[:1])
    assert any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    _disable_all(prepared)
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)
