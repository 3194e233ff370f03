"""quantaware.nn.functional (QuantAdd, QuantCat, QuantMatmul) and the pooling modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantaware import presets
from quantaware.fake_quant import FakeQuantizer
from quantaware.nn import (
    QuantAdaptiveAvgPool2d,
    QuantAdd,
    QuantAvgPool2d,
    QuantCat,
    QuantMatmul,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ACT = presets.INT8.activation


def _pair(seed: int, shape_a=(4, 6), shape_b=(4, 6), spread_b: float = 5.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape_a, generator=gen), torch.randn(shape_b, generator=gen) * spread_b


def _calibrated(module, ref, batches):
    ref.observe_then_freeze(module, *batches)
    return module


def test_quant_add_equals_float_add_of_fake_quantized_inputs(ref):
    batches = [_pair(i) for i in range(3)]
    add = _calibrated(QuantAdd(ACT), ref, batches)
    a_all = torch.cat([a for a, _ in batches])
    b_all = torch.cat([b for _, b in batches])
    sa, za = ref.activation_qparams(a_all)
    sb, zb = ref.activation_qparams(b_all)
    so, zo = ref.activation_qparams(torch.cat([a + b for a, b in batches]))
    assert float(add.input_quantizers[1].scale) == sb
    assert float(add.output_quantizer.scale) == so
    a, b = _pair(10)
    expected = ref.fake_act(ref.fake_act(a, sa, za) + ref.fake_act(b, sb, zb), so, zo)
    torch.testing.assert_close(add(a, b), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(add(a, b), a + b, atol=1e-4)


def test_quant_add_with_fused_relu(ref):
    add = QuantAdd(ACT)
    add.activation = nn.ReLU()
    add = _calibrated(add, ref, [_pair(i) for i in range(2)])
    assert int(add.output_quantizer.zero_point) == 0
    out = add(*_pair(5))
    assert (out >= 0).all() and (out == 0).any()


def test_dropped_input_quantizer_passes_the_input_through(ref):
    add = QuantAdd(ACT)
    add.drop_input_quantizer(0)
    assert isinstance(add.input_quantizers[0], nn.Identity)
    assert isinstance(add.input_quantizers[1], FakeQuantizer)
    add = _calibrated(add, ref, [_pair(0)])
    a, b = _pair(0)
    sb, zb = ref.activation_qparams(b)
    so, zo = ref.activation_qparams(a + b)
    expected = ref.fake_act(a + ref.fake_act(b, sb, zb), so, zo)
    torch.testing.assert_close(add(a, b), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_quant_cat_equals_float_cat_of_fake_quantized_inputs(dim, ref):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, generator=gen) * s for s in (1.0, 4.0, 0.5)]
    cat = _calibrated(QuantCat(ACT, num_inputs=3, dim=dim), ref, [tuple(xs)])
    qps = [ref.activation_qparams(x) for x in xs]
    so, zo = ref.activation_qparams(torch.cat(xs, dim=dim))
    expected = ref.fake_act(torch.cat([ref.fake_act(x, s, z) for x, (s, z) in
                                       zip(xs, qps, strict=True)], dim=dim), so, zo)
    out = cat(*xs)
    assert out.shape == torch.cat(xs, dim=dim).shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert cat.extra_repr() == f"dim={dim}"


def test_quant_cat_checks_the_number_of_inputs(ref):
    cat = _calibrated(QuantCat(ACT, num_inputs=2, dim=0), ref, [_pair(0)])
    with pytest.raises(ValueError):
        cat(*_pair(0), torch.zeros(4, 6))


def test_quant_matmul_equals_float_matmul_of_fake_quantized_inputs(ref):
    batches = [_pair(i, (2, 4, 5), (2, 5, 3), spread_b=2.0) for i in range(2)]
    mm = _calibrated(QuantMatmul(ACT), ref, batches)
    sa, za = ref.activation_qparams(torch.cat([a for a, _ in batches]))
    sb, zb = ref.activation_qparams(torch.cat([b for _, b in batches]))
    so, zo = ref.activation_qparams(torch.cat([a @ b for a, b in batches]))
    a, b = batches[0]
    with torch.no_grad():
        pre = ref.fake_act(a, sa, za) @ ref.fake_act(b, sb, zb)
        mm.output_quantizer.disable()
        torch.testing.assert_close(mm(a, b), pre, rtol=1e-5, atol=1e-5)
    mm.output_quantizer.freeze()
    assert float(mm.output_quantizer.scale) == so
    assert int(mm.output_quantizer.zero_point) == zo


def test_uncalibrated_functional_module_refuses_to_run():
    from quantaware.observers import CalibrationError

    with pytest.raises(CalibrationError):
        QuantAdd(ACT)(*_pair(0))


# -- pooling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("float_pool", "qtype"),
    [(nn.AdaptiveAvgPool2d(1), QuantAdaptiveAvgPool2d),
     (nn.AdaptiveAvgPool2d((2, 3)), QuantAdaptiveAvgPool2d),
     (nn.AvgPool2d(2), QuantAvgPool2d),
     (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), QuantAvgPool2d)],
)
def test_quant_pool_equals_float_pool_of_fake_quantized_input(float_pool, qtype, ref):
    q = qtype.from_float(float_pool, None, ACT)
    gen = torch.Generator().manual_seed(0)
    data = [torch.rand(2, 3, 6, 6, generator=gen) * 4 - 1 for _ in range(2)]
    ref.observe_then_freeze(q, *[(x,) for x in data])
    s_in, z_in = ref.activation_qparams(torch.cat(data))
    s_out, z_out = ref.activation_qparams(torch.cat([float_pool(x) for x in data]))
    x = data[0]
    expected = ref.fake_act(float_pool(ref.fake_act(x, s_in, z_in)), s_out, z_out)
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-6)


def test_pool_without_static_activations_has_no_quantizers():
    q = QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), None, None)
    assert q.input_quantizer is None and q.output_quantizer is None
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(q(x), nn.AdaptiveAvgPool2d(1)(x))
    q = QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), None,
                                          presets.INT8_DYNAMIC.activation)
    assert q.input_quantizer is None
