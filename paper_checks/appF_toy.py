"""App. F toy example: FOOF vs SGD on two datapoints of a linear model (exact numbers).

Setup (paper App. F; math_spec §10): ``f(x) = w·x``, squared loss, ``x₁ = (3, 1), y₁ = 1`` and
``x₂ = (1, 0), y₂ = −1``, ``w₀ = 0``. The paper's formulas use the gradient of the *summed* loss
``Σ_i ½(w·x_i − y_i)²``; curvkit's FOOF preconditions the gradient of the loss it is given with the
batch-*mean* factor ``Â = (1/N) A Aᵀ``, so training on the summed loss with ``η_c = 1/N`` and
``λ_c = λ_p/N`` reproduces the paper's step ``d(λ) = (AAᵀ + λI)⁻¹ A Eᵀ`` exactly (mean loss:
``η_c = 1``, same ``λ_c``).

Everything runs in float64 through the public API: ``curvkit.optim.FOOF`` (one step,
``ema_decay=0, inv_period=1``) and, as a cross-check, ``curvkit.fisher(..., structure="foof")``'s
``solve``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from paper_checks.harness import FAILS, HOLDS, CheckResult, Harness, new_figure

NAME = "appF_toy"
TITLE = "App. F toy example"
CLAIM = ("On two datapoints of a linear model, one undamped FOOF step of size 1 reaches a global "
         "optimum (direction (−1, 4)), while the SGD direction (2, 1) increases the loss of "
         "datapoint 2 for every step size; damped FOOF interpolates to SGD as λ → ∞.")
PAPER = ("FOOF direction (−1, 4), outputs after one step (1, −1); SGD direction (2, 1); damped "
         "d(λ) = (AAᵀ+λI)⁻¹(2,1)ᵀ: λ=1e-3 → (−0.98714047, 3.95746394), λ=1 → (1/13, 5/13), "
         "λ=100 → (0.01792631, 0.00936853); λ·d(λ) → (2, 1) (math_spec §10)")
REQUIRES = ("curvkit.optim:FOOF", "curvkit:fisher")

X = torch.tensor([[3.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
Y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
EXPECTED = {  # λ_p -> d(λ_p), math_spec §10 (derived there, checked numerically)
    1e-3: (-0.98714047, 3.95746394),
    1.0: (1.0 / 13.0, 5.0 / 13.0),
    100.0: (0.01792631, 0.00936853),
}
TOL = 1e-6


def _model() -> nn.Linear:
    m = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        m.weight.zero_()
    return m


def _summed_loss(m: nn.Module) -> torch.Tensor:
    return 0.5 * ((m(X) - Y) ** 2).sum()


def foof_step(damping_paper: float) -> np.ndarray:
    """The weights after one ``curvkit.optim.FOOF`` step from ``w₀ = 0`` (paper units λ_p)."""
    from curvkit.optim import FOOF

    n = X.shape[0]
    m = _model()
    opt = FOOF(m, lr=1.0 / n, damping=damping_paper / n, ema_decay=0.0, inv_period=1, ema_steps=1)
    opt.initialize([X])  # App. K: the factor of the two datapoints, under either update order
    opt.zero_grad()
    _summed_loss(m).backward()
    opt.step()
    return m.weight.detach().numpy()[0].copy()


def foof_solve(damping_paper: float) -> np.ndarray:
    """``−∇L_sum (Â + λ_c I)⁻¹ / N`` through ``curvkit.fisher(structure="foof").solve``."""
    import curvkit

    n = X.shape[0]
    m = _model()
    F = curvkit.fisher(m, X, Y, likelihood="regression", structure="foof")
    grad = torch.autograd.grad(_summed_loss(m), [m.weight])
    d = F.solve(list(grad), damping_paper / n)
    return (-d[0] / n).detach().numpy()[0].copy()


def run(h: Harness) -> CheckResult:
    t0 = time.perf_counter()
    rows: list[dict] = []

    def record(what: str, ours: np.ndarray, expected: tuple[float, ...]) -> None:
        err = float(np.max(np.abs(np.asarray(ours) - np.asarray(expected))))
        rows.append({"quantity": what, "ours": [float(v) for v in ours], "expected": list(expected),
                     "abs_error": err, "ok": err <= TOL})

    # undamped FOOF (λ → 0): a tiny damping, the error is O(λ)
    w = foof_step(1e-10)
    record("FOOF step, λ_p=1e-10 (undamped)", w, (-1.0, 4.0))
    record("outputs after that step", (X @ torch.from_numpy(w)).numpy(), (1.0, -1.0))
    for lam, exp in EXPECTED.items():
        record(f"FOOF step, λ_p={lam:g} (optimizer)", foof_step(lam), exp)
        record(f"FOOF direction, λ_p={lam:g} (fisher('foof').solve)", foof_solve(lam), exp)
    big = 1e8
    record("λ·d(λ) at λ_p=1e8 (SGD limit)", big * foof_step(big), (2.0, 1.0))
    # SGD: direction −∇L_sum = (2, 1); loss of datapoint 2 after a step of size η
    m = _model()
    grad = torch.autograd.grad(_summed_loss(m), [m.weight])[0][0]
    record("SGD direction −∇L_sum", (-grad).numpy(), (2.0, 1.0))
    etas = [1e-3, 1e-2, 0.1, 1.0, 10.0]
    loss2 = [0.5 * float((eta * (-grad) @ X[1] - Y[1, 0]) ** 2) for eta in etas]
    sgd_hurts = all(v > 0.5 for v in loss2)

    ok = all(r["ok"] for r in rows) and sgd_hurts
    verdict = HOLDS if ok else FAILS
    max_err = max(r["abs_error"] for r in rows)
    ours = (f"FOOF direction ({w[0]:.6f}, {w[1]:.6f}), outputs after one step "
            f"({rows[1]['ours'][0]:.6f}, {rows[1]['ours'][1]:.6f}); all {len(rows)} values within "
            f"{max_err:.1e} of the expected; SGD raises datapoint 2's loss from 0.5 to "
            f"{min(loss2):.3g}–{max(loss2):.3g} for η ∈ [1e-3, 10]")

    fig, (ax,) = new_figure(1, 4.5, 4.0)
    ax.scatter(X[:, 0], X[:, 1], c=["C0", "C1"])
    for v, lab, c in [((2.0, 1.0), "SGD (2, 1)", "C3"), (tuple(w), "FOOF (−1, 4)", "C2")]:
        ax.annotate("", xy=v, xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": c})
        ax.text(v[0], v[1], lab, color=c, fontsize=8)
    lams = np.logspace(-3, 3, 25)
    path = np.array([foof_step(lam) for lam in lams])
    ax.plot(path[:, 0], path[:, 1], ".-", color="C2", alpha=0.5, label="damped FOOF d(λ), λ ∈ [1e-3, 1e3]")
    ax.set_title("App. F toy example: update directions", fontsize=10)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    res = CheckResult(
        name=NAME, title=TITLE, claim=CLAIM, paper=PAPER, ours=ours, verdict=verdict,
        rule=f"holds iff every value matches the expected one within {TOL:g} (absolute) and the SGD "
             "step increases datapoint 2's loss (> 0.5) for all tested η; otherwise does not hold",
        setup="linear model f(x) = w·x, two datapoints, squared loss, float64; FOOF through "
              "curvkit.optim.FOOF (one step, ema_decay=0, inv_period=1, η_c = 1/N, λ_c = λ_p/N on "
              "the summed loss) and curvkit.fisher(structure='foof').solve",
        details={"values": rows, "sgd_eta": etas, "sgd_loss_datapoint2": loss2},
    )
    res.seconds = time.perf_counter() - t0
    return h.finish(res, fig)
