"""Real sentences for text models and the measured per-backend defaults."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quantaware import presets
from quantaware.deploy import (
    default_config,
    integer_output_layers,
    load_model_source,
    most_sensitive_linears,
    quantize_for_backend,
)
from quantaware.text import real_sentences
from quantaware.zoo.minilm import MiniLM, MiniLMConfig


def test_real_sentences_are_distinct_and_seeded():
    a, b = real_sentences(50, seed=3), real_sentences(50, seed=3)
    assert a == b and len(set(a)) == 50
    assert real_sentences(50, seed=4) != a
    with pytest.raises(ValueError, match="ask for fewer"):
        real_sentences(10**6)


def test_transformers_keep_residual_adds_float():
    cfg = default_config(MiniLM(MiniLMConfig(vocab_size=10, hidden_size=8, num_layers=1,
                                             num_heads=2, intermediate_size=16)))
    assert cfg.resolve("add_3") is None and cfg.resolve("encoder.layer.0.output.dense")
    cnn = default_config(torch.nn.Conv2d(1, 1, 1))
    assert cnn.name == "INT8_CNN" and cnn.activation.observer == "percentile"
    with pytest.raises(ValueError, match="measured backends"):
        default_config(torch.nn.Conv2d(1, 1, 1), backend="tpu")


def test_model_source_errors_name_the_fix():
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        load_model_source("resnet1000")
    with pytest.raises(ValueError, match="--input-shape"):
        load_model_source("torch.nn:Identity")


def _tiny_minilm() -> MiniLM:
    torch.manual_seed(0)
    return MiniLM(MiniLMConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2,
                               intermediate_size=32)).eval()


def _tokens(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[::2, 5:] = 0  # padded sentences
    return {"input_ids": torch.randint(0, 30, (n, 8), generator=gen), "attention_mask": mask}


def test_most_sensitive_linear_keeps_float_inputs_and_is_recorded():
    model, data = _tiny_minilm(), _tokens(32)
    calib = [{k: v[:16] for k, v in data.items()}, {k: v[16:] for k, v in data.items()}]
    q = quantize_for_backend(model, calib, calib[0], float_layers=1)
    chosen = [o.pattern for o in q.quantaware_config.overrides
              if o.activation is None and o.pattern.startswith("encoder.")]
    assert len(chosen) == 1
    layer = q.get_submodule(chosen[0])
    assert layer.input_quantizer is None and layer.weight_quantizer is not None
    # the choice is the lowest-SQNR layer on the calibration data
    plain = quantize_for_backend(model, calib, calib[0], float_layers=0)
    assert most_sensitive_linears(plain, calib[:2], 1) == chosen
    assert not any(o.pattern == chosen[0] for o in plain.quantaware_config.overrides)
    with pytest.raises(ValueError, match="float_layers"):
        quantize_for_backend(model, calib, calib[0], float_layers=-1)


def test_model_source_defaults_and_bad_counts():
    with pytest.raises(ValueError, match="num_eval must be a positive integer"):
        load_model_source("torch.nn:Identity", 4, 0, input_shape=(3,))


class TwoBranches(torch.nn.Module):
    """Two Linears read only by float ops (GELU, LayerNorm); one input feature, zero
    but for one huge sample, reaches only ``spiky``, whose int8 output grid it
    stretches so far that the other outputs round badly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.good, self.spiky = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        with torch.no_grad():
            self.good.weight[:, 0] = 0
            self.spiky.weight[:, 0] = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.good(x)) + self.norm(self.spiky(x))


def two_branch_data() -> list[torch.Tensor]:
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0
    x[0, 0] = 200
    return [x[i:i + 1024] for i in range(0, 4096, 1024)]


def test_litert_keeps_int8_outputs_where_they_cost_little():
    """For LiteRT, a layer before float ops keeps its int8 output when its SQNR on
    the calibration data is high (``good``: 40 dB) and not when it is low
    (``spiky``: 23 dB); the choice is recorded in the config. ONNX Runtime's
    default keeps neither."""
    net, calib = TwoBranches().eval(), two_branch_data()
    q = quantize_for_backend(net, calib, calib[0][:1], backend="litert", config=presets.INT8)
    assert [(r.pattern, r.integer_output) for r in q.quantaware_config.overrides] == [
        ("good", True)]
    assert q.good.output_quantizer is not None and q.spiky.output_quantizer is None
    ort = quantize_for_backend(net, calib, calib[0][:1], config=presets.INT8)
    assert ort.good.output_quantizer is None and not ort.quantaware_config.overrides

    def ptq(cfg):
        return quantize_for_backend(net, calib, calib[0][:1], config=cfg)

    example = (calib[0][:1],)
    assert integer_output_layers(net, presets.INT8, example, ptq, calib,
                                 min_sqnr_db=-math.inf) == ["good", "spiky"]
    assert integer_output_layers(net, presets.INT8, example, ptq, calib,
                                 min_sqnr_db=math.inf) == []
    with pytest.raises(ValueError, match="measured backends"):
        quantize_for_backend(net, calib, calib[0][:1], backend="tflite")


def test_quantize_for_backend_reads_a_one_shot_iterator_once():
    """SmoothQuant used up a generator, so calibration then found no data."""
    model, data = _tiny_minilm(), _tokens(32)
    batches = [{k: v[:16] for k, v in data.items()}, {k: v[16:] for k, v in data.items()}]
    from_list = quantize_for_backend(model, batches, batches[0], float_layers=0)
    from_generator = quantize_for_backend(model, (b for b in batches), batches[0],
                                          float_layers=0)
    for (name, a), b in zip(from_list.state_dict().items(),
                            from_generator.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_for_backend(model, iter([]), batches[0])
