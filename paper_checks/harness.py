"""The harness of the paper checks: configuration, the run cache and worker pool, the searches
of :mod:`paper_checks.grids` run for several methods in lockstep, and the JSON results.

Protocol (Benzing 2022, App. D.5, scaled to a 2-core CPU; see ``REPORT.md``): every method gets
its own grid search over **independent** learning-rate and damping axes (or ``α = η/λ`` where a
check says so), screened on the first seed; the ``Config.screen`` best points run with every seed
and the point with the lowest **median** final training loss is selected; an axis whose selected
point sits on its edge is widened automatically (up to ``Config.cap`` times per side). Results are
reported as median and [min–max] over the seeds.

Hyperparameter units. curvkit's KFAC and FOOF factors are batch *means*, the paper code's
dense-layer ``A`` factor is a batch *sum*; with batch ``N = 100`` the paper's ``(η_p, λ_p)`` map to
``η_c = η_p/N``, ``λ_c = λ_p/N`` for FOOF/KFAC (grids ``{1,3}×10^i`` and ``10^{2i}`` map onto
themselves because ``N = 10²``). curvkit's natural gradient uses the mean Fisher with ``g_i/√N``
columns like the paper, so its values carry over.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from paper_checks.grids import WIDEN_CAP, Grid, Key, Search, edges, score
from paper_checks.runs import BATCH, REPO_ROOT, Method, Run, RunSpec, Setup, dataset, mlp, train
from paper_checks.verdicts import (
    FAILS,
    HOLDS,
    NOT_RUN,
    PARTLY,
    VERDICTS,
    budget_line,
    caveats,
    combine,
    fmt,
    fmt_budgets,
    fmt_pm,
    fmt_ratio,
    gap_closed,
    gap_verdict,
    new_figure,
    plot_curves,
    ratio,
    ratio_verdict,
    separated,
    style_axis,
)

PKG_DIR = Path(__file__).resolve().parent


@dataclass
class Config:
    """How a check runs.

    Attributes:
        level: ``"full"`` (the REPORT run), ``"quick"`` (every check at reduced size, CI smoke
            test) or ``"tiny"`` (unit tests: a few seconds per check).
        seeds: number of seeds per candidate point (the median needs ≥ 3 for a full run).
        jobs: worker processes for training runs (1 = in-process).
        out_dir: where ``<name>.json`` and ``figures/<name>.png`` are written.
        commit: also write the committed copies under ``paper_checks/`` (full runs only).
        progress: show tqdm progress bars.
        command: the command line, recorded in every JSON.
        screen: candidates (best by the first seed) that run with every seed; ``None``: all.
        cap: automatic widenings per axis side.
    """

    level: str = "full"
    seeds: int = 3
    jobs: int = 1
    out_dir: Path = REPO_ROOT / "results"
    commit: bool = False
    progress: bool = True
    command: str = ""
    screen: int | None = 2
    cap: int = WIDEN_CAP

    def __post_init__(self) -> None:
        if self.level not in ("full", "quick", "tiny"):
            raise ValueError(f"level must be 'full', 'quick' or 'tiny', got {self.level!r}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be ≥ 1, got {self.seeds}")
        self.out_dir = Path(self.out_dir)

    def pick(self, full: Any, quick: Any, tiny: Any = None) -> Any:
        """The value for the current level (``tiny`` defaults to ``quick``)."""
        if self.level == "full":
            return full
        if self.level == "quick" or tiny is None:
            return quick
        return tiny


def _median_curve(runs: Sequence[Run]) -> tuple[list[int], list[float], list[float], list[float]]:
    steps = max((r.steps for r in runs), key=len)
    arr = np.asarray([list(r.loss) + [math.inf] * (len(steps) - len(r.loss)) for r in runs], dtype=float)
    return list(steps), *([float(v) for v in f(arr, axis=0)] for f in (np.median, np.min, np.max))


@dataclass
class MethodResult:
    """The search and the selected point's seeds of one method."""

    label: str
    method: Method
    grid: Grid
    table: list[dict[str, Any]]
    lr: float
    damping: float | None
    edges: list[str]
    finals: list[float]
    runs: list[Run]
    search: dict[str, Any] = field(default_factory=dict)
    budgets: tuple[int, ...] = ()

    @property
    def mean(self) -> float:
        return float(np.mean(self.finals))

    @property
    def median(self) -> float:
        return score(self.finals)[0] if all(map(math.isfinite, self.finals)) else math.inf

    @property
    def std(self) -> float:
        return float(np.std(self.finals))

    @property
    def diverged(self) -> bool:
        return not all(map(math.isfinite, self.finals))

    @property
    def budget_losses(self) -> dict[int, float]:
        return {b: float(np.median([r.at(b) for r in self.runs])) for b in self.budgets}

    @property
    def test_acc(self) -> float:
        return float(np.median([r.test_acc for r in self.runs]))

    @property
    def curve(self) -> tuple[list[int], list[float], list[float], list[float]]:
        return _median_curve(self.runs)

    curve_steps = property(lambda self: self.curve[0])
    curve_median = property(lambda self: self.curve[1])
    curve_min = property(lambda self: self.curve[2])
    curve_max = property(lambda self: self.curve[3])

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (non-finite numbers as ``null``)."""
        steps, med, lo, hi = self.curve
        return {
            "label": self.label, "optimizer": self.method.opt, "options": self.method.opts,
            "grid": self.grid.describe(), "widen_axes": list(self.grid.widen), "grid_table": self.table,
            "lr": self.lr,
            "damping": self.damping, "best_on_grid_edge": self.edges, "search": self.search,
            "final_losses": self.finals, "final_median": self.median, "final_mean": self.mean,
            "final_std": self.std, "diverged_seeds": sum(not math.isfinite(v) for v in self.finals),
            "budget_losses": {str(k): v for k, v in self.budget_losses.items()},
            "test_acc": [r.test_acc for r in self.runs], "test_loss": [r.test_loss for r in self.runs],
            "seconds_per_update": float(np.mean([r.step_seconds for r in self.runs])),
            "curve": {"steps": steps, "median": med, "min": lo, "max": hi},
        }


class Harness:
    """Runs training jobs (cached, optionally in parallel) and writes results for one CLI call."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cache: dict[RunSpec, Run] = {}
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def pick(self, full: Any, quick: Any, tiny: Any = None) -> Any:
        return self.cfg.pick(full, quick, tiny)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.cfg.seeds))

    def run_many(self, specs: Sequence[RunSpec], desc: str = "runs", parallel: bool = True) -> list[Run]:
        """Execute the runs not in the cache (in worker processes if ``jobs > 1`` and ``parallel``)."""
        todo = list(dict.fromkeys(s for s in specs if s not in self.cache))
        if todo:
            bar = tqdm(total=len(todo), desc=desc, disable=not self.cfg.progress, leave=False)
            if parallel and self.cfg.jobs > 1 and len(todo) > 1:
                if self._pool is None:
                    import multiprocessing as mp

                    self._pool = ProcessPoolExecutor(self.cfg.jobs, mp_context=mp.get_context("spawn"),
                                                     initializer=torch.set_num_threads, initargs=(1,))
                # longest first (full-batch Fisher runs, many steps) so the workers finish together
                order = sorted(todo, key=lambda s: -(s.setup.steps * (1 + 20 * (s.setup.batch_size is None))))
                futures = {self._pool.submit(train, s): s for s in order}
                for fut in as_completed(futures):
                    self.cache[futures[fut]] = fut.result()
                    bar.update()
            else:
                for s in todo:
                    self.cache[s] = train(s, progress=self.cfg.progress)
                    bar.update()
            bar.close()
        return [self.cache[s] for s in specs]

    def tune(self, setup: Setup, plans: Sequence[tuple[Method, Grid]], seeds: Sequence[int] | None = None,
             desc: str = "grid", screen: int | None | str = "config") -> dict[str, MethodResult]:
        """Search every method (:mod:`paper_checks.grids`: screen on the first seed, median over
        all seeds of the best ``screen`` points, automatic widening of edges), all methods in
        lockstep so that their runs share the worker pool."""
        seeds = self.seeds if seeds is None else list(seeds)
        scr = self.cfg.screen if screen == "config" else screen
        searches = [Search(g, seeds, scr, self.cfg.cap) for _, g in plans]

        def spec(k: int, key: Key, sd: int) -> RunSpec:
            return RunSpec(setup, plans[k][0], plans[k][1].lr_of(key), key[1], sd)

        rnd = 0
        while not all(s.done for s in searches):
            rnd += 1
            live = [k for k, s in enumerate(searches) if not s.done]
            need = [(k, key, sd) for k in live for key, sd in searches[k].need_screen()]
            self.run_many([spec(*t) for t in need], desc=f"{desc}: screen {rnd}")
            for k, key, sd in need:
                searches[k].record(key, sd, self.cache[spec(k, key, sd)].final)
            need = [(k, key, sd) for k in live for key, sd in searches[k].need_seeds()]
            self.run_many([spec(*t) for t in need], desc=f"{desc}: seeds {rnd}")
            for k in live:
                vals = {(key, sd): self.cache[spec(k, key, sd)].final for kk, key, sd in need if kk == k}
                searches[k].conclude(vals)
        out: dict[str, MethodResult] = {}
        for k, ((m, g), s) in enumerate(zip(plans, searches)):
            sel = s.selected
            assert sel is not None
            table = [{"lr": g.lr_of(key), "damping": key[1], "lr_or_ratio": key[0],
                      "first_seed": s.first[key],
                      "median": score(s.finals[key])[0] if key in s.finals else None,
                      "finals": s.finals.get(key)} for key in s.keys]
            # a diverged selection (nothing converged) may lack the seeds after the first
            runs = self.run_many([spec(k, sel, sd) for sd in seeds], desc=f"{desc}: selected")
            grid = Grid(tuple(sorted({key[0] for key in s.keys})),
                        tuple(sorted({key[1] for key in s.keys}, key=lambda v: -1 if v is None else v)),
                        g.ratio, g.widen)
            out[m.label] = MethodResult(
                label=m.label, method=m, grid=grid, table=table, lr=g.lr_of(sel), damping=sel[1],
                edges=edges(s.keys, sel) if math.isfinite(score(s.finals[sel])[0]) else [],
                finals=[r.final for r in runs], runs=runs,
                search=s.summary(), budgets=tuple(b for b in setup.budgets if b < setup.steps))
        return out

    def fixed(self, setup: Setup, method: Method, lr: float, damping: float | None,
              seeds: Sequence[int] | None = None, desc: str = "runs") -> MethodResult:
        """Run a fixed hyperparameter point (no search) with all seeds."""
        return self.tune(setup, [(method, Grid((lr,), (damping,), widen=()))], seeds=seeds, desc=desc,
                         screen=None)[method.label]

    def figure_path(self, name: str) -> Path:
        return self.cfg.out_dir / "figures" / f"{name}.png"

    def finish(self, result: CheckResult, fig: Any | None = None,
               methods: Sequence[MethodResult] = ()) -> CheckResult:
        """Save the figure and write ``<out_dir>/<name>.json`` (and the committed copies);
        ``methods`` (the results the verdict rests on) add their caveats to the verdict."""
        import matplotlib.pyplot as plt

        result.caveats = list(dict.fromkeys([*result.caveats, *caveats(methods)]))
        out = self.cfg.out_dir
        (out / "figures").mkdir(parents=True, exist_ok=True)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(self.figure_path(result.name), dpi=110, bbox_inches="tight")
            result.figure = f"figures/{result.name}.png"
            if self.cfg.commit:
                (PKG_DIR / "figures").mkdir(exist_ok=True)
                fig.savefig(PKG_DIR / "figures" / f"{result.name}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
        result.level, result.seeds, result.command = self.cfg.level, self.cfg.seeds, self.cfg.command
        result.environment = environment()
        write_json(out / f"{result.name}.json", result.to_json())
        if self.cfg.commit:
            write_json(PKG_DIR / "results" / f"{result.name}.json", result.to_json())
        return result


@dataclass
class CheckResult:
    """What one check reports (``caveats``: qualifications of the verdict, see
    :func:`paper_checks.verdicts.caveats`)."""

    name: str
    title: str
    claim: str
    paper: str
    ours: str
    verdict: str
    rule: str
    setup: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    figure: str | None = None
    level: str = ""
    seeds: int = 0
    command: str = ""
    environment: dict[str, Any] = field(default_factory=dict)
    caveats: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (Method, Grid)):
        return str(v)
    return v


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (non-finite floats become ``null``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1, allow_nan=False, ensure_ascii=False) + "\n")


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import inspect

    from curvkit.optim import KFAC

    order = ("Algorithm 1 (precondition_with available, default used)"
             if "precondition_with" in inspect.signature(KFAC.__init__).parameters
             else "current batch folded in before the update (this curvkit has no precondition_with)")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "platform": sys.platform, "kfac_foof_update_order": order,
            "commit": git_commit(), "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


@functools.cache
def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the repository (``+dirty`` if curvkit/ or paper_checks/
    have uncommitted changes; committed results/figures/REPORT.md do not count), or ``unknown``.

    Cached: the first call (``python -m paper_checks`` makes it when the invocation starts) fixes the
    value, so a result records the code it ran on even if the checkout moves during a long run."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        keep = [":!paper_checks/results", ":!paper_checks/figures", ":!paper_checks/REPORT.md"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "curvkit", "paper_checks", *keep],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


__all__ = [
    "BATCH", "FAILS", "HOLDS", "NOT_RUN", "PARTLY", "PKG_DIR", "REPO_ROOT", "VERDICTS", "CheckResult",
    "budget_line",
    "Config", "Grid", "Harness", "Method", "MethodResult", "Run", "RunSpec", "Setup", "caveats", "combine",
    "dataset", "fmt", "fmt_budgets", "fmt_pm", "fmt_ratio", "gap_closed", "gap_verdict", "mlp",
    "new_figure", "plot_curves", "ratio", "ratio_verdict", "separated", "style_axis", "train",
]
