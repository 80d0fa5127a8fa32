"""``REPORT.md`` from the JSON results: one row per claim, then one section per check.

Every number in the report is read from the JSON files the checks wrote in the same run (or in
earlier ``--only`` runs of the same level); nothing is typed in by hand.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

from paper_checks import CHECKS

PROTOCOL = """\
**Protocol** (paper App. D.5, scaled to 2 CPU cores). Bias-free ReLU MLPs with Kaiming-normal
(ReLU gain) initialisation of every layer, cross-entropy, constant learning rate and damping;
FOOF/KFAC start from App. K's initialisation (factor EMAs filled from 50 minibatches, one inversion);
their update order: {order}. Each
method gets its own search over **independent** learning-rate and damping axes (learning rates on
{1,3}×10^i, dampings on 10^(2i); the minibatch natural gradient over App. D.3's α = η/λ and λ):
every grid point runs on seed 0, the 2 best run with every seed, and the point with the lowest
**median** final training loss over the seeds is selected (a
point with a diverged seed is not eligible: it is replaced by the next screened point that is not
known to diverge; no point is ever chosen by seed 0 alone). **Edge widening:** if the selected point
is the smallest or largest value of an axis among the evaluated points of its row/column, that axis
gets the next value beyond the edge (at the selected value of the other axis and its neighbours)
and the selection repeats, up to 2 widenings per axis side; an axis that is fixed by the check's
design (one damping per curve in Fig 3C/3D and I.6, Fig 1C's λ) is not widened. **Divergence:** if
no evaluated point converges on every seed, the learning-rate (or α) axis is extended downward by a
decade (its two next {1,3}×10^i values) at every damping, up to 4 decades, after which the ordinary
edge widening continues from the first converging point. Every verdict lists its caveats: optima
still on an edge (with the reason: cap reached or axis fixed by design), nothing converged within
the cap, diverged seeds, seed spreads > 3×. Results are medians
[min–max] over 3 seeds; ratios use medians. Next to the final losses the tables give the losses at
fixed early budgets and the test accuracy. Data are generated or shipped locally: MNIST-1D
generated with 25 000 samples (20 000 training, 5 000 test points, 40 features; the 4000-point
set saturates), its 4000-point standard version for the full-batch subsets, and scikit-learn's
digits (1438 training images, 64 features); only the qualitative claims (orderings, ratios) are
checked, each by an explicit rule stated per check.

**Hyperparameter units.** curvkit's KFAC/FOOF factors are batch means, the paper code's dense
A-factor is a batch sum, so the paper's values map as η_c = η_p/N, λ_c = λ_p/N with N = 100 (e.g.
FOOF (30, 100) → (0.3, 1), KFAC (0.3, 1) → (3e-3, 1e-2)); the grids map onto themselves. The
natural gradient uses the mean Fisher with columns g_i/√N like the paper, so its values carry over
(except that the paper's private code scaled MC and Full Fisher differently, App. D.4)."""


DEVIATIONS = """\
**Deviations from the paper** (forced by 2 shared CPU cores and packaged data; each check's setup
line gives its exact sizes):

* data and width: MNIST-1D (20 000 generated training points) / digits instead of (Fashion-)MNIST,
  hidden width 64 instead of 1000 (Fig 4A times the paper's 1000-wide layers); 400 minibatch updates
  (2 epochs) instead of 6000;
* Fig 1C: Fisher batch 300 instead of 1000/4000; Fig 1D/2C: a 48-point subset of the 4000-point
  MNIST-1D instead of 1000 images (the Full Fisher has 10 columns per input and a 10N × 10N Cholesky
  per update); Fig 2A uses 1000 digits images;
* SGD momentum fixed at 0.9 (the paper also tried 0); the curvature methods run without momentum,
  like the paper's code;
* Fig 4A: single-thread CPU timings on a shared machine, not GPU timings."""


def missing_requirements(requires: Any) -> list[str]:
    """The ``"module:attribute"`` requirements that cannot be imported."""
    out = []
    for req in requires:
        module, _, attr = req.partition(":")
        try:
            mod = importlib.import_module(module)
            if attr and not hasattr(mod, attr):
                out.append(req)
        except ImportError:
            out.append(req)
    return out


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(v: Any) -> str:
    if v is None:
        return "diverged"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "diverged"
        return f"{v:.3g}"
    return str(v)


def load_results(folder: Path) -> list[dict[str, Any]]:
    """The check JSONs in ``folder``, in :data:`CHECKS` order."""
    out = []
    for name in CHECKS:
        path = folder / f"{name}.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
    return out


def render(results: list[dict[str, Any]], meta: dict[str, Any] | None, figure_prefix: str = "") -> str:
    """The markdown text of the report."""
    lines = ["# Paper checks: Benzing (2022) on packaged data", ""]
    if meta:
        total = meta.get("seconds", 0.0)
        lines += [
            f"Last invocation: `{meta.get('command', 'python -m paper_checks')}` "
            f"(level `{meta.get('level')}`, {meta.get('seeds')} seeds, {meta.get('jobs')} worker "
            f"processes), finished {meta.get('finished')}; that run took **{total / 60:.1f} min** "
            f"and ran {len(meta.get('checks', []))} check(s).",
            "",
        ]
        if meta.get("notes"):
            lines += [f"*Run notes.* {meta['notes']}", ""]
    levels = sorted({r.get("level", "") for r in results})
    check_total = sum(r.get("seconds", 0.0) for r in results)
    lines += [f"Sum of the per-check wall times below: {check_total / 60:.1f} min "
              f"(result levels: {', '.join(levels)}).", ""]
    extra = [r for r in results if r.get("details", {}).get("section") == "differences"]
    results = [r for r in results if r not in extra]
    counts = {v: sum(r["verdict"] == v for r in results)
              for v in ("holds", "partly", "does not hold", "not run")}
    lines += ["Verdicts: " + ", ".join(f"{k}: {v}" for k, v in counts.items()), ""]
    lines += ["| # | Claim | Paper | Ours | Verdict (caveats) | Figure |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        fig = f"[{r['name']}]({figure_prefix}{r['figure']})" if r.get("figure") else "-"
        cav = "; ".join(r.get("caveats") or [])
        lines.append(f"| {i} | **{_cell(r['title'])}**: {_cell(r['claim'])} | {_cell(r['paper'])} | "
                     f"{_cell(r['ours'])} | **{r['verdict']}**{' (' + _cell(cav) + ')' if cav else ''} "
                     f"| {fig} |")
    by_order: dict[str, list[str]] = {}
    for r in results + extra:
        by_order.setdefault(r.get("environment", {}).get("kfac_foof_update_order", "?"), []).append(r["name"])
    order = (next(iter(by_order)) if len(by_order) == 1 else
             "; ".join(f"{k} ({', '.join(v)})" for k, v in by_order.items()))
    lines += ["", *_provenance(results + extra), PROTOCOL.replace("{order}", order), "", DEVIATIONS, ""]
    for r in extra:
        lines += ["## Where our implementation and the paper's public code differ", "",
                  *[f"* {part}" for part in r.get("details", {}).get("lines", [r["ours"]])], ""]
        lines += _section(r, figure_prefix, header=False)
    for r in results:
        lines += _section(r, figure_prefix)
    if results:
        env = results[0].get("environment", {})
        lines += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def _widening(m: dict[str, Any]) -> str:
    s = m.get("search", {})
    wid = ", ".join(f"{k} ×{v}" for k, v in (s.get("widened") or {}).items())
    capped, axes = s.get("capped_edges") or [], m.get("widen_axes", ["lr", "damping"])
    why = {True: "cap", False: "fixed axis"}
    edge = ", ".join(f"{e} ({why[e in capped] if e in capped or e.split()[0] not in axes else 'not widened'})"
                     for e in m.get("best_on_grid_edge", []))
    out = f"widened {wid}" if wid else "-"
    if edge:
        out += f"; still on edge: {edge}"
    if "lr low (all diverged)" in capped:
        out += "; nothing converged within the cap"
    return out


def _provenance(results: list[dict[str, Any]]) -> list[str]:
    """Which invocation and commit produced each check's result."""
    out = ["**Provenance** (each check's JSON records the command, commit and finishing time of the "
           "invocation that produced it; `+dirty`: uncommitted changes to curvkit/ or paper_checks/):", "",
           "| check | command | commit | finished (UTC) | wall time |", "|---|---|---|---|---|"]
    for r in results:
        env = r.get("environment", {})
        cmd = (r.get("command") or "-").split(" --notes ")[0]  # the notes are in the run notes
        out.append(f"| {r['name']} | `{cmd}` | {env.get('commit', 'not recorded')} | "
                   f"{env.get('finished_utc', 'not recorded')} | {r.get('seconds', 0.0) / 60:.1f} min |")
    return out + [""]


def _section(r: dict[str, Any], figure_prefix: str, header: bool = True) -> list[str]:
    out = [f"## {r['title']} (`{r['name']}`)", "",
           f"*Claim.* {r['claim']}", "",
           f"*Paper.* {r['paper']}", "",
           f"*Setup.* {r.get('setup') or '-'}", "",
           f"*Ours.* {r['ours']}", "",
           f"*Rule.* {r['rule']}", "",
           f"*Verdict.* **{r['verdict']}** ({r.get('seconds', 0.0):.0f} s, level {r.get('level')}, "
           f"{r.get('seeds')} seeds)", ""] if header else [f"*Setup.* {r.get('setup') or '-'}", ""]
    if r.get("caveats") and header:
        out += ["*Caveats.* " + "; ".join(r["caveats"]), ""]
    methods = r.get("details", {}).get("methods", [])
    if methods:
        out += ["| method | grid (after widening) | selected η | selected λ | widening | final loss, median "
                "[min–max] | loss at early budgets | test acc | s/update |",
                "|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            finals = [v for v in m.get("final_losses", [])]
            if m.get("final_median") is not None and finals and None not in finals:
                fl = f"{_num(m['final_median'])} [{_num(min(finals))}–{_num(max(finals))}]"
            else:
                fl = f"diverged ({m.get('diverged_seeds')} seeds)"
            bud = ", ".join(f"@{k}: {_num(v)}" for k, v in (m.get("budget_losses") or {}).items()) or "-"
            accs = [a for a in m.get("test_acc", []) if a is not None]
            acc = f"{100 * sorted(accs)[len(accs) // 2]:.1f}%" if accs else "-"
            out.append(f"| {_cell(m['label'])} | {_cell(m['grid'])} | {_num(m['lr'])} | "
                       f"{_num(m['damping']) if m['damping'] is not None else '-'} | {_cell(_widening(m))} | "
                       f"{fl} | {bud} | {acc} | {_num(m.get('seconds_per_update'))} |")
        out.append("")
    notes = r.get("details", {}).get("notes")
    if notes:
        out += [f"*Notes.* {notes}", ""]
    if r.get("figure"):
        out += [f"![{r['name']}]({figure_prefix}{r['figure']})", ""]
    return out


def write_report(folder: Path, path: Path, figure_prefix: str = "") -> str:
    """Render the report of the JSONs in ``folder`` (and ``_run.json``) into ``path``."""
    meta_path = folder / "_run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    text = render(load_results(folder), meta, figure_prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text
