"""The capture's 2-D patch unfolding equals ``F.unfold`` entry for entry (kernel, stride, dilation,
padding, non-square inputs, channels-last memory, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curvkit.capture.rules.conv import unfold_2d


@pytest.mark.parametrize("kernel,dilation,stride", [
    ((3, 3), (1, 1), (1, 1)), ((3, 3), (1, 1), (2, 2)), ((1, 1), (1, 1), (2, 2)),
    ((2, 3), (2, 1), (1, 2)), ((3, 1), (1, 3), (3, 1)), ((5, 5), (2, 2), (2, 3)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unfold_2d_equals_f_unfold(kernel, dilation, stride, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 13, 11, generator=g, dtype=dtype)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), F.pad(x, (1, 2, 2, 1))):
        ref = F.unfold(inp, kernel, dilation=dilation, stride=stride)
        got = unfold_2d(inp, kernel, dilation, stride)
        assert got.shape == ref.shape and got.is_contiguous()
        assert torch.equal(got, ref)
