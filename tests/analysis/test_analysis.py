from __future__ import annotations

import torch
from torch import nn

from quantaware import QuantConfig, presets, quantize
from quantaware.analysis import agreement, outputs, search, sensitivity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


def _data(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(32, 3, 8, 8) for _ in range(2)]


def test_sensitivity_reports_both_views():
    net, data = _net(), _data(1)
    rows = sensitivity(quantize(net, presets.W4A8, data, data[0][:1]), data)
    assert [r.name for r in rows] == ["0", "2", "5"]
    for r in rows:
        # One layer alone is never noisier than everything but that layer plus it.
        assert r.only_quantized_sqnr >= r.only_float_sqnr - 1.0
        assert r.params > 0


def test_mixed_precision_meets_budget_and_round_trips():
    net, calib, data = _net(), _data(1), _data(2)
    result = search(net, presets.INT8, calib, data, max_drop=3.0,
                    low_spec=presets.W4A8.weight)
    assert result.meets_budget
    # Check the claim independently: prepare the written config and measure it.
    cfg = QuantConfig.from_dict(result.config.to_dict())
    assert cfg == result.config
    q = quantize(net, cfg, calib, calib[0][:1])
    score = agreement(outputs(q, data), outputs(net, data))
    assert result.reference_score - score <= 3.0
    assert score == result.score
    all_int8 = sum(m.weight.numel() for m in net.modules() if hasattr(m, "weight"))
    assert result.size_bytes <= all_int8


class _TwoHeads(nn.Module):
    """A dict of a classification head and a regression head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU())
        self.cls, self.reg = nn.Linear(32, 10), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"cls": self.cls(h), "reg": self.reg(h)}


def test_sensitivity_of_a_model_with_several_outputs_scores_every_one():
    """Dict outputs crashed; tuple outputs were scored on the first only."""
    from quantaware.analysis.metrics import sqnr_db

    net, data = _TwoHeads().eval(), _data(2)
    q = quantize(net, presets.W4A8, data, data[0][:1])
    got, ref = outputs(q, data), outputs(net, data)
    assert isinstance(got, tuple) and [t.shape for t in got] == [(64, 10), (64, 1)]
    assert agreement(got, ref) == agreement(got[0], ref[0])  # the regression head has no classes
    noise = sum(float((r - g).double().pow(2).sum()) for g, r in zip(got, ref, strict=True))
    signal = sum(float(r.double().pow(2).sum()) for r in ref)
    assert abs(sqnr_db(got, ref) - 10 * torch.log10(torch.tensor(signal / noise)).item()) < 1e-6
    rows = sensitivity(q, data)
    assert [r.name for r in rows] == ["body.1", "cls", "reg"]
    assert rows[2].only_quantized_drop == 0.0 and rows[2].only_quantized_sqnr < 200


def test_agreement_leaves_out_feature_outputs():
    """(N, L, D) hidden states were scored as class scores and dragged the worst
    agreement down; dense maps (N, C, H, W) are scored per position."""
    gen = torch.Generator().manual_seed(0)
    logits, hidden = torch.randn(64, 10, generator=gen) * 5, torch.randn(64, 16, 32, generator=gen)
    assert agreement((logits, hidden + 1.0), (logits, hidden)) == 100.0
    maps = torch.randn(4, 3, 5, 5, generator=gen)
    flipped = maps.clone()
    flipped[0, :, 0, 0] = torch.tensor([-9.0, -9.0, 9.0])  # class 2 wins at one position
    expected = 100.0 * float((flipped.argmax(1) == maps.argmax(1)).float().mean())
    assert agreement(flipped, maps) == expected
