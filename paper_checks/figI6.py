"""App. I.5 / Fig I.6: independent vs same batch for the natural gradient's Fisher, across damping.

The subsampled natural gradient ``(λI + F̄)⁻¹ ḡ`` is biased when ``F̄`` and ``ḡ`` come from the same
minibatch; the paper proposes estimating ``F̄`` on an independent batch (App. I.5). For each
damping λ the learning rate (``α = η/λ``) is tuned separately for both variants (MC Fisher, batch
100, MNIST-1D), and the final training losses are compared.
"""

from __future__ import annotations

import math
import time

import numpy as np

from paper_checks.common import minibatch
from paper_checks.harness import (
    FAILS,
    HOLDS,
    PARTLY,
    CheckResult,
    Grid,
    Harness,
    Method,
    budget_line,
    fmt_pm,
    new_figure,
    ratio,
)

NAME = "figI6"
TITLE = "App. I.5 / Fig I.6"
CLAIM = ("Estimating the natural gradient's Fisher on the same minibatch as the gradient is much "
         "worse than on an independent batch at small damping; at large damping both agree.")
PAPER = ("F-MNIST, 6000 updates: independent ≈ 0.15–0.18 for every λ ∈ [1e-6, 1e6]; same batch ≈ 0.45 "
         "(λ = 1e-6, 1e-4), 0.3 (1e-2), ≈ 0.14 for large λ")
REQUIRES = ("curvkit.optim:NaturalGradient",)

#: Dampings with λ ≤ this are "small" (the paper's same-batch runs are worse up to 1e-2).
SMALL = 1e-2
#: "much worse": geometric-mean same/independent ratio over the small dampings.
STRONG = 1.5


def _nat(label: str, fisher_batch: str) -> Method:
    extra = {"fisher_size": 100} if fisher_batch == "independent" else {}
    return Method.make(label, "natural", kind="mc", structure="full", fisher_batch=fisher_batch, **extra)


def run(h: Harness) -> CheckResult:
    t0 = time.perf_counter()
    setup = minibatch(h)
    dampings = h.pick((1e-4, 1e-2, 1e2), (1e-4, 1.0), (1.0,))
    alphas = h.pick((0.3, 1.0), (0.3, 1.0), (1.0,))
    plans = []
    for lam in dampings:
        for label, fb in ((f"independent λ={lam:g}", "independent"), (f"same batch λ={lam:g}", "same")):
            plans.append((_nat(label, fb), Grid(alphas, (lam,), ratio=True, widen=("lr",))))
    res = h.tune(setup, plans, desc=NAME, screen=2)  # λ fixed per method by design, α widened
    indep = [res[plans[2 * i][0].label] for i in range(len(dampings))]
    same = [res[plans[2 * i + 1][0].label] for i in range(len(dampings))]
    ratios = [ratio(s, i) for s, i in zip(same, indep)]
    small = [r for lam, r in zip(dampings, ratios) if lam <= SMALL]
    finite = [r for r in small if math.isfinite(r) and r > 0]
    geo = float(np.exp(np.mean(np.log(finite)))) if finite else math.nan
    if any(math.isinf(r) for r in small):
        geo = math.inf
    large_ok = 1.0 / STRONG <= ratios[-1] <= STRONG
    if small and geo >= STRONG and all(r >= 1.2 for r in small) and large_ok:
        verdict = HOLDS
    elif small and geo > 1.1:
        verdict = PARTLY
    else:
        verdict = FAILS
    per = "; ".join(f"λ={lam:g}: indep {fmt_pm(i)}, same {fmt_pm(s)} (×{r:.2f})"
                    for lam, i, s, r in zip(dampings, indep, same, ratios))
    ours = (f"{per}; geometric-mean same/independent over λ ≤ {SMALL:g}: {geo:.2f}; "
            + budget_line([indep[0], same[0]]))
    rule = (f"r(λ) = L_same / L_indep (median final losses, η tuned per λ and variant). Holds if the "
            f"geometric mean of r over λ ≤ {SMALL:g} is ≥ {STRONG:g}, each such r ≥ 1.2, and r at the "
            f"largest λ is within [1/{STRONG:g}, {STRONG:g}]; partly if that geometric mean is > 1.1; "
            "otherwise does not hold")
    fig, (ax, ax2) = new_figure(2)
    for group, lab, c in ((indep, "independent batch", "C0"), (same, "same batch", "C3")):
        med = [m.median for m in group]
        err = [[md - min(m.finals) for m, md in zip(group, med)],
               [max(m.finals) - md for m, md in zip(group, med)]]
        ax.errorbar(dampings, med, yerr=err, marker="o", label=lab, color=c, capsize=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("damping λ")
    ax.set_ylabel("final training loss")
    ax.set_title("Fig I.6 analogue: final loss vs damping", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for m, ls in [(indep[0], "-"), (same[0], "--")]:
        ax2.plot(m.curve_steps, m.curve_median, ls, label=m.label)
    ax2.set_yscale("log")
    ax2.set_xlabel("updates")
    ax2.set_ylabel("training loss")
    ax2.set_title(f"curves at λ={dampings[0]:g}", fontsize=10)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    result = CheckResult(
        name=NAME, title=TITLE, claim=CLAIM, paper=PAPER, ours=ours, verdict=verdict, rule=rule,
        setup=setup.describe() + "; MC Fisher of 100 inputs: an independent random batch vs the step's batch",
        details={"methods": [m.summary() for m in (*indep, *same)], "dampings": list(dampings),
                 "same_over_independent": ratios, "geometric_mean_small": geo},
    )
    result.seconds = time.perf_counter() - t0
    return h.finish(result, fig, [*indep, *same])
