"""Product routes of the outer-product layer factor: explicit columns vs locations, chunked Ẽ."""

from __future__ import annotations

import pytest
import torch

import curvkit.linalg.outer as outer
from curvkit.linalg.outer import OuterProductFactor

f64 = torch.float64


def factor(N, R, T, d_in, d_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, T, d_in, generator=g, dtype=f64)
    e = torch.randn(N * R, T, d_out, generator=g, dtype=f64)
    U = torch.einsum("nrto,ntd->nrod", e.reshape(N, R, T, d_out), a).reshape(N * R, -1).T
    return OuterProductFactor(a.to(dtype), e.to(dtype)), U  # U: dense float64 reference


@pytest.mark.parametrize("shape,explicit", [
    ((4, 1, 6, 3, 2), True),    # T > R and small columns: explicit
    ((4, 2, 1, 3, 2), False),   # T = 1: the location route
    ((3, 1, 2, 40, 30), False),  # columns larger than a and e: the location route
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_routes_agree_with_dense(shape, explicit, dtype):
    f, U = factor(*shape, dtype=dtype)
    assert (f.explicit64() is not None) == explicit
    g = torch.Generator().manual_seed(1)
    X = torch.randn(U.shape[0], 5, generator=g, dtype=f64).to(dtype)
    W = torch.randn(U.shape[1], 5, generator=g, dtype=f64)
    Ud = U.to(dtype).double() if dtype == torch.float32 else U
    Xd = X.double()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == f64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.rmatmat64(X), Ud.T @ Xd, **tol)
    torch.testing.assert_close(f.sub_matmat64(X, W, 0.5).double(), 0.5 * (Xd - Ud @ W), **tol)
    torch.testing.assert_close(f._as64().matmat(W), Ud @ W, **tol)


def test_many_right_hand_sides_are_chunked(monkeypatch):
    """Ẽ (k × d_out × N·T) is bounded by CHUNK_BYTES: the chunked products equal one pass."""
    f, U = factor(3, 2, 3, 4, 5, dtype=f64)
    f._G64 = False  # force the location route
    W = torch.randn(U.shape[1], 7, dtype=f64)
    X = torch.randn(U.shape[0], 7, dtype=f64)
    monkeypatch.setattr(outer, "CHUNK_BYTES", 8 * 5 * 3 * 3 * 2)  # two right-hand sides per chunk
    assert f._rhs_step(8) == 2
    torch.testing.assert_close(f.matmat(W), U @ W, rtol=1e-12, atol=1e-12)
    out = torch.empty_like(X.T).T  # column-major out: the chunks write into column views
    torch.testing.assert_close(f.sub_matmat64(X, W, 2.0, out=out), 2.0 * (X - U @ W),
                               rtol=1e-12, atol=1e-12)
