"""Fig 4C: along KFAC's trajectory, KFAC without its second factor makes at least as much progress.

KFAC (EMA 0.95, its own optimal η and λ from the Fig 1A grid) is trained as usual; before every
``EVERY``-th update, on the current minibatch ``B_t``, the relative loss decrease

    rel_dec(Δ) = (L_B(θ_t) − L_B(θ_t + Δ)) / L_B(θ_t)

is measured for KFAC's update ``Δ_KFAC`` (``opt.direction()``) and for KFAC without its second
factor, ``ΔW = −η M (Â + λ_A I)⁻¹`` with KFAC's own ``Â`` and π-rule ``λ_A`` (App. D.9), rescaled
per layer to the Frobenius norm of KFAC's update (``opt.direction(variant="foof",
rescale="norm")``, math_spec §6.7–6.8). The trajectory always continues with ``Δ_KFAC``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paper_checks.common import KFAC, grid_kfac, minibatch
from paper_checks.harness import FAILS, HOLDS, PARTLY, CheckResult, Harness, RunSpec, new_figure

NAME = "fig4c"
TITLE = "Fig 4C"
CLAIM = ("Along KFAC's trajectory, KFAC without its second Kronecker factor (norm-matched per layer) "
         "decreases the minibatch loss at least as much as KFAC.")
PAPER = "F-MNIST: relative minibatch decrease FOOF' ≈ 0.45–0.75 ≥ KFAC ≈ 0.3–0.65, almost everywhere"
REQUIRES = ("curvkit.optim:KFAC",)

#: Measure every this many updates.
EVERY = 5
#: "almost everywhere": the fraction of measured steps with FOOF' ≥ KFAC needed for "holds".
MOST = 0.8


@torch.no_grad()
def _loss_after(model: nn.Module, params: list[Tensor], delta: list[Tensor], x: Tensor, y: Tensor) -> float:
    saved = [p.detach().clone() for p in params]
    try:
        for p, d in zip(params, delta):
            p.add_(d)
        return float(F.cross_entropy(model(x), y))
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)


def probe(step: int, model: nn.Module, opt: Any, x: Tensor, y: Tensor, loss: Tensor) -> dict[str, float]:
    """Relative minibatch decrease of KFAC's update and of the norm-matched FOOF' update."""
    if step % EVERY:
        return {}
    params = [p for g in opt.param_groups for p in g["params"]]
    l0 = float(loss.detach())
    d_kfac = opt.direction()
    d_foof = opt.direction(variant="foof", rescale="norm")
    l_k = _loss_after(model, params, d_kfac, x, y)
    l_f = _loss_after(model, params, d_foof, x, y)
    return {"step": float(step), "kfac": (l0 - l_k) / l0, "foof": (l0 - l_f) / l0}


def run(h: Harness) -> CheckResult:
    t0 = time.perf_counter()
    setup = minibatch(h)
    kfac = h.tune(setup, [(KFAC, grid_kfac(h))], desc=f"{NAME}: KFAC grid")[KFAC.label]
    specs = [RunSpec(setup, KFAC, kfac.lr, kfac.damping, s, probe=f"{__name__}:probe") for s in h.seeds]
    runs = h.run_many(specs, desc=f"{NAME}: probes")
    rows = [[r for r in run.probe if r] for run in runs]
    steps = np.array([r["step"] for r in rows[0]])
    n = min(len(r) for r in rows)
    k = np.array([[r["kfac"] for r in rs[:n]] for rs in rows])
    f = np.array([[r["foof"] for r in rs[:n]] for rs in rows])
    frac = float(np.mean(f >= k))
    mean_k, mean_f = float(np.mean(k)), float(np.mean(f))
    if frac >= MOST and mean_f >= mean_k:
        verdict = HOLDS
    elif mean_f >= mean_k or frac >= 0.5:
        verdict = PARTLY
    else:
        verdict = FAILS
    ours = (f"mean relative minibatch decrease: FOOF' {mean_f:.3f} vs KFAC {mean_k:.3f} (ranges "
            f"{np.percentile(f, 10):.2f}–{np.percentile(f, 90):.2f} vs {np.percentile(k, 10):.2f}–"
            f"{np.percentile(k, 90):.2f}, 10th–90th percentile); FOOF' ≥ KFAC at {100 * frac:.0f}% of the "
            f"{k.size} measured (step, seed) pairs")
    rule = (f"holds if FOOF' ≥ KFAC at ≥ {100 * MOST:.0f}% of the measured steps (all seeds) and on "
            "average; partly if FOOF' ≥ KFAC on average or at ≥ 50% of the steps; otherwise does not hold")
    fig, (ax,) = new_figure(1, 6.0)
    s = steps[:n]
    for arr, lab in ((f, "KFAC without 2nd factor (norm-matched)"), (k, "KFAC")):
        mu, sd = arr.mean(0), arr.std(0)
        (line,) = ax.plot(s, mu, label=f"{lab}: mean {arr.mean():.3f}")
        ax.fill_between(s, mu - sd, mu + sd, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("updates (KFAC trajectory)")
    ax.set_ylabel("relative minibatch loss decrease")
    ax.set_title("Fig 4C analogue", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    result = CheckResult(
        name=NAME, title=TITLE, claim=CLAIM, paper=PAPER, ours=ours, verdict=verdict, rule=rule,
        setup=setup.describe() + f"; KFAC at its Fig 1A optimum (η={kfac.lr:g}, λ={kfac.damping:g}); "
              f"measured every {EVERY} updates on the current minibatch",
        details={"methods": [kfac.summary()], "fraction_foof_ge_kfac": frac, "mean_kfac": mean_k,
                 "mean_foof": mean_f, "steps": s.tolist(), "kfac_mean_curve": k.mean(0).tolist(),
                 "foof_mean_curve": f.mean(0).tolist(),
                 "trajectory_final_losses": [r.final for r in runs]},
    )
    result.seconds = time.perf_counter() - t0
    return h.finish(result, fig, [kfac])
