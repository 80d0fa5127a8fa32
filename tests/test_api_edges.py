"""Small API edges found by a new user (issue 15): error paths raise cleanly, without warnings."""

from __future__ import annotations

import warnings

import pytest
import torch

from curvkit.hypergrad import implicit_grad


def test_hypergrad_non_finite_loss_error_raises_without_a_warning():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    phi = torch.ones((), dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Converting a tensor with requires_grad=True to a scalar"
        with pytest.raises(FloatingPointError, match=r"inner_loss\(\) returned a non-finite value \(nan\)"):
            implicit_grad(lambda: phi * (w**2).sum() * float("nan"), lambda: (w**2).sum(), [w], [phi],
                          curvature="hessian")
