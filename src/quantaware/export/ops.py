"""Torch custom ops that stand for Q/DQ during export, and their ONNX translations.

During ``export_onnx`` the quantizers call these ops instead of their float
fake-quantization; ``torch.onnx.export`` (dynamo) keeps them opaque and the
translation table below turns each into ONNX ``QuantizeLinear``/``DequantizeLinear``
(opset 21). Their torch implementations compute exactly what the ONNX ops do, so
the exported program and the float fake-quant model agree.

This module is the only place that emits Q/DQ.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import ir
from onnxscript import opset21 as op

from quantaware.primitives import dequantize, quantize, storage_dtype

# Axis argument used for per-tensor (0-d) qparams; ONNX ignores it then.
AXIS_NONE = 0

_ONNX_TYPES = {
    torch.int8: onnx.TensorProto.INT8,
    torch.uint8: onnx.TensorProto.UINT8,
    torch.int16: onnx.TensorProto.INT16,
    torch.uint16: onnx.TensorProto.UINT16,
    torch.int32: onnx.TensorProto.INT32,
}


def _axis(scale: torch.Tensor, axis: int) -> int | None:
    return axis if scale.dim() == 1 else None


@torch.library.custom_op("quantaware::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        axis: int, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear followed by DequantizeLinear on a float tensor."""
    ax = _axis(scale, axis)
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, ax), scale, zero_point, ax)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("quantaware::dequantize", mutates_args=())
def dequantize_op(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  axis: int) -> torch.Tensor:
    """DequantizeLinear of an integer constant (weights and biases)."""
    return dequantize(q, scale, zero_point, _axis(scale, axis))


@dequantize_op.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("quantaware::dequantize_symmetric", mutates_args=())
def dequantize_symmetric(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """DequantizeLinear of an integer constant with zero point 0 (omitted in ONNX)."""
    return dequantize(q, scale, torch.zeros((), dtype=torch.int32), _axis(scale, axis))


@dequantize_symmetric.register_fake
def _(q, scale, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("quantaware::dynamic_quantize_dequantize", mutates_args=())
def dynamic_quantize_dequantize(x: torch.Tensor) -> torch.Tensor:
    """ONNX DynamicQuantizeLinear (uint8, per tensor) followed by DequantizeLinear."""
    from quantaware.primitives import choose_qparams

    lo, hi = torch.aminmax(x)
    scale, zp = choose_qparams(lo, hi, 0, 255, symmetric=False)
    return dequantize(quantize(x, scale, zp, 0, 255), scale, zp)


@dynamic_quantize_dequantize.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("quantaware::global_average_pool", mutates_args=())
def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over all spatial dimensions, keeping them as size 1 (ONNX GlobalAveragePool)."""
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@global_average_pool.register_fake
def _(x):
    return x.new_empty((*x.shape[:2], *([1] * (x.dim() - 2))))


@torch.library.custom_op("quantaware::cast_float", mutates_args=())
def cast_float(x: torch.Tensor) -> torch.Tensor:
    """Cast a reduced-precision constant (float16 weights) to float32."""
    return x.to(torch.float32)


@cast_float.register_fake
def _(x):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


@torch.library.custom_op("quantaware::gather_dequantize", mutates_args=())
def gather_dequantize(q: torch.Tensor, row_scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an integer table (symmetric, one scale per row) in float32."""
    return q[ids].to(torch.float32) * row_scale[ids]


@gather_dequantize.register_fake
def _(q, row_scale, ids):
    return torch.empty((*ids.shape, q.shape[1]), dtype=torch.float32, device=q.device)


# -- ONNX translations (onnxscript) ---------------------------------------------

def _qdq_onnx(x, scale, zero_point, axis: int, qmin: int, qmax: int):
    dtype = _ONNX_TYPES[storage_dtype(qmin, qmax)]
    zp = op.Cast(zero_point, to=dtype)
    q = op.QuantizeLinear(x, scale, zp, axis=axis)
    info = torch.iinfo(storage_dtype(qmin, qmax))
    if (qmin, qmax) != (info.min, info.max):
        # Formats narrower than their storage (4-bit, narrow range) saturate here.
        if info.bits == 16:  # ONNX Runtime has no 16-bit Clip: clip in int32
            wide = onnx.TensorProto.INT32
            q = op.Cast(op.Clip(op.Cast(q, to=wide), op.Cast(qmin, to=wide),
                                op.Cast(qmax, to=wide)), to=dtype)
        else:
            q = op.Clip(q, op.Cast(qmin, to=dtype), op.Cast(qmax, to=dtype))
    return op.DequantizeLinear(q, scale, zp, axis=axis)


def _dq_onnx(q, scale, zero_point, axis: int):
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _dq_symmetric_onnx(q, scale, axis: int):
    return op.DequantizeLinear(q, scale, axis=axis)


def _dynamic_qdq_onnx(x):
    q, scale, zp = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(q, scale, zp)


def _global_average_pool_onnx(x):
    return op.GlobalAveragePool(x)


def _gather_dequantize_onnx(q, row_scale, ids):
    rows = op.Cast(op.Gather(q, ids, axis=0), to=onnx.TensorProto.FLOAT)
    return op.Mul(rows, op.Gather(row_scale, ids, axis=0))


def _cast_float_onnx(x):
    return op.Cast(x, to=onnx.TensorProto.FLOAT)


def _attention_onnx(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: float | None = None,
                    enable_gqa: bool = False):
    """``scaled_dot_product_attention`` of any rank from 2 to 4.

    torch accepts ``(..., L, E)`` inputs; the ONNX translation only 4-D ones. Size-1
    dimensions are prepended (which keeps a mask's broadcasting against the
    attention weights) and dropped again from the result.
    """
    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

    rank = max(len(query.shape), len(key.shape), len(value.shape))
    if rank > 4:
        raise ValueError(
            f"scaled_dot_product_attention on {rank}-d inputs has no ONNX translation: "
            "fold the leading dimensions into one (at most 4-d inputs)"
        )
    def as_4d(x):
        if x is None or len(x.shape) == 4:
            return x
        ones = [1] * (4 - len(x.shape))
        y = op.Unsqueeze(x, op.Constant(value_ints=list(range(len(ones)))))
        # the translation reads ranks and dtypes while tracing
        y.shape, y.dtype = ir.Shape([*ones, *x.shape]), x.dtype
        return y

    mask = attn_mask if attn_mask is None or len(attn_mask.shape) <= 2 else as_4d(attn_mask)
    out = aten_scaled_dot_product_attention(
        as_4d(query), as_4d(key), as_4d(value), mask, dropout_p=dropout_p,
        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if rank == 4:
        return out
    return op.Squeeze(out, op.Constant(value_ints=list(range(4 - rank))))


TRANSLATION_TABLE = {
    torch.ops.aten.scaled_dot_product_attention.default: _attention_onnx,
    torch.ops.quantaware.quantize_dequantize.default: _qdq_onnx,
    torch.ops.quantaware.dequantize.default: _dq_onnx,
    torch.ops.quantaware.dequantize_symmetric.default: _dq_symmetric_onnx,
    torch.ops.quantaware.dynamic_quantize_dequantize.default: _dynamic_qdq_onnx,
    torch.ops.quantaware.cast_float.default: _cast_float_onnx,
    torch.ops.quantaware.global_average_pool.default: _global_average_pool_onnx,
    torch.ops.quantaware.gather_dequantize.default: _gather_dequantize_onnx,
}
