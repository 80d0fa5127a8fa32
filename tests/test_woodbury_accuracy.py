"""Woodbury solves on *gradient* right-hand sides with a small damping, against dense float64.

A loss gradient lies mostly in the span of the Fisher's columns, where the dual route
``x = (v − U w)/λ`` multiplies every product error by up to ``σ²_max/λ`` (see
``curvkit.linalg.woodbury``). The tolerances are derived from the float32 *representation
limit* — the residual of the exact (dense float64) solution rounded to float32 — not guessed:
a solve whose products are exact up to float64 round-off returns the exact solution rounded once,
so each entry is within one float32 ulp of it and the residual is within a small factor of the
limit. float64 solves must stay at ≤ 1e-10 relative residual (the stated requirement).

Ground truth: ``U`` built column by column from the captured float32 layer inputs/errors in
float64 (explicit outer products), the Fisher of the float64 model from ``torch.func``
(``curvkit.testing.dense_fisher``) to check that ``U Uᵀ`` is the Fisher, and ``torch.linalg``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.linalg import DenseFactor, OuterProductFactor, StackedFactor, Woodbury
from curvkit.testing import dense_fisher

f64 = torch.float64
DAMPING = 1e-4
ULP32 = 2.0**-23  # float32 spacing relative to the value (one ulp at most 2⁻²³·|x|)


def _model(dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
                         nn.Linear(16, 5)).to(dtype)


def _data(dtype: torch.dtype, seed: int, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return 3.0 * torch.randn(n, 8, generator=g, dtype=f64).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _explicit_layer_U(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``(d_out·d_in, M)`` in float64, column ``m`` = ``vec_r(Σ_t e_{mt} a_{n t}ᵀ)`` by loops."""
    a, e = a.to(f64), e.to(f64)
    R = e.shape[0] // a.shape[0]
    cols = []
    for m in range(e.shape[0]):
        G = sum(torch.outer(e[m, t], a[m // R, t]) for t in range(a.shape[1]))
        cols.append(G.reshape(-1))
    return torch.stack(cols, dim=1)


def _dense_param_space(F, structure: str) -> torch.Tensor:
    """``F`` as a dense float64 matrix in parameter space, from explicit per-layer ``U``."""
    Us = [_explicit_layer_U(a, e) for a, e in zip(F.captured.a, F.captured.e)]
    if structure == "full":
        U = torch.cat(Us, dim=0)
        A_layer = U @ U.T
    else:
        A_layer = torch.block_diag(*[U @ U.T for U in Us])
    idx = F.index
    A = torch.empty_like(A_layer)
    A[idx[:, None], idx[None, :]] = A_layer
    return A


def _residual(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> float:
    x, b = x.to(f64), b.to(f64)
    return float((A @ x + DAMPING * x - b).norm() / b.norm())


def _flat(v) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in v])


def _build(kind: str, structure: str, dtype: torch.dtype, seed: int):
    model = _model(dtype, seed)
    x, y = _data(dtype, seed)
    F = curvkit.fisher(model, x, y, kind=kind, structure=structure,
                       generator=torch.Generator().manual_seed(seed))
    return model, x, y, F


CASES = [(kind, structure) for kind in ("mc", "exact", "empirical") for structure in ("full", "block_diag")]


@pytest.mark.parametrize("kind,structure", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_gradient_solve_is_the_rounded_exact_solution(kind, structure, seed):
    model, x, y, F = _build(kind, structure, torch.float32, seed)
    g = _gradient(model, x, y)
    sol = _flat(F.solve(g, DAMPING))
    assert sol.dtype == torch.float32
    A = _dense_param_space(F, structure)
    b = _flat(g).to(f64)
    L = torch.linalg.cholesky(A + DAMPING * torch.eye(A.shape[0], dtype=f64))
    x_ref = torch.cholesky_solve(b[:, None], L)[:, 0]
    limit = _residual(A, x_ref.float(), b)
    # the solve is the exact solution rounded once: within one float32 ulp entrywise ...
    err = (sol.to(f64) - x_ref).abs()
    assert (err <= ULP32 * x_ref.abs() + 1e-12 * x_ref.abs().max()).all(), float((err / x_ref.abs()).max())
    # ... so its residual is within a small factor of the float32 representation limit
    assert _residual(A, sol, b) <= 3.0 * limit, (_residual(A, sol, b), limit)


@pytest.mark.parametrize("kind,structure", CASES)
def test_float64_gradient_solve(kind, structure):
    model, x, y, F = _build(kind, structure, f64, seed=0)
    g = _gradient(model, x, y)
    sol = _flat(F.solve(g, DAMPING))
    A = _dense_param_space(F, structure)
    if structure == "full":  # U Uᵀ from the captured factors is the Fisher of the model
        D = dense_fisher(model, x, F.captured.sampled if kind == "mc" else y, kind=kind)
        torch.testing.assert_close(A, D, rtol=1e-10, atol=1e-12)
    assert _residual(A, sol, _flat(g)) <= 1e-10


def test_float32_gradient_fisher_matches_the_model():
    """The float32 factor is the float64 model's Fisher up to float32 rounding of a and e."""
    model, x, y, F = _build("exact", "full", torch.float32, seed=0)
    A = _dense_param_space(F, "full")
    D = dense_fisher(model.double(), x.double(), kind="exact")
    torch.testing.assert_close(A, D, rtol=1e-4, atol=1e-5 * float(D.abs().max()))


@pytest.mark.parametrize("route", ["dual", "primal"])
def test_float32_dense_factor_span_rhs(route):
    """A right-hand side entirely in ``span(U)`` (the worst case for cancellation)."""
    g = torch.Generator().manual_seed(3)
    U = torch.randn(40, 6, generator=g, dtype=f64) * torch.logspace(0, 1, 6, dtype=f64)
    op = Woodbury(DenseFactor(U.float()), route=route)
    U64 = U.float().to(f64)
    A = U64 @ U64.T
    b = U64 @ torch.randn(6, generator=g, dtype=f64)
    b32 = b.float()
    x_ref = torch.linalg.solve(A + DAMPING * torch.eye(40, dtype=f64), b32.to(f64))
    limit = _residual(A, x_ref.float(), b32)
    sol = op.solve(b32, DAMPING)
    assert _residual(A, sol, b32) <= 3.0 * limit


def test_float64_accumulated_products_match_dense():
    """``gram64``, ``rmatmat64`` and ``sub_matmat64`` of layer factors (dense and conv-like)."""
    g = torch.Generator().manual_seed(4)
    dense = OuterProductFactor(torch.randn(5, 1, 7, generator=g), torch.randn(10, 1, 3, generator=g))
    conv = OuterProductFactor(torch.randn(5, 4, 7, generator=g), torch.randn(5, 4, 3, generator=g))
    for fac in (dense, conv, StackedFactor([dense, OuterProductFactor(
            torch.randn(5, 1, 2, generator=g), torch.randn(10, 1, 4, generator=g))])):
        U = (torch.cat([_explicit_layer_U(b.a, b.e) for b in fac.blocks]) if isinstance(fac, StackedFactor)
             else _explicit_layer_U(fac.a, fac.e))
        X = torch.randn(fac.size, 3, generator=g)
        W = torch.randn(fac.rank, 3, generator=g, dtype=f64)
        torch.testing.assert_close(fac.gram64(), U.T @ U, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(fac.rmatmat64(X), U.T @ X.to(f64), rtol=1e-13, atol=1e-13)
        ref = (X.to(f64) - U @ W) * 7.0
        out = fac.sub_matmat64(X, W, 7.0)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref.float(), rtol=0, atol=0)
        torch.testing.assert_close(fac.sub_matmat64(X.T.contiguous().T, W, 7.0), ref.float(), rtol=0, atol=0)
        X64 = X.to(f64)  # float64 right-hand sides: the result is fresh, X is left unchanged
        keep = X64.clone()
        torch.testing.assert_close(fac.sub_matmat64(X64, W, 7.0), ref, rtol=1e-13, atol=1e-13)
        assert torch.equal(X64, keep)


@pytest.mark.parametrize("chunk", [None, 20])
def test_float64_draw_blocks_match_dense(chunk, monkeypatch):
    """The working copies of Laplace draws: ``Uᵀ Y`` and ``r ⊙ s·(Y − U W)`` rounded once, exactly."""
    if chunk is not None:  # several right-hand-side chunks per layer
        import curvkit.linalg.outer as outer_mod

        monkeypatch.setattr(outer_mod, "CHUNK64", chunk)
    g = torch.Generator().manual_seed(6)
    dense = OuterProductFactor(torch.randn(5, 1, 7, generator=g), torch.randn(10, 1, 3, generator=g))
    mc = OuterProductFactor(torch.randn(5, 1, 7, generator=g), torch.randn(5, 1, 3, generator=g))
    conv = OuterProductFactor(torch.randn(5, 4, 7, generator=g), torch.randn(5, 4, 3, generator=g))
    explicit = DenseFactor(torch.randn(21, 10, generator=g))
    for fac in (dense, mc, conv, explicit):
        U = fac.U.to(f64) if isinstance(fac, DenseFactor) else _explicit_layer_U(fac.a, fac.e)
        Y = torch.randn(3, 2 * fac.size, generator=g)[:, fac.size:]  # a strided (k, P) view
        W = torch.randn(fac.rank, 3, generator=g, dtype=f64)
        r = torch.rand(fac.size, generator=g, dtype=f64) + 0.5
        for rr in (None, r):
            B = fac.block64(Y)
            torch.testing.assert_close(fac.block_rmatmat64(B), U.T @ Y.T.to(f64), rtol=1e-13, atol=1e-13)
            fac.block_sub_matmat64_(B, W, 7.0)
            out = torch.full((3, fac.size), float("nan"))
            fac.block_store(B, out, rr)
            ref = (Y.T.to(f64) - U @ W) * 7.0 * (1.0 if rr is None else rr[:, None])
            torch.testing.assert_close(out, ref.T.float(), rtol=0, atol=0)


def test_benchmark_smoke(tmp_path):
    """``benchmarks/woodbury_solve.py`` runs (tiny widths) and its solve sits at the float32 limit."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "woodbury_solve.py"
    spec = importlib.util.spec_from_file_location("woodbury_solve_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--widths", "30", "20", "20", "5", "--ns", "8", "--rounds", "1", "--min-time", "0",
                      "--no-cg",
                      "--out", str(tmp_path / "w.json")])
    (row,) = out["rows"]
    for rhs in ("random", "gradient"):
        acc = row["accuracy"][0][rhs]
        assert acc["curvkit"] <= 3.0 * acc["limit"]
    assert row["ratios"]["solve/fwd_bwd"]["median"] > 0
    assert (tmp_path / "w.json").exists()


@pytest.mark.parametrize("per_parameter", [False, True])
def test_float32_posterior_sample_is_the_rounded_exact_draw(per_parameter):
    """Laplace draws ``δ^{-1/2}(y − U Ĉ⁻¹(Uᵀy + √δ z))`` (perturbation trick) at a small damping.

    ``y − U w`` nearly cancels along the top Fisher directions; with the products accumulated in
    float64 the float32 draw is the exact (dense float64) draw of the same ``y, z`` rounded once.
    """
    g = torch.Generator().manual_seed(5)
    U = torch.randn(60, 8, generator=g, dtype=f64) * torch.logspace(2, 4, 8, dtype=f64)
    U32 = U.float()
    U64 = U32.to(f64)
    op = Woodbury(DenseFactor(U32), route="dual")
    d = (torch.rand(60, generator=g, dtype=f64) + 0.5) * 1e-4 if per_parameter else 1e-4
    k = 3
    s32 = op.sample(k, d.float() if per_parameter else d, generator=torch.Generator().manual_seed(9))
    assert s32.dtype == torch.float32
    gen = torch.Generator().manual_seed(9)  # the same draws, replayed in float64
    y = torch.randn(k, 60, generator=gen, dtype=torch.float32).T.to(f64)
    z = torch.randn(8, k, generator=gen, dtype=f64)
    r = (d if per_parameter else torch.full((60,), d, dtype=f64)).float().to(f64).rsqrt()
    V = r[:, None] * U64
    C = V.T @ V + torch.eye(8, dtype=f64)
    s64 = r[:, None] * (y - V @ torch.linalg.solve(C, V.T @ y + z))
    # Along the Fisher columns (what J θ sees in a predictive), the draw is within 10× of the
    # float32 representation limit (the exact draw rounded once; the criterion). Measured
    # here: ≤ 3.6× with the float64-accumulated y − U w, up to 6× with the float32 products.
    err = (U64.T @ (s32.to(f64) - s64)).norm(dim=0)
    limit = (U64.T @ (s64.float().to(f64) - s64)).norm(dim=0)
    assert (err <= 10.0 * limit).all(), (err / limit).tolist()
