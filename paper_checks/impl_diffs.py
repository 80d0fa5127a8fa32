"""Where curvkit's implementation and the paper's public code differ, with measured effects.

Not a claim of the paper: the report renders it as its own section.

* **Update order.** curvkit follows Algorithm 1 (the preconditioner of step ``t`` is built from the
  factors as they were before batch ``t``); ``precondition_with="current"`` folds batch ``t`` into
  the factors first. Measured on the Fig 1A/1B setup: KFAC-sub (EMA 0, where the difference is
  largest: with ``"current"`` step ``t`` is preconditioned with batch ``t``'s own curvature) and
  KFAC (EMA 0.95), both orders at the Algorithm-1 optimum of Fig 1A/1B (3 seeds each).
* **Standard damping's eigenbasis.** The public code transposes the B-side eigenbasis; Fig 3A runs
  both implementations (cached runs reused here).
"""

from __future__ import annotations

import json
import time

from paper_checks import variants
from paper_checks.common import KFAC, KFAC_STD, KFAC_STD_PUB, KFAC_SUB, grid_kfac, grid_kfac_std, minibatch
from paper_checks.harness import (
    NOT_RUN,
    PKG_DIR,
    CheckResult,
    Harness,
    Method,
    budget_line,
    fmt,
    fmt_pm,
    fmt_ratio,
    new_figure,
    plot_curves,
    ratio,
)

NAME = "impl_diffs"
TITLE = "Implementation vs public code"
CLAIM = "(not a claim) effects of the update order and of the public code's standard-damping eigenbasis"
PAPER = "public code: stale preconditioner (Algorithm 1), transposed B-side eigenbasis in standard damping"
REQUIRES = ("curvkit.optim:KFAC",)
SECTION = "differences"


def _current(m: Method) -> Method:
    return Method.make(m.label + ", precondition_with='current'", m.opt, **m.opts,
                       precondition_with="current")


def _result(h: Harness, name: str) -> dict | None:
    """Check ``name``'s latest JSON of this level and this curvkit's update-order semantics (the
    results folder of this run first, then the committed one), if there is one."""
    from paper_checks.harness import environment

    order = environment()["kfac_foof_update_order"]
    for folder in (h.cfg.out_dir, PKG_DIR / "results"):
        path = folder / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("level") == h.cfg.level and data.get("environment", {}).get(
                    "kfac_foof_update_order") == order:
                return data
    return None


def _selected(h: Harness, name: str, label: str) -> tuple[float, float] | None:
    """The selected (η, λ) of ``label`` in check ``name``'s result, if written."""
    data = _result(h, name)
    for m in (data or {}).get("details", {}).get("methods", []):
        if m["label"] == label:
            return m["lr"], m["damping"]
    return None


def run(h: Harness) -> CheckResult:
    t0 = time.perf_counter()
    setup = minibatch(h)
    try:
        variants.order_kwargs("current")
        have_order = True
    except NotImplementedError:
        have_order = False
    lines, methods, order = [], [], {}
    fig3a = _result(h, "fig3a")
    if fig3a is not None:  # Fig 3A ran both implementations in this run: report its numbers
        ms = {m["label"]: m for m in fig3a["details"]["methods"]}
        c, p = ms[KFAC_STD.label], ms[KFAC_STD_PUB.label]
        std_detail = {"correct": c, "public_code": p, "from": "fig3a",
                      "public_over_correct": (p["final_median"] / c["final_median"]
                                              if p["final_median"] and c["final_median"] else None)}
        lines.append(f"standard damping (Fig 3A): correct {fmt(c['final_median'])} (η={c['lr']:g}, "
                     f"λ={c['damping']:g}) vs public code {fmt(p['final_median'])} (η={p['lr']:g}, "
                     f"λ={p['damping']:g}): public / correct = {fmt(std_detail['public_over_correct'])}×; "
                     f"Fig 3A's conclusion needs {fig3a['details'].get('conclusion_needs')}")
    else:
        std = h.tune(setup, [(KFAC_STD, grid_kfac_std(h)), (KFAC_STD_PUB, grid_kfac_std(h))], desc=NAME)
        corr, pub = std[KFAC_STD.label], std[KFAC_STD_PUB.label]
        lines.append(f"standard damping: correct {fmt_pm(corr)} (η={corr.lr:g}, λ={corr.damping:g}) vs "
                     f"public code {fmt_pm(pub)} (η={pub.lr:g}, λ={pub.damping:g}): public / correct = "
                     f"{fmt_ratio(ratio(pub, corr))}")
        methods += [corr, pub]
        std_detail = {"correct": corr.summary(), "public_code": pub.summary(),
                      "public_over_correct": ratio(pub, corr)}
    if have_order:
        for m in (KFAC_SUB, KFAC):
            # both orders at the Algorithm-1 optimum of Fig 1A/1B (searched there; searched here if
            # this run has no Fig 1A/1B result)
            point = _selected(h, "fig1ab", m.label)
            if point is None:
                a = h.tune(setup, [(m, grid_kfac(h))], desc=f"{NAME}: {m.label}")[m.label]
                point = (a.lr, a.damping)
            a = h.fixed(setup, m, *point, desc=f"{NAME}: {m.label}")
            c = h.fixed(setup, _current(m), *point, desc=f"{NAME}: {m.label} current")
            order[m.label] = {"paper_order": a.summary(), "current": c.summary(),
                              "current_over_paper": ratio(c, a)}
            lines.append(f"{m.label} at η={a.lr:g}, λ={a.damping:g}: Algorithm 1 order {fmt_pm(a)} vs "
                         f"precondition_with='current' {fmt_pm(c)}: current / Algorithm 1 = "
                         f"{fmt_ratio(ratio(c, a))}; " + budget_line([a, c]))
            methods += [a, c]
    else:
        lines.append("update order: not measured (this curvkit has no precondition_with option)")
    fig, (ax,) = new_figure(1, 6.0)
    plot_curves(ax, methods, "implementation differences")
    result = CheckResult(
        name=NAME, title=TITLE, claim=CLAIM, paper=PAPER, ours="; ".join(lines),
        verdict="holds" if have_order else NOT_RUN, rule="- (measurement, no verdict)",
        setup=setup.describe() + "; update order compared at the Algorithm-1 optimum of Fig 1A/1B "
              "(3 seeds each)",
        details={"section": SECTION, "lines": lines, "methods": [m.summary() for m in methods],
                 "update_order": order,
                 "standard_damping": std_detail},
    )
    result.seconds = time.perf_counter() - t0
    return h.finish(result, fig, methods)
