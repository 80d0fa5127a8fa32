"""Dense float64 tests of the ``"kfac"`` and ``"foof"`` structures.

Ground truths are built without curvkit's capture: layer inputs from plain forward hooks and
``F.unfold``; layer output errors as Jacobians of the model output w.r.t. additive zero offsets on
each layer output (``torch.autograd.functional.jacobian``); output-space Fisher and Fisher
matrices from ``curvkit.testing`` (``torch.func``). BackPACK (KFLR / KFAC) and curvlinops
(``KFACLinearOperator``) are test-only oracles.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import curvkit
from curvkit.capture import UnsupportedLayerError
from curvkit.curvature.kfac import KFACFactors, KroneckerBlockDiagonal, factors_of
from curvkit.linalg import DampingError, SingularError
from curvkit.testing import assert_operator_matches, dense_block_diagonal, dense_fisher, output_fisher
from tests.cases import Case, all_cases, cnn, deep_linear_regression, mlp, regression, single_linear_one_point

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

f64 = torch.float64
LAM = 1e-2


# ---------------------------------------------------------------------- independent factors
def _tracked(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _loss_grad(f: torch.Tensor, y: torch.Tensor, likelihood: str) -> torch.Tensor:
    """``∇_f(−log p(y|f))`` per input, written out for the three likelihoods."""
    if likelihood == "classification":
        return torch.softmax(f, 1) - Fn.one_hot(y, f.shape[1]).to(f.dtype)
    if likelihood == "regression":
        return f - y
    return torch.sigmoid(f) - y


def independent_factors(case: Case, kind: str, sampled: torch.Tensor | None = None):
    """Per tracked layer ``(B̂, Â)`` with the KFC convention, by an independent route."""
    model, x = case.model, case.inputs
    layers = _tracked(model)
    ins, out_shapes = {}, {}

    def rec(mod, inp, out):
        ins[mod], out_shapes[mod] = inp[0].detach(), out.shape

    hs = [m.register_forward_hook(rec) for m in layers]
    with torch.no_grad():
        f = model(x)
    for h in hs:
        h.remove()

    def shifted(*ds):
        handles = [m.register_forward_hook(lambda mod, i, o, d=d: o + d) for m, d in zip(layers, ds)]
        try:
            return model(x)
        finally:
            for h in handles:
                h.remove()

    zeros = tuple(torch.zeros(out_shapes[m], dtype=f64) for m in layers)
    jac = torch.autograd.functional.jacobian(shifted, zeros)
    N = x.shape[0]
    idx = torch.arange(N)
    result = []
    for m, J in zip(layers, jac):
        Jd = J[idx, :, idx].reshape(N, f.shape[1], m.weight.shape[0], -1)  # (N, C, o, T)
        T = Jd.shape[-1]
        if kind == "exact":
            Lam = output_fisher(f, case.likelihood)
            B = torch.einsum("ncot,ncd,ndpt->op", Jd, Lam, Jd) / (N * T)
        else:
            ys = case.targets.unsqueeze(0) if kind == "empirical" else sampled
            B = torch.zeros(Jd.shape[2], Jd.shape[2], dtype=f64)
            for y in ys:
                e = torch.einsum("ncot,nc->not", Jd, _loss_grad(f, y, case.likelihood))
                B += torch.einsum("not,npt->op", e, e) / (N * T * ys.shape[0])
        a = ins[m]
        if isinstance(m, nn.Conv2d):
            a = Fn.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                          stride=m.stride).transpose(1, 2)
        else:
            a = a.unsqueeze(1)
        if m.bias is not None:
            a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=f64)], 2)
        A = torch.einsum("ntd,nte->de", a, a) / N
        result.append((B.contiguous(), A.contiguous()))
    return result


def to_param_space(F: curvkit.Curvature, L: torch.Tensor) -> torch.Tensor:
    """Layer-space matrix ``L`` -> parameter-space matrix (``F.index`` maps the layouts)."""
    D = torch.zeros_like(L)
    D[F.index[:, None], F.index[None, :]] = L
    return D


def kron_dense(factors, damping: float | None = None, mode: str = "exact") -> torch.Tensor:
    blocks = []
    for B, A in factors:
        if mode == "heuristic":
            pi = math.sqrt((A.trace() / A.shape[0]) / (B.trace() / B.shape[0]))
            lam_a, lam_b = pi * math.sqrt(damping), math.sqrt(damping) / pi
            blocks.append(torch.kron(B + lam_b * torch.eye(B.shape[0], dtype=f64),
                                     A + lam_a * torch.eye(A.shape[0], dtype=f64)))
        else:
            K = torch.kron(B, A)
            blocks.append(K if damping is None else K + damping * torch.eye(K.shape[0], dtype=f64))
    return torch.block_diag(*blocks)


def build(case: Case, structure: str = "kfac", kind: str = "exact", **kw) -> curvkit.Curvature:
    return curvkit.fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood,
                          kind=kind, structure=structure, **kw)


# ---------------------------------------------------------------------- KFAC vs independent factors
KIND_CASES = [(c, k) for c in all_cases() for k in ("exact", "empirical", "mc")
              if k == "exact" or c.name in ("mlp_bias", "cnn", "regression")]


@pytest.mark.parametrize("case,kind", KIND_CASES, ids=[f"{c.name}-{k}" for c, k in KIND_CASES])
def test_kfac_equals_kron_of_independent_factors(case, kind):
    F = build(case, kind=kind, mc_samples=3, generator=torch.Generator().manual_seed(1))
    sampled = F.captured.sampled if kind == "mc" else None
    ref = independent_factors(case, kind, sampled)
    facs = factors_of(F)
    for (B, A), A_c, B_c in zip(ref, facs.A, facs.B):
        torch.testing.assert_close(A_c, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(B_c, B, rtol=1e-10, atol=1e-12)
    assert_operator_matches(F, to_param_space(F, kron_dense(ref)), damping=LAM)


def test_kfac_linear_factors_closed_form():
    """Linear layer, T = 1: ``Â = (1/N) Σ ã ãᵀ`` and ``B̂ = (1/N) Σ_n Σ_c p_c e_c e_cᵀ``."""
    case = single_linear_one_point()
    lin = case.model[0]
    F = build(case)
    x = case.inputs
    a = torch.cat([x, torch.ones(1, 1, dtype=f64)], 1)
    p = torch.softmax(lin(x), 1)[0]
    B = torch.diag(p) - torch.outer(p, p)  # Σ_c p_c (p − 1_c)(p − 1_c)ᵀ, N = 1
    torch.testing.assert_close(factors_of(F).A[0], a.T @ a)
    torch.testing.assert_close(factors_of(F).B[0], B)


# ---------------------------------------------------------------------- where KFAC is exact
EXACT_CASES = [c for c in [single_linear_one_point(), deep_linear_regression()] if "kfac_exact" in c.tags]


@pytest.mark.parametrize("case", EXACT_CASES, ids=[c.name for c in EXACT_CASES])
def test_kfac_equals_block_diagonal_fisher_where_exact(case):
    F = build(case, kind="exact")
    dense = dense_fisher(case.model, case.inputs, case.targets, likelihood=case.likelihood, kind="exact")
    sizes = [sum(p.numel() for p in m.parameters()) for m in _tracked(case.model)]
    assert_operator_matches(F, dense_block_diagonal(dense, sizes), damping=LAM)


# ---------------------------------------------------------------------- damping modes (eqs 3–4)
@pytest.mark.parametrize("case", [mlp(True), cnn()], ids=["mlp_bias", "cnn"])
@pytest.mark.parametrize("lam", [1e-3, 1.0])
def test_damping_modes_match_dense_solves(case, lam):
    F = build(case)
    ref = independent_factors(case, "exact")
    v = torch.randn(F.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    op = F.operator
    assert isinstance(op, KroneckerBlockDiagonal)
    for mode in ("exact", "heuristic"):
        D = kron_dense(ref, lam, mode)
        torch.testing.assert_close(op.damped_dense(lam, mode), D, rtol=1e-10, atol=1e-12)
        x_ref = torch.linalg.solve(to_param_space(F, D), v)
        x = F.solve(v, lam, damping_mode=mode)
        torch.testing.assert_close(x, x_ref, rtol=1e-8, atol=1e-10 * float(x_ref.abs().max()))
        x_inv = F.inverse(lam, damping_mode=mode) @ v
        torch.testing.assert_close(x_inv, x_ref, rtol=1e-8, atol=1e-10 * float(x_ref.abs().max()))
    for (lam_a, lam_b), (B, A) in zip(op.damping_splits(lam), ref):
        assert lam_a * lam_b == pytest.approx(lam)
        assert lam_a / lam_b == pytest.approx(B.shape[0] * A.trace() / (A.shape[0] * B.trace()))


def test_heuristic_damping_is_larger_than_standard():
    """The heuristic matrix adds the cross terms ``λ_B Â ⊗ I + λ_A I ⊗ B̂`` (paper §3)."""
    case = mlp(True)
    op = build(case).operator
    lam = 1e-3
    diff = op.damped_dense(lam, "heuristic") - op.damped_dense(lam, "exact")
    assert torch.linalg.eigvalsh(diff).min() > -1e-12
    assert diff.trace() > 0


# ---------------------------------------------------------------------- FOOF
@pytest.mark.parametrize("case", [mlp(True), cnn(), regression()], ids=["mlp_bias", "cnn", "regression"])
def test_foof_matches_dense(case):
    F = build(case, structure="foof")
    ref = independent_factors(case, "exact")
    eye_b = [(torch.eye(B.shape[0], dtype=f64), A) for B, A in ref]
    assert_operator_matches(F, to_param_space(F, kron_dense(eye_b)), damping=LAM)
    facs = factors_of(F)
    assert all(B is None for B in facs.B) and facs.kind is None
    # solve(v, λ) = V (Â + λI)⁻¹ per layer
    v = torch.randn(F.shape[0], generator=torch.Generator().manual_seed(3), dtype=f64)
    X = F.layer_matrices(F.solve(v, LAM))
    for Xl, Vl, (_, A) in zip(X, F.layer_matrices(v), ref):
        torch.testing.assert_close(Xl, Vl @ torch.linalg.inv(A + LAM * torch.eye(A.shape[0], dtype=f64)))


def test_foof_needs_forward_only_and_ignores_kind():
    case = mlp(True)
    # kind="empirical" without targets would fail in a backward capture; FOOF never runs one
    F = curvkit.fisher(case.model, case.inputs, None, kind="empirical", structure="foof")
    assert F.captured is None
    G = curvkit.fisher(case.model, case.inputs, None, kind="exact", structure="foof")
    torch.testing.assert_close(F.to_dense(), G.to_dense())
    # the same Â as KFAC
    K = build(case)
    for A_f, A_k in zip(factors_of(F).A, factors_of(K).A):
        torch.testing.assert_close(A_f, A_k)


def test_foof_damped_matrix():
    case = mlp(False)
    op = build(case, structure="foof").operator
    ref = independent_factors(case, "exact")
    D = torch.block_diag(*[torch.kron(torch.eye(B.shape[0], dtype=f64), A) for B, A in ref])
    torch.testing.assert_close(op.damped_dense(0.5), D + 0.5 * torch.eye(D.shape[0], dtype=f64))
    # a constant tensor is the scalar; a per-parameter damping has no damped Kronecker matrix
    torch.testing.assert_close(op.damped_dense(torch.full((D.shape[0],), 0.5, dtype=f64)),
                               op.damped_dense(0.5))
    with pytest.raises(DampingError, match="damped_dense with a per-parameter damping .* pass a number"):
        op.damped_dense(torch.linspace(0.1, 1.0, D.shape[0], dtype=f64))


# ---------------------------------------------------------------------- exposed factors
def test_factors_are_exposed():
    case = mlp(True)
    F = build(case)
    facs = factors_of(F)
    assert isinstance(facs, KFACFactors) and len(facs) == 2 and facs.kind == "exact"
    assert facs.num_data == case.inputs.shape[0]
    assert [A.shape for A in facs.A] == [(6, 6), (5, 5)]
    assert [B.shape for B in facs.B] == [(4, 4), (3, 3)]
    assert set(facs.by_name()) == {"0", "2"}
    with pytest.raises(TypeError, match="has no Kronecker factors; build it with"):
        factors_of(build(case, structure="full"))


# ---------------------------------------------------------------------- oracles
def _backpack_kron(case: Case, ext_name: str, **kw):
    backpack = pytest.importorskip("backpack")
    from backpack import extensions

    model = backpack.extend(copy.deepcopy(case.model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss(reduction="mean"))
    loss = loss_fn(model(case.inputs), case.targets)
    with backpack.backpack(getattr(extensions, ext_name)(**kw)):
        loss.backward()
    field = ext_name.lower()
    return [getattr(m.weight, field) for m in _tracked(model)]


def test_linear_factors_match_backpack_kflr():
    """BackPACK's KFLR on a Linear weight is ``[B̂, Â_w]`` (mean reduction: same 1/N scaling)."""
    case = mlp(True)
    facs = factors_of(build(case))
    for (B_bp, A_bp), A, B in zip(_backpack_kron(case, "KFLR"), facs.A, facs.B):
        torch.testing.assert_close(B, B_bp, rtol=1e-10, atol=1e-12)
        d = A_bp.shape[0]  # BackPACK's input factor has no bias row/column
        torch.testing.assert_close(A[:d, :d], A_bp, rtol=1e-10, atol=1e-12)


def test_linear_factors_match_backpack_kfac_in_expectation():
    case = mlp(True, n=4)
    S = 200  # N·S = 800 draws: Frobenius error about 3%
    torch.manual_seed(0)
    bp = _backpack_kron(case, "KFAC", mc_samples=S)
    mc = factors_of(build(case, kind="mc", mc_samples=S, generator=torch.Generator().manual_seed(0)))
    exact = factors_of(build(case))
    for (B_bp, _), B_mc, B_ex in zip(bp, mc.B, exact.B):
        for B in (B_bp, B_mc):
            assert torch.linalg.norm(B - B_ex) / torch.linalg.norm(B_ex) < 0.1


@pytest.mark.parametrize("case,kind,fisher_type", [
    (mlp(True), "exact", "type-2"), (cnn(), "exact", "type-2"), (mlp(True), "empirical", "empirical"),
    (regression(), "exact", "type-2"),
], ids=["mlp-type2", "cnn-type2", "mlp-empirical", "regression-type2"])
def test_kfac_matches_curvlinops(case, kind, fisher_type):
    """curvlinops' KFAC-expand equals B̂ ⊗ Â; its MSELoss(mean) Fisher is (2/C)·curvkit's."""
    curvlinops = pytest.importorskip("curvlinops")
    loss = {"classification": nn.CrossEntropyLoss, "regression": nn.MSELoss}[case.likelihood]
    params = [p for p in case.model.parameters()]
    K = curvlinops.KFACLinearOperator(
        case.model, loss(reduction="mean"), params, [(case.inputs, case.targets)],
        fisher_type=fisher_type, separate_weight_and_bias=False, check_deterministic=False)
    P = sum(p.numel() for p in params)
    dense = K @ torch.eye(P, dtype=f64)
    scale = case.num_classes / 2 if case.likelihood == "regression" else 1.0
    F = build(case, kind=kind)
    torch.testing.assert_close(F.to_dense(), scale * dense, rtol=1e-9, atol=1e-12)


def test_foof_matches_curvlinops_forward_only():
    curvlinops = pytest.importorskip("curvlinops")
    case = cnn()
    params = list(case.model.parameters())
    K = curvlinops.KFACLinearOperator(
        case.model, nn.CrossEntropyLoss(), params, [(case.inputs, case.targets)],
        fisher_type="forward-only", separate_weight_and_bias=False, check_deterministic=False)
    # curvlinops puts 1/T into Â for convolutions (expand); FOOF keeps Σ_t (KFC's Ω)
    F = build(case, structure="foof")
    dense = K @ torch.eye(F.shape[0], dtype=f64)
    locations = []  # T per layer: output positions of a convolution, 1 for the Linear
    hs = [m.register_forward_hook(lambda mod, i, o: locations.append(o[0, 0].numel()))
          for m in _tracked(case.model)]
    with torch.no_grad():
        case.model(case.inputs)
    for h in hs:
        h.remove()
    L = F.to_layer_space(F.to_layer_space(dense).T).T
    off = 0
    for i, layer in enumerate(F.layers):
        s = layer.size
        L[off:off + s, off:off + s] *= locations[i]
        off += s
    torch.testing.assert_close(F.to_dense(), to_param_space(F, L), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- bad input
class _WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.norm(self.lin(x)))


def test_layers_without_kronecker_form():
    """kfac: a norm layer's block is its exact Fisher block; foof refuses it by name.
    Grouped convolutions are per-group Kronecker blocks."""
    model = _WithNorm().double()
    x = torch.randn(3, 3, dtype=f64)
    with pytest.raises(UnsupportedLayerError,
                       match=r"structure='foof' needs a Kronecker form.*'norm' \(LayerNorm\)"):
        curvkit.fisher(model, x, structure="foof")
    F = curvkit.fisher(model, x, structure="kfac")
    full = curvkit.fisher(model, x).to_dense()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:names.index("norm.weight")])
    sl = slice(start, start + 2 * model.norm.weight.numel())
    assert torch.allclose(F.to_dense()[sl, sl], full[sl, sl], atol=1e-12)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(8, 2)).double()
    G = curvkit.fisher(grouped, torch.randn(2, 2, 2, 2, dtype=f64), structure="kfac")
    assert [layer.d_out for layer in G.layers] == [1, 1, 2]


@pytest.mark.parametrize("structure", ["full", "block_diag", "diag"])
def test_heuristic_damping_unavailable_elsewhere(structure):
    case = mlp(True)
    F = build(case, structure=structure)
    v = torch.ones(F.shape[0], dtype=f64)
    msg = r"damping_mode='heuristic' is not available .* supports \['exact'\]"
    with pytest.raises(ValueError, match=msg):
        F.solve(v, 1e-3, damping_mode="heuristic")


def test_unknown_damping_mode_lists_modes():
    F = build(mlp(True))
    with pytest.raises(ValueError, match=r"supports \['exact', 'heuristic'\]"):
        F.solve(torch.ones(F.shape[0], dtype=f64), 1e-3, damping_mode="tikhonov")


def test_unknown_options_and_zero_damping():
    case = mlp(True)
    with pytest.raises(TypeError, match="structure='kfac' takes no options"):
        build(case, route="dual")
    F = build(case)
    with pytest.raises(SingularError, match="pass damping > 0"):
        F.solve(torch.ones(F.shape[0], dtype=f64), 0.0)


def test_heuristic_damping_with_zero_factors_is_finite():
    """``B̂ = 0`` (errors vanish) and ``Â = 0`` (zero inputs, no bias): π is guarded to 1."""
    case = regression()
    with torch.no_grad():
        perfect = case.model(case.inputs)  # empirical errors f − y = 0 -> B̂ = 0
    F = curvkit.fisher(case.model, case.inputs, perfect, likelihood="regression", kind="empirical",
                       structure="kfac")
    assert all(float(B.abs().max()) == 0 for B in factors_of(F).B)
    lam = 1e-3
    v = torch.randn(F.shape[0], generator=torch.Generator().manual_seed(0), dtype=f64)
    for mode in ("exact", "heuristic"):
        x = F.solve(v, lam, damping_mode=mode)
        assert torch.isfinite(x).all()
    torch.testing.assert_close(F.solve(v, lam), v / lam)
    # π = 1: λ_A = λ_B = √λ, so X = V (Â + √λ I)⁻¹ / √λ per layer
    x = F.solve(v, lam, damping_mode="heuristic")
    r = math.sqrt(lam)
    for Xl, Vl, A in zip(F.layer_matrices(x), F.layer_matrices(v), factors_of(F).A):
        torch.testing.assert_close(Xl, Vl @ torch.linalg.inv(A + r * torch.eye(A.shape[0], dtype=f64)) / r)

    zero_in = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    x0 = torch.zeros(4, 3, dtype=f64)
    G = curvkit.fisher(zero_in, x0, structure="kfac")
    assert float(factors_of(G).A[0].abs().max()) == 0
    w = torch.randn(G.shape[0], dtype=f64)
    for mode in ("exact", "heuristic"):
        assert torch.isfinite(G.solve(w, lam, damping_mode=mode)).all()
        assert torch.isfinite(G.operator.damped_dense(lam, mode)).all()


def test_float32_rank_deficient_factors_do_not_crash():
    """Paper-sized float32 MLP, N = 32 < d_in: rank-deficient Â at damping 1e-3 (ASDL crashes)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(32, 64, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    lam = 1e-3
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    for structure in ("kfac", "foof"):
        F = curvkit.fisher(model, x, y, kind="mc", structure=structure, generator=g)
        assert F.dtype == torch.float32
        for mode in ("exact", "heuristic"):
            out = F.solve(v, lam, damping_mode=mode)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
        # the float32 operator factorises in float64: compare with float64 factors
        facs = factors_of(F)
        assert torch.linalg.matrix_rank(facs.A[1].double(), rtol=1e-5) <= 33  # N + bias column
        V = F.layer_matrices(v)[1].double()
        B64 = None if facs.B[1] is None else facs.B[1].double()
        K64 = curvkit.linalg.Kronecker(B64, facs.A[1].double(), d_out=256)
        ref = K64.solve_matrix(V, lam)
        got = F.layer_matrices(F.solve(v, lam))[1].double()
        assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < 1e-4
