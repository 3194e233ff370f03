"""Quantized modules and the float-to-quantized registry."""

from quantaware.nn.conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
)
from quantaware.nn.conv_bn import ConvBn1d, ConvBn2d, QuantConvBn1d, QuantConvBn2d
from quantaware.nn.embedding import QuantEmbedding
from quantaware.nn.functional import QuantAdd, QuantCat, QuantMatmul
from quantaware.nn.linear import QuantLinear
from quantaware.nn.pool import QuantAdaptiveAvgPool2d, QuantAvgPool1d, QuantAvgPool2d
from quantaware.nn.registry import quantized_type, register, supported_types
from quantaware.nn.resize import QuantUpsample

__all__ = [
    "ConvBn1d",
    "ConvBn2d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdd",
    "QuantAvgPool1d",
    "QuantAvgPool2d",
    "QuantCat",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvBn1d",
    "QuantConvBn2d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantMatmul",
    "QuantUpsample",
    "quantized_type",
    "register",
    "supported_types",
]
