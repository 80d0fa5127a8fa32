"""Verdict rules, caveats, number formatting and the figures' plotting helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from paper_checks.grids import DIVERGED

if TYPE_CHECKING:
    from paper_checks.harness import MethodResult

HOLDS, PARTLY, FAILS = "holds", "partly", "does not hold"
NOT_RUN = "not run"
VERDICTS = (HOLDS, PARTLY, FAILS, NOT_RUN)
#: A seed spread (max/min final loss of the selected point) above this factor is a caveat.
SPREAD = 3.0


def ratio(worse: MethodResult | float, better: MethodResult | float) -> float:
    """``median(worse) / median(better)`` over seeds (``inf`` if only the better one converged;
    ``nan`` if both are 0, e.g. both underflow on separable data: a tie cannot favour either)."""
    w = worse if isinstance(worse, (int, float)) else worse.median
    b = better if isinstance(better, (int, float)) else better.median
    w, b = float(w), float(b)
    if not math.isfinite(w):
        return math.inf if math.isfinite(b) else math.nan
    if not math.isfinite(b):
        return 0.0
    if b > 0:
        return w / b
    return math.inf if w > 0 else math.nan


def separated(better: MethodResult, worse: MethodResult) -> bool:
    """Every seed of ``better`` ends below every seed of ``worse``."""
    return max(better.finals) < min(worse.finals)


def ratio_verdict(r: float, strong: float, weak: float = 1.0, sep: bool = True) -> str:
    """``holds`` if ``r ≥ strong`` and the seeds are separated; ``partly`` if ``r > weak``;
    otherwise ``does not hold``."""
    if r >= strong and sep:
        return HOLDS
    if r > weak:
        return PARTLY
    return FAILS


def combine(verdicts: Sequence[str]) -> str:
    """All hold → holds; all ``does not hold`` → does not hold; otherwise partly."""
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if all(v == FAILS for v in verdicts):
        return FAILS
    return PARTLY


def gap_closed(base: MethodResult, variant: MethodResult, kfac: MethodResult) -> float:
    """Fraction of the log-loss gap between ``base`` and KFAC that ``variant`` closes:
    ``log(L_base / L_variant) / log(L_base / L_kfac)`` (median losses; ``nan`` if no gap)."""
    lb, lv, lk = base.median, variant.median, kfac.median
    if not (math.isfinite(lb) and math.isfinite(lk)) or lk >= lb:
        return math.nan
    if not math.isfinite(lv):
        return -math.inf
    if lk <= 0:  # KFAC underflowed to 0 and the base did not: an infinite log-gap
        return 1.0 if lv <= 0 else 0.0
    if lv <= 0:
        return math.inf
    return math.log(lb / lv) / math.log(lb / lk)


def gap_verdict(f: float, kfac: MethodResult, variant: MethodResult) -> str:
    """``holds`` if the variant closes at most half of the (log) gap and every KFAC seed stays
    below every variant seed; ``partly`` if KFAC is still better on average; otherwise not."""
    if math.isnan(f):
        return FAILS
    if f <= 0.5 and separated(kfac, variant):
        return HOLDS
    if kfac.median < variant.median:
        return PARTLY
    return FAILS


def _edge_reason(edge: str, capped: Sequence[str], widen: Sequence[str]) -> str:
    if edge in capped:
        return "cap reached"
    return "not widened" if edge.split()[0] in widen else "axis fixed by design"


def caveats(methods: Sequence[MethodResult]) -> list[str]:
    """Qualifications of a verdict: selected points still on a grid edge after widening (cap
    reached, or an axis that is not widened), diverged seeds, and seed spreads > :data:`SPREAD`."""
    out = []
    for m in methods:
        widen = getattr(m.grid, "widen", ("lr", "damping"))
        capped = m.search.get("capped_edges") or []
        if m.edges:
            why = [f"{e} ({_edge_reason(e, capped, widen)})" for e in m.edges]
            out.append(f"{m.label}: optimum on the grid edge ({', '.join(why)})")
        if m.diverged and DIVERGED in capped:
            n = (m.search.get("widened") or {}).get(DIVERGED, 0)
            out.append(f"{m.label}: no learning rate converged on every seed, even after the lr axis "
                       f"was extended {n} decade(s) downward (cap reached)")
        bad = sum(not math.isfinite(v) for v in m.finals)
        if bad:
            out.append(f"{m.label}: {bad}/{len(m.finals)} seeds diverged")
        elif min(m.finals) > 0 and max(m.finals) / min(m.finals) > SPREAD:
            out.append(f"{m.label}: seed spread ×{max(m.finals) / min(m.finals):.1f}")
    return out


def fmt(v: float | None, digits: int = 2) -> str:
    """Compact number: ``3.1e-03``, ``0.15``, ``diverged`` for non-finite."""
    if v is None or not math.isfinite(v):
        return "diverged" if v is None or v > 0 else "-inf"
    if v == 0:
        return "0"
    if 1e-2 <= abs(v) < 1e3:
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits + 1}g}"
    return f"{v:.{digits - 1}e}"


def fmt_pm(m: MethodResult) -> str:
    """``median [min–max]`` of a method's final losses over seeds."""
    if m.diverged:
        n = sum(not math.isfinite(v) for v in m.finals)
        return f"diverged ({n}/{len(m.finals)} seeds)"
    if len(m.finals) == 1:
        return fmt(m.finals[0])
    return f"{fmt(m.median)} [{fmt(min(m.finals), 1)}–{fmt(max(m.finals), 1)}]"


def fmt_ratio(r: float) -> str:
    return "∞" if math.isinf(r) else (f"{r:.1f}×" if r < 100 else f"{r:.0f}×")


def fmt_budgets(m: MethodResult) -> str:
    """``loss@100 …, test acc …`` of a method (medians over seeds)."""
    parts = [f"@{k} {fmt(v)}" for k, v in m.budget_losses.items()]
    if math.isfinite(m.test_acc):
        parts.append(f"test acc {100 * m.test_acc:.1f}%")
    return ", ".join(parts)


def budget_line(methods: Sequence[MethodResult]) -> str:
    """``loss after b updates`` and test accuracy (medians over seeds) of several methods."""
    if not methods:
        return ""
    parts = []
    for b in methods[0].budgets:
        parts.append(f"loss @{b}: " + ", ".join(f"{m.label} {fmt(m.budget_losses.get(b))}" for m in methods))
    if any(math.isfinite(m.test_acc) for m in methods):
        parts.append("test acc: " + ", ".join(f"{m.label} {_acc(m)}" for m in methods))
    return "; ".join(parts)


def _acc(m: MethodResult) -> str:
    """Median test accuracy, or ``diverged`` where a diverged seed leaves no finite median."""
    return f"{100 * m.test_acc:.1f}%" if math.isfinite(m.test_acc) else "diverged"


# ---------------------------------------------------------------------------------------- figures
def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure with ``ncols`` axes (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def style_axis(ax: Any, title: str = "", xlabel: str = "updates", ylabel: str = "training loss",
               log: bool = True) -> None:
    """Shared axis styling of every figure."""
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_curves(ax: Any, results: Sequence[MethodResult], title: str = "", log: bool = True) -> None:
    """Median (line) and min–max over seeds (band) of the training-loss curves of several methods."""
    for m in results:
        s = np.asarray(m.curve_steps)
        mu, lo, hi = (np.asarray(v, dtype=float) for v in (m.curve_median, m.curve_min, m.curve_max))
        ok = np.isfinite(mu)
        (line,) = ax.plot(s[ok], mu[ok], label=f"{m.label} ({fmt_pm(m)})")
        band = ok & np.isfinite(lo) & np.isfinite(hi)
        ax.fill_between(s[band], lo[band], hi[band], color=line.get_color(), alpha=0.2)
    style_axis(ax, title, log=log)
