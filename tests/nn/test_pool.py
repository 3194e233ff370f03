"""Pooling helpers: when ceil_mode changes an average pool."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from quantaware.nn.pool import ceil_mode_matters


def test_ceil_mode_matters_exactly_when_torch_writes_another_output_size():
    x = torch.zeros(1, 1, 13, 11)
    for k, s, p in itertools.product(range(1, 6), range(1, 4), range(0, 3)):
        if p > k // 2:
            continue
        floor = nn.AvgPool2d(k, s, p)(x).shape
        ceil = nn.AvgPool2d(k, s, p, ceil_mode=True)(x).shape
        assert ceil_mode_matters(k, s, p, x.shape) == (floor != ceil), (k, s, p)


def test_pools_with_no_overhanging_window_compute_the_same_in_both_modes():
    x = torch.randn(2, 3, 9, 9)
    for pool in (dict(kernel_size=3, stride=2, padding=1),
                 dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
                 dict(kernel_size=(3, 1), stride=(2, 1))):
        assert not ceil_mode_matters(pool["kernel_size"], pool["stride"],
                                     pool.get("padding", 0), x.shape)
        torch.testing.assert_close(nn.AvgPool2d(**pool, ceil_mode=True)(x),
                                   nn.AvgPool2d(**pool)(x), rtol=0, atol=0)
    assert ceil_mode_matters(2, None, 0, (9, 8))  # stride defaults to the kernel
