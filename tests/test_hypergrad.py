"""Implicit hypergradients: closed-form ridge IFT, GGN gap on a tiny MLP, finite differences, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn
from torch.func import functional_call

import curvkit
from curvkit.hypergrad import conjugate_gradient, implicit_grad
from curvkit.linalg import SingularError
from curvkit.testing import dense_fisher

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 problems: one intra-op thread (avoids oversubscription on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- ridge regression
class Ridge:
    """``L_T = (1/N) Σ ½‖W̃x̃ − y‖² + ½ φ_w‖W‖² + ½ φ_b‖b‖²``, ``L_V`` the same data term on val.

    With ``x̃ = [x, 1]`` each output column is an independent ridge problem with
    ``A = X̃ᵀX̃/N + Φ``, ``Φ = diag(φ_w, …, φ_w, φ_b)``: ``w̃_c = A⁻¹ X̃ᵀ y_c / N``,
    ``dw̃_c/dφ_k = −A⁻¹ Φ_k w̃_c`` and ``dL_V/dφ_k = Σ_c ∇_{w̃_c}L_Vᵀ dw̃_c/dφ_k`` (closed form).
    """

    def __init__(self, bias: bool, seed: int = 0, d: int = 5, C: int = 2, N: int = 30, Nv: int = 20):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(N, d, generator=g, dtype=D64)
        self.Y = torch.randn(N, C, generator=g, dtype=D64)
        self.Xv = torch.randn(Nv, d, generator=g, dtype=D64)
        self.Yv = torch.randn(Nv, C, generator=g, dtype=D64)
        self.bias, self.d = bias, d
        self.model = nn.Linear(d, C, bias=bias).double()
        self.phi = torch.tensor([0.3, 0.05][: 1 + bias], dtype=D64, requires_grad=True)

    def _aug(self, X):
        return torch.cat([X, torch.ones(X.shape[0], 1, dtype=D64)], 1) if self.bias else X

    def _phi_diag(self, phi):
        w = torch.full((self.d,), float(phi[0].detach()), dtype=D64)
        return torch.cat([w, phi[1:].detach()]) if self.bias else w

    def solve_inner(self) -> None:
        Xa, N = self._aug(self.X), self.X.shape[0]
        A = Xa.T @ Xa / N + torch.diag(self._phi_diag(self.phi))
        Wt = torch.linalg.solve(A, Xa.T @ self.Y / N).T  # (C, d[+1])
        with torch.no_grad():
            self.model.weight.copy_(Wt[:, : self.d])
            if self.bias:
                self.model.bias.copy_(Wt[:, self.d])

    def inner(self) -> torch.Tensor:
        data = 0.5 * ((self.model(self.X) - self.Y) ** 2).sum(1).mean()
        reg = 0.5 * self.phi[0] * (self.model.weight**2).sum()
        if self.bias:
            reg = reg + 0.5 * self.phi[1] * (self.model.bias**2).sum()
        return data + reg

    def outer(self) -> torch.Tensor:
        return 0.5 * ((self.model(self.Xv) - self.Yv) ** 2).sum(1).mean()

    def closed_form(self) -> torch.Tensor:
        Xa, Xva, N = self._aug(self.X), self._aug(self.Xv), self.X.shape[0]
        A = Xa.T @ Xa / N + torch.diag(self._phi_diag(self.phi))
        Wt = torch.linalg.solve(A, Xa.T @ self.Y / N).T
        gV = (Xva @ Wt.T - self.Yv).T @ Xva / self.Xv.shape[0]  # (C, d[+1])
        out = []
        for k in range(self.phi.numel()):
            mask = torch.zeros(Wt.shape[1], dtype=D64)
            mask[: self.d] = 1.0 if k == 0 else 0.0
            if k == 1:
                mask[self.d] = 1.0
            dW = -torch.linalg.solve(A, (Wt * mask).T).T
            out.append((gV * dW).sum())
        return torch.stack(out)

    def damping(self):
        phi = self.phi.detach()
        return [phi[0], phi[1]] if self.bias else float(phi[0])

    def params(self):
        return list(self.model.parameters())


def _assert_close(a, b, tol=1e-8):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("route", ["primal", "dual"])
@pytest.mark.parametrize("bias", [False, True], ids=["scalar_wd", "per_param_wd"])
def test_ridge_fisher_is_exact(bias, route):
    """Linear model + squared loss with the mean scaling: F + Φ is the Hessian, so IFT is exact."""
    r = Ridge(bias)
    r.solve_inner()
    F = curvkit.fisher(r.model, r.X, likelihood="regression", kind="exact", route=route)
    hg, info = implicit_grad(r.inner, r.outer, r.params(), [r.phi], curvature=F,
                             damping=r.damping(), return_info=True)
    _assert_close(hg[0], r.closed_form())
    assert info["method"] == ("operator-pcg" if bias else "operator-solve")
    assert info["residual"] < 1e-10


def test_sum_scaled_inner_loss_uses_scaled_operator():
    """``L_T = Σₙ ½‖Wxₙ − yₙ‖² + (φ/2)‖W‖²`` has ``H = N·F + φI``: pass ``curvature=N * F``."""
    r = Ridge(False)
    N = r.X.shape[0]
    with torch.no_grad():  # θ* of the summed problem: (XᵀX + φI)⁻¹ Xᵀy
        A = r.X.T @ r.X + r.phi.detach() * torch.eye(r.d, dtype=D64)
        r.model.weight.copy_(torch.linalg.solve(A, r.X.T @ r.Y).T)

    def inner():
        return 0.5 * ((r.model(r.X) - r.Y) ** 2).sum() + 0.5 * r.phi[0] * (r.model.weight**2).sum()

    W = r.model.weight.detach()
    gV = (r.Xv @ W.T - r.Yv).T @ r.Xv / r.Xv.shape[0]
    ref = (gV * -torch.linalg.solve(A, W.T).T).sum()
    F = curvkit.fisher(r.model, r.X, likelihood="regression", kind="exact")
    for damping in (float(r.phi.detach()), [r.phi.detach()[0]]):
        hg = implicit_grad(inner, r.outer, r.params(), [r.phi], curvature=N * F, damping=damping)
        _assert_close(hg[0], ref.reshape(1))


@pytest.mark.parametrize("method", ["dense", "cg"])
@pytest.mark.parametrize("bias", [False, True])
def test_ridge_hessian_reference(bias, method):
    r = Ridge(bias)
    r.solve_inner()
    hg, info = implicit_grad(r.inner, r.outer, r.params(), [r.phi], curvature="hessian", damping=0.0,
                             method=method, return_info=True)
    _assert_close(hg[0], r.closed_form())
    assert info["method"] == f"hessian-{method}"


@pytest.mark.parametrize("structure", ["kfac", "block_diag"])
def test_ridge_structures_exact_for_one_linear_layer(structure):
    """One Linear layer, Gaussian likelihood: block-diagonal and KFAC equal the full Fisher."""
    if structure not in curvkit.structures():
        pytest.skip(f"structure {structure!r} not registered yet")
    r = Ridge(False)
    r.solve_inner()
    F = curvkit.fisher(r.model, r.X, likelihood="regression", kind="exact", structure=structure)
    hg = implicit_grad(r.inner, r.outer, r.params(), [r.phi], curvature=F, damping=r.damping())
    _assert_close(hg[0], r.closed_form())


def test_ridge_log_parametrised_and_finite_differences():
    """φ = exp(ρ): the chain rule runs through the mixed term; FD of the re-solved L_V agrees."""
    r = Ridge(False)
    rho = torch.tensor([-1.2], dtype=D64, requires_grad=True)

    def inner():
        return 0.5 * ((r.model(r.X) - r.Y) ** 2).sum(1).mean() + 0.5 * rho.exp()[0] * (
            r.model.weight**2).sum()

    def val_at(rho_value: float) -> float:
        r.phi = torch.tensor([math.exp(rho_value)], dtype=D64, requires_grad=True)
        r.solve_inner()
        return float(r.outer().detach())

    eps = 1e-5
    fd = (val_at(rho.item() + eps) - val_at(rho.item() - eps)) / (2 * eps)
    val_at(rho.item())
    F = curvkit.fisher(r.model, r.X, likelihood="regression", kind="exact")
    hg = implicit_grad(inner, r.outer, r.params(), [rho], curvature=F, damping=float(rho.detach().exp()))
    _assert_close(hg[0], r.closed_form() * rho.detach().exp())
    torch.testing.assert_close(hg[0], torch.tensor([fd], dtype=D64), rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------- tiny MLP
class TinyMLP:
    """``L_T = mean NLL + ½ Σ_l φ_l ‖W̃_l‖²`` (2 layers, weights and biases decayed per layer).

    ``likelihood="classification"``: softmax cross-entropy on linearly separable labels.
    ``likelihood="regression"``: ``½‖f − y‖²`` with targets from the model itself (``y = f(x; θ)``,
    an interpolating optimum of the data term: zero residuals).
    """

    def __init__(self, likelihood: str = "classification", seed: int = 2, N: int = 40, Nv: int = 30):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.likelihood = likelihood
        self.model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        self.X = torch.randn(N, 4, generator=g, dtype=D64)
        self.Xv = torch.randn(Nv, 4, generator=g, dtype=D64)
        if likelihood == "classification":
            W = torch.randn(4, 3, generator=g, dtype=D64)
            self.y = (self.X @ W).argmax(1)
            self.yv = (self.Xv @ W + 0.3 * torch.randn(Nv, 3, generator=g, dtype=D64)).argmax(1)
            self.phi = torch.tensor([1e-2, 3e-2], dtype=D64, requires_grad=True)
        else:
            with torch.no_grad():
                self.y = self.model(self.X)
                self.yv = self.model(self.Xv) + 0.1 * torch.randn(Nv, 3, generator=g, dtype=D64)
            self.phi = torch.zeros(2, dtype=D64, requires_grad=True)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]

    def nll(self, out, y):
        if self.likelihood == "classification":
            return Fn.cross_entropy(out, y)
        return 0.5 * ((out - y) ** 2).sum(1).mean()

    def params(self):
        return list(self.model.parameters())

    def _unflat(self, theta):
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(torch.tensor(s).prod())
            out[n] = theta[i: i + k].reshape(s)
            i += k
        return out

    def loss_T(self, theta, phi):
        p = self._unflat(theta)
        data = self.nll(functional_call(self.model, p, (self.X,)), self.y)
        reg = sum(0.5 * phi[i // 2] * (p[n] ** 2).sum() for i, n in enumerate(self.names))
        return data + reg

    def loss_V(self, theta):
        return self.nll(functional_call(self.model, self._unflat(theta), (self.Xv,)), self.yv)

    def inner(self):
        return self.loss_T(torch.cat([p.reshape(-1) for p in self.params()]), self.phi)

    def outer(self):
        return self.loss_V(torch.cat([p.reshape(-1) for p in self.params()]))

    def solve_inner(self, phi, iters: int = 30) -> torch.Tensor:
        """L-BFGS from the current parameters, then Newton to ‖∇L_T‖ < 1e-13; writes θ* back."""
        phi = phi.detach()
        theta = torch.cat([p.detach().reshape(-1) for p in self.params()]).requires_grad_()
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-9,
                                tolerance_change=1e-14, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self.loss_T(theta, phi)
            loss.backward()
            return loss

        opt.step(closure)
        theta = theta.detach()

        def f(t):
            return self.loss_T(t, phi)

        for _ in range(iters):
            g = torch.func.grad(f)(theta)
            if g.norm() < 1e-13:
                break
            theta = theta - torch.linalg.solve(torch.func.hessian(f)(theta), g)
        with torch.no_grad():
            for p, v in zip(self.params(), self._unflat(theta).values()):
                p.copy_(v)
        return theta

    def damping(self):
        phi = self.phi.detach()
        return [phi[0], phi[0], phi[1], phi[1]]


@pytest.fixture(scope="module")
def tiny():
    t = TinyMLP()
    t.solve_inner(t.phi)
    return t


def test_tiny_mlp_finite_differences(tiny):
    """FD of L_V after re-solving the inner problem (Newton) matches the exact-Hessian IFT."""
    theta_star = tiny.solve_inner(tiny.phi)
    hg = implicit_grad(tiny.inner, tiny.outer, tiny.params(), [tiny.phi], curvature="hessian",
                       damping=0.0)[0]
    fd = []
    for k in range(2):
        vals = []
        for sign in (1, -1):
            e = 1e-5 * tiny.phi.detach().abs()[k]
            phi = tiny.phi.detach().clone()
            phi[k] += sign * e
            vals.append(float(tiny.loss_V(tiny.solve_inner(phi))))
        fd.append((vals[0] - vals[1]) / (2 * e))
        tiny.solve_inner(tiny.phi)
    assert torch.allclose(theta_star, torch.cat([p.detach().reshape(-1) for p in tiny.params()]))
    torch.testing.assert_close(hg, torch.stack(fd), rtol=1e-6, atol=1e-9)


def _ggn_gap(t: TinyMLP) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Fisher vs exact-Hessian hypergradients; checks the exact identity of their difference.

    With ``A_F = F + Φ`` (Fisher = GGN for these likelihoods, ``kind="exact"``), ``H`` the exact
    Hessian of ``L_T``, ``v_H = H⁻¹∇L_V`` and ``M = ∂²L_T/∂θ∂φ`` (``P × 2``)::

        hg_F − hg_H = −Mᵀ (v_F − v_H) = −Mᵀ A_F⁻¹ (H − A_F) v_H

    so the gap is carried entirely by the GGN residual ``H − A_F = Σₙ (1/N) Σ_c (∂ℓₙ/∂f_c) ∇²f_c``.
    Returns ``(‖hg_F − hg_H‖ / ‖hg_H‖, hg_F, hg_H)`` after checking the identity and the bound
    ``‖hg_F − hg_H‖ ≤ ‖M‖₂ ‖A_F⁻¹(H − A_F)‖₂ ‖v_H‖``.
    """
    hg_H, info_H = implicit_grad(t.inner, t.outer, t.params(), [t.phi], curvature="hessian",
                                 damping=0.0, return_info=True)
    F = curvkit.fisher(t.model, t.X, likelihood=t.likelihood, kind="exact")
    hg_F, info_F = implicit_grad(t.inner, t.outer, t.params(), [t.phi], curvature=F,
                                 damping=t.damping(), return_info=True)
    assert info_F["method"] == "operator-pcg" and info_F["residual"] < 1e-10
    theta = torch.cat([p.detach().reshape(-1) for p in t.params()])
    phi = t.phi.detach()
    H = torch.func.hessian(lambda th: t.loss_T(th, phi))(theta)
    sizes = [p.numel() for p in t.params()]
    Phi = torch.diag(torch.cat([torch.full((s,), float(t.damping()[i]), dtype=D64)
                                for i, s in enumerate(sizes)]))
    A_F = dense_fisher(t.model, t.X, likelihood=t.likelihood, kind="exact") + Phi
    M = torch.func.jacrev(lambda ph: torch.func.grad(lambda th: t.loss_T(th, ph))(theta))(phi)
    v_H = torch.cat([v.reshape(-1) for v in info_H["v"]])
    E = torch.linalg.solve(A_F, H - A_F)
    _assert_close(hg_F[0] - hg_H[0], -M.T @ E @ v_H, 1e-7)
    bound = torch.linalg.matrix_norm(M, 2) * torch.linalg.matrix_norm(E, 2) * v_H.norm()
    assert (hg_F[0] - hg_H[0]).norm() <= bound * (1 + 1e-9)
    return float((hg_F[0] - hg_H[0]).norm() / hg_H[0].norm()), hg_F[0], hg_H[0]


def test_tiny_mlp_fisher_within_ggn_gap(tiny):
    """Classification MLP: the gap is exactly the propagated GGN residual (see ``_ggn_gap``),
    bounded by ``‖M‖₂ ‖A_F⁻¹(H − A_F)‖₂ ‖v_H‖``; here it is ≈ 9 % relative (stated: < 15 %).

    The size of the gap is problem dependent -- the residual ``H − A_F`` is amplified by the
    smallest damped eigenvalues of ``F + Φ`` -- e.g. 33 % and 145 % on seeds 1 and 0 of this tiny
    problem; the identity and the bound are what hold in general.
    """
    gap, hg_F, hg_H = _ggn_gap(tiny)
    assert gap < 0.15
    # the dense Fisher route gives the same v as the preconditioned CG route
    F = curvkit.fisher(tiny.model, tiny.X, kind="exact")
    hg_dense = implicit_grad(tiny.inner, tiny.outer, tiny.params(), [tiny.phi], curvature=F,
                             damping=tiny.damping(), method="dense")
    _assert_close(hg_dense[0], hg_F, 1e-9)


def test_fisher_exact_at_zero_residual():
    """Nonlinear MLP at an interpolating optimum (``f(x) = y`` on every training point): the GGN
    residual vanishes, so Fisher + λI *is* Hessian + λI and the two hypergradients agree."""
    t = TinyMLP("regression")  # θ* = the teacher, φ = 0; data term exactly zero
    lam = 1e-2  # H is singular (P = 57 > rank): damp both by the same λ
    hg_H = implicit_grad(t.inner, t.outer, t.params(), [t.phi], curvature="hessian", damping=lam)
    F = curvkit.fisher(t.model, t.X, likelihood="regression", kind="exact")
    hg_F = implicit_grad(t.inner, t.outer, t.params(), [t.phi], curvature=F, damping=lam)
    _assert_close(hg_F[0], hg_H[0], 1e-8)
    assert hg_H[0].abs().max() > 1e-3  # not trivially zero


def test_hessian_cg_matches_dense_on_mlp(tiny):
    dense = implicit_grad(tiny.inner, tiny.outer, tiny.params(), [tiny.phi], curvature="hessian",
                          damping=1e-3, method="dense")
    cg = implicit_grad(tiny.inner, tiny.outer, tiny.params(), [tiny.phi], curvature="hessian",
                       damping=1e-3, method="cg")
    _assert_close(cg[0], dense[0], 1e-8)


def test_structured_curvatures_run(tiny):
    for structure in ("kfac", "diag"):
        if structure not in curvkit.structures():
            continue
        F = curvkit.fisher(tiny.model, tiny.X, kind="exact", structure=structure)
        hg = implicit_grad(tiny.inner, tiny.outer, tiny.params(), [tiny.phi], curvature=F,
                           damping=tiny.damping())
        assert hg[0].shape == (2,) and torch.isfinite(hg[0]).all()


def test_conjugate_gradient_small_spd():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(8, 8, generator=g, dtype=D64)
    A = B @ B.T + 0.1 * torch.eye(8, dtype=D64)
    b = torch.randn(8, generator=g, dtype=D64)
    x, it, res = conjugate_gradient(lambda v: A @ v, b, tol=1e-12)
    _assert_close(x, torch.linalg.solve(A, b), 1e-9)
    assert res <= 1e-12 and it <= 40
    with pytest.raises(SingularError, match="not positive definite"):
        conjugate_gradient(lambda v: -v, b)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        conjugate_gradient(lambda v: A @ v, b, tol=1e-30, maxiter=2)
    assert any("stopped after 2 iterations" in str(x.message) for x in w)


# ---------------------------------------------------------------------- bad input
def _ridge():
    r = Ridge(False)
    r.solve_inner()
    return r


def test_hparam_not_influencing_inner_loss():
    r = _ridge()
    unused = torch.tensor(1.0, dtype=D64, requires_grad=True)
    with pytest.raises(ValueError, match=r"hparams\[1\] \(shape \(\)\) does not influence ∇_θ inner_loss"):
        implicit_grad(r.inner, r.outer, r.params(), [r.phi, unused], curvature="hessian", damping=0.0)
    # a detached copy is the classic mistake
    phi_copy = r.phi.detach().clone().requires_grad_()
    with pytest.raises(ValueError, match=r"hparams\[0\].*not a detached copy"):
        implicit_grad(r.inner, r.outer, r.params(), [phi_copy], curvature="hessian", damping=0.0)
    # allowed explicitly: only ∂φ L_V (here 0 for the unused one)
    hg = implicit_grad(r.inner, r.outer, r.params(), [r.phi, unused], curvature="hessian",
                       damping=0.0, allow_unused=True)
    _assert_close(hg[0], r.closed_form())
    assert float(hg[1]) == 0.0


def test_outer_loss_without_params():
    r = _ridge()
    with pytest.raises(ValueError, match="outer_loss\\(\\) does not depend on params"):
        implicit_grad(r.inner, lambda: (r.phi**2).sum(), r.params(), [r.phi], curvature="hessian")


def test_non_finite_values():
    r = _ridge()
    with pytest.raises(FloatingPointError, match=r"inner_loss\(\) returned a non-finite value"):
        implicit_grad(lambda: r.inner() * float("nan"), r.outer, r.params(), [r.phi],
                      curvature="hessian")
    with pytest.raises(FloatingPointError, match=r"outer_loss\(\) returned a non-finite value"):
        implicit_grad(r.inner, lambda: r.outer() + float("inf"), r.params(), [r.phi],
                      curvature="hessian")
    with pytest.raises(ValueError, match="damping must be finite and ≥ 0"):
        implicit_grad(r.inner, r.outer, r.params(), [r.phi], curvature="hessian",
                      damping=float("nan"))


def test_bad_arguments():
    r = _ridge()
    F = curvkit.fisher(r.model, r.X, likelihood="regression")
    other = nn.Linear(5, 2, bias=False).double()
    F_other = curvkit.fisher(other, r.X, likelihood="regression")
    cases = [
        (dict(curvature="ggn"), ValueError, "unknown curvature 'ggn'"),
        (dict(curvature=3.0), TypeError, "curvature must be 'hessian' or a curvkit"),
        (dict(curvature=F_other), ValueError, "built for other parameter tensors"),
        (dict(curvature=F, method="lu"), ValueError, "unknown method 'lu'"),
        (dict(curvature=F, damping=-1.0), ValueError, "damping must be finite and ≥ 0"),
        (dict(curvature=F, damping=[1.0, 2.0]), ValueError, "one number/tensor per parameter"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            implicit_grad(r.inner, r.outer, r.params(), [r.phi], **kw)
    with pytest.raises(ValueError, match=r"hparams\[0\].*does not require grad"):
        implicit_grad(r.inner, r.outer, r.params(), [r.phi.detach()], curvature=F)
    with pytest.raises(TypeError, match="sequence of tensors, got a single Tensor"):
        implicit_grad(r.inner, r.outer, r.params(), r.phi, curvature=F)
    with pytest.raises(ValueError, match="in both params and hparams"):
        implicit_grad(r.inner, r.outer, r.params(), r.params(), curvature=F)
    with pytest.raises(ValueError, match=r"inner_loss\(\) must return a scalar tensor"):
        implicit_grad(lambda: r.model(r.X), r.outer, r.params(), [r.phi], curvature=F)
    with pytest.raises(SingularError, match="singular"):
        # softmax Fisher is rank-deficient: damping 0 has no inverse
        m = nn.Linear(5, 3, bias=False).double()
        y = torch.zeros(30, dtype=torch.long)
        Fc = curvkit.fisher(m, r.X, kind="exact", route="dual")
        implicit_grad(lambda: Fn.cross_entropy(m(r.X), y) + 0 * r.phi.sum() * m.weight.sum(),
                      lambda: Fn.cross_entropy(m(r.X), y), [m.weight], [r.phi], curvature=Fc,
                      damping=0.0)
