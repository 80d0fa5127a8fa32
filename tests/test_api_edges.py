"""Small API edges found by a new user (issue 15): error paths raise cleanly, without warnings."""

from __future__ import annotations

import os
import sys
import types
import warnings

import pytest
import torch

from curvkit.hypergrad import implicit_grad
from curvkit.linalg import available_memory_bytes


def test_hypergrad_non_finite_loss_error_raises_without_a_warning():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    phi = torch.ones((), dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Converting a tensor with requires_grad=True to a scalar"
        with pytest.raises(FloatingPointError, match=r"inner_loss\(\) returned a non-finite value \(nan\)"):
            implicit_grad(lambda: phi * (w**2).sum() * float("nan"), lambda: (w**2).sum(), [w], [phi],
                          curvature="hessian")


def test_available_memory_comes_from_psutil(monkeypatch):
    fake = types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(available=123_456_789))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert available_memory_bytes("cpu") == 123_456_789


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="POSIX only")
def test_available_memory_without_psutil_counts_free_pages(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    assert abs(available_memory_bytes() - free) < 0.5 * free + 2**30


def test_available_memory_with_no_source_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    monkeypatch.delattr(os, "sysconf", raising=False)
    with pytest.raises(RuntimeError, match="cannot determine the available memory.*pip install psutil"):
        available_memory_bytes("cpu")
