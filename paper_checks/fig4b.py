"""Fig 4B: FOOF reaches a lower final training loss than KFAC; amortised FOOF (T=100) ≈ T=1.

FOOF with inversion period T=1 gets its own grid search; FOOF with T=100 (EMA 0.95, S=T) reuses
the T=1 hyperparameters as in the paper (App. D.3); KFAC (EMA 0.95) and SGD+M come from Fig 1A.
FOOF with T=100 also gets a search of its own (reported beside the paper's protocol): a reused point
where a stale inverse diverges on one seed says something about robustness, not about what
amortised FOOF can reach, and the verdict keeps the two apart.
"""

from __future__ import annotations

import math
import time

from paper_checks.common import FOOF1, KFAC, SGD, grid_foof, grid_kfac, grid_sgd, minibatch
from paper_checks.harness import (
    FAILS,
    HOLDS,
    PARTLY,
    CheckResult,
    Harness,
    Method,
    budget_line,
    combine,
    fmt_pm,
    fmt_ratio,
    new_figure,
    plot_curves,
    ratio,
    ratio_verdict,
    separated,
)

NAME = "fig4b"
TITLE = "Fig 4B"
CLAIM = "FOOF reaches a lower final training loss than KFAC, and FOOF with T=100 ≈ FOOF with T=1."
PAPER = "F-MNIST: FOOF T=1 ≈ FOOF T=100 ≈ 2e-3; KFAC T=1 ≈ 7e-3 (≈ 3.5×); SGD+M ≈ 0.15"
REQUIRES = ("curvkit.optim:FOOF", "curvkit.optim:KFAC")

#: "FOOF beats KFAC" holds at this factor (the paper: ≈ 3.5×).
STRONG = 2.0
#: "T=100 ≈ T=1": final losses within this factor (holds) / within the second (partly).
SAME, CLOSE = 2.0, 5.0


def run(h: Harness) -> CheckResult:
    t0 = time.perf_counter()
    setup = minibatch(h)
    T = h.pick(100, 100, 10)
    foof_t = Method.make(f"FOOF T={T}", "foof", ema_decay=0.95, inv_period=T)
    foof_own = Method.make(f"FOOF T={T} (own search)", "foof", ema_decay=0.95, inv_period=T)
    res = h.tune(setup, [(FOOF1, grid_foof(h)), (KFAC, grid_kfac(h)), (SGD, grid_sgd(h)),
                         (foof_own, grid_foof(h))], desc=NAME)
    foof, kfac, sgd, own = res[FOOF1.label], res[KFAC.label], res[SGD.label], res[foof_own.label]
    amort = h.fixed(setup, foof_t, foof.lr, foof.damping, desc=f"{NAME}: T={T}")
    r_fk = ratio(kfac, foof)
    v_fk = ratio_verdict(r_fk, STRONG, sep=separated(foof, kfac))
    r_t, r_own = ratio(amort, foof), ratio(own, foof)
    spread, spread_own = _spread(r_t), _spread(r_own)
    finite = [v for v in amort.finals if math.isfinite(v)]
    bad = len(amort.finals) - len(finite)
    v_t = amortised_verdict(spread, spread_own)
    why = ""
    if v_t == PARTLY and spread > CLOSE:
        why = (f" (the paper's protocol fails{f' through {bad} diverged seed(s)' if bad else ''}; "
               f"FOOF T={T} with its own search is within {SAME:g}× of T=1)")
    reused = f"FOOF T={T} at T=1's (η, λ) {fmt_pm(amort)}"
    if bad and finite:
        reused += f" (converged seeds: {', '.join(f'{v:.3g}' for v in finite)})"
    ours = (f"FOOF T=1 {fmt_pm(foof)}, {reused}, FOOF T={T} own search (η={own.lr:g}, λ={own.damping:g}) "
            f"{fmt_pm(own)}, KFAC {fmt_pm(kfac)}, SGD+M {fmt_pm(sgd)}: KFAC / FOOF = {fmt_ratio(r_fk)} "
            f"[{v_fk}]; FOOF T={T} / T=1 = {r_t:.2f} at the reused point, {r_own:.2f} with its own search "
            f"[{v_t}{why}]; " + budget_line([foof, amort, own, kfac, sgd]))
    verdict = combine([v_fk, v_t])
    rule = (f"(i) holds if KFAC/FOOF(T=1) ≥ {STRONG:g}× with all FOOF seeds below all KFAC seeds, partly "
            f"if > 1, else does not hold; (ii) with T=1's (η, λ) reused (the paper, App. D.3): holds if "
            f"FOOF T={T} and T=1 are within {SAME:g}× of each other, partly within {CLOSE:g}×, else does "
            f"not hold — except partly when the reused point fails but FOOF T={T} with its own search is "
            f"within {SAME:g}× of T=1. Overall: both hold → holds; both fail → does not hold; else partly.")
    fig, (ax,) = new_figure(1, 6.0)
    plot_curves(ax, [foof, amort, own, kfac, sgd], "Fig 4B analogue: FOOF vs KFAC")
    result = CheckResult(
        name=NAME, title=TITLE, claim=CLAIM, paper=PAPER, ours=ours, verdict=verdict, rule=rule,
        setup=setup.describe() + f"; FOOF T={T} uses FOOF T=1's (η, λ) (paper) and, beside it, "
                                 "its own search",
        details={"methods": [m.summary() for m in (foof, amort, own, kfac, sgd)], "kfac_over_foof": r_fk,
                 "verdict_foof_vs_kfac": v_fk, "amortised_over_t1": r_t,
                 "amortised_own_search_over_t1": r_own, "verdict_amortised": v_t},
    )
    result.seconds = time.perf_counter() - t0
    return h.finish(result, fig, [foof, amort, own, kfac, sgd])


def amortised_verdict(spread: float, spread_own: float) -> str:
    """Verdict (ii): T=1's (η, λ) reused (``spread``: the loss factor between T=100 and T=1 there)
    decides, except that a failure there is ``partly`` when the own search (``spread_own``) is within
    :data:`SAME`."""
    if spread <= SAME:
        return HOLDS
    if spread <= CLOSE:
        return PARTLY
    return PARTLY if spread_own <= SAME else FAILS


def _spread(r: float) -> float:
    """``max(r, 1/r)``: how far apart two losses are, either way (``inf`` for 0, inf or nan)."""
    return max(r, 1.0 / r) if (r > 0 and math.isfinite(r)) else float("inf")
