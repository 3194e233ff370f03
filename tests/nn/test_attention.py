"""torch's attention and transformer modules, made traceable and quantized."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import quantaware
from quantaware import presets
from quantaware.nn.attention import TraceableMultiheadAttention, make_traceable


def _masks(n: int, length: int, heads: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    banned = torch.rand(length, length, generator=gen) > 0.7
    banned.fill_diagonal_(False)  # no row fully masked
    padding = torch.zeros(n, length, dtype=torch.bool)
    padding[-1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(length)
    return [{}, {"attn_mask": banned}, {"key_padding_mask": padding},
            {"attn_mask": torch.randn(n * heads, length, length, generator=gen)},
            {"attn_mask": banned, "key_padding_mask": padding},
            {"attn_mask": causal, "is_causal": True}]


@pytest.mark.parametrize("batch_first", [True, False])
def test_traceable_attention_computes_what_torch_computes(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    twin = TraceableMultiheadAttention.from_float(mha).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    for masks, (need, average) in itertools.product(
            _masks(2, 5, 4), [(True, True), (True, False), (False, True)]):
        want = mha(x, x, x, need_weights=need, average_attn_weights=average, **masks)
        got = twin(x, x, x, need_weights=need, average_attn_weights=average, **masks)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
        if need:
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
        else:
            assert got[1] is None and want[1] is None


def test_traceable_attention_with_other_key_sizes_and_unbatched_inputs():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12).eval()
    twin = TraceableMultiheadAttention.from_float(mha).eval()
    q, k, v = torch.randn(5, 16), torch.randn(7, 8), torch.randn(7, 12)
    for want, got in zip(mha(q, k, v), twin(q, k, v), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformers_keep_their_outputs(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, activation="gelu", norm_first=norm_first,
                                       batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16),
                                    enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    want = encoder(x), encoder(x, mask=causal, is_causal=True)
    traced = make_traceable(copy.deepcopy(encoder))
    assert type(traced.layers[0].self_attn) is TraceableMultiheadAttention
    torch.testing.assert_close(traced(x), want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(traced(x, mask=causal, is_causal=True), want[1], rtol=0, atol=1e-5)

    model = nn.Transformer(16, 4, 1, 1, 32, batch_first=True).eval()
    src, tgt = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(4)
    want = model(src, tgt, tgt_mask=mask)
    torch.testing.assert_close(make_traceable(model)(src, tgt, tgt_mask=mask), want,
                               rtol=0, atol=1e-5)


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_encoder_layers_are_quantized_and_verify_in_onnx_runtime(tmp_path):
    """Traced as a leaf, nn.TransformerEncoder kept all its linear layers float
    (the 'INT8' file was 92% of the float one's size). Every projection and both
    attention matmuls are quantized now, and the file computes what torch does."""
    from quantaware.nn.functional import QuantMatmul
    from quantaware.nn.linear import QuantLinear

    torch.manual_seed(0)
    model = _Classifier().eval()
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randn(16, 10, 8, generator=gen) for _ in range(2)]
    q = quantaware.quantize(model, presets.INT8, calib, calib[0][:1])
    linears = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 + 2 * 6, linears  # embed, head; q/k/v/out, linear1/2 per layer
    assert sum(isinstance(m, QuantMatmul) for m in q.modules()) == 4
    with torch.no_grad():
        before, after = model(calib[1]), q(calib[1])
    assert torch.nn.functional.cosine_similarity(before, after).min() > 0.99
    path = quantaware.export_onnx(q, tmp_path / "encoder.onnx", calib[0][:1])
    # every weight matrix is stored as int8 (none float32)
    import onnx

    floats = [i.name for i in onnx.load(path).graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) > 4]
    assert floats == [], floats
    report = quantaware.verify(path, q, [torch.randn(32, 10, 8, generator=gen)])
    assert report.passed() and report.top1_agreement == 1.0, str(report)
    assert report.max_error_lsb is not None and report.max_error_lsb <= 1.0 + 1e-3, str(report)


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_attention_output_is_quantized_once_and_emulated_exactly(batch_first):
    """The output projection fed the residual add through the layout function, which
    hid it: the add quantized the tensor itself and out_proj had no integer form in
    the reference."""
    from quantaware.export.integer import integer_arithmetic
    from quantaware.nn.functional import QuantAdd

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first).eval()
    shape = (4, 6, 16) if batch_first else (6, 4, 16)
    calib = [torch.randn(*shape) for _ in range(2)]
    q = quantaware.quantize(layer, presets.INT8, calib, calib[0][:1] if batch_first
                            else calib[0][:, :1])
    out_proj = q.get_submodule("self_attn.out_proj")
    assert out_proj.output_quantizer is not None
    add = next(m for m in q.modules() if isinstance(m, QuantAdd)
               and any(m.input_source_of(i) is out_proj.output_quantizer for i in range(2)))
    assert sum(isinstance(quantizer, nn.Identity) for quantizer in add.input_quantizers) >= 1
    with torch.no_grad(), integer_arithmetic(q) as emulation:
        q(calib[1])
    assert "self_attn.out_proj" in emulation.emulated, emulation.fallback


def test_attention_without_a_traceable_form_stays_float_with_a_warning():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x)[0]

    with pytest.warns(UserWarning, match="attention stays a float nn.MultiheadAttention: "
                                         ".*add_bias_kv"):
        traced = make_traceable(Net())
    assert type(traced.attention) is nn.MultiheadAttention
