"""Real sentences for text models and the measured per-backend defaults."""

from __future__ import annotations

import pytest
import torch

from quantaware.deploy import default_config, load_model_source
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
    assert default_config(torch.nn.Conv2d(1, 1, 1)).name == "INT8"
    with pytest.raises(ValueError, match="measured backends"):
        default_config(torch.nn.Conv2d(1, 1, 1), backend="tpu")


def test_model_source_errors_name_the_fix():
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        load_model_source("resnet1000")
    with pytest.raises(ValueError, match="--input-shape"):
        load_model_source("torch.nn:Identity")
