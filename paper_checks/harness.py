"""Shared harness of the paper checks: data, model, optimizers, training loop, grid search, seeds,
verdict rules, figures and the JSON writer.

Protocol (Benzing 2022, App. D.5, scaled to a 2-core CPU; see ``REPORT.md``):

* MLP without biases, ReLU, Kaiming-normal initialisation with the ReLU gain on *all* layers
  (including the last), cross-entropy on the logits;
* batch 100 (or full batch for the subset controls), constant learning rate and damping;
* every method gets its own grid search, selected by the **final training loss** (loss on the
  whole training set after the last update) of seed 0; the selected point is then run with the
  remaining seeds and reported as mean ± std over seeds (the seed-0 grid run is one of them); if
  it diverges on another seed, the next-best point is taken (at most ``MAX_FALLBACKS`` times);
* a run whose loss becomes non-finite (or whose optimizer refuses a step) counts as diverged,
  with final loss ``inf`` for the ranking (``null`` in the JSON).

Hyperparameter units. curvkit's KFAC and FOOF factors are batch *means* (``Â = (1/N) Σ a aᵀ``),
the paper code's dense-layer ``A`` factor is a batch *sum*; with batch ``N = 100`` the paper's
``(η_p, λ_p)`` therefore map to ``η_c = η_p/N``, ``λ_c = λ_p/N`` for FOOF/KFAC (the effective SGD
step ``η/λ`` is unchanged, and both grids ``{1,3}×10^i`` and ``10^{2i}`` map onto themselves because
``N = 10²``). curvkit's natural gradient uses the mean Fisher with ``g_i/√N`` columns like the paper,
so its values carry over unchanged -- except that the paper's private code scaled the MC and the
Full Fisher differently (App. D.4), so the Full-Fisher values of Table 1 are not comparable.
Natural-gradient grids are therefore parametrised by ``α = η/λ`` (App. D.3's recommendation),
which keeps the learning rates on the ``{1,3}×10^i`` grid because every ``λ`` is a power of ten.

Reproducibility: every random stream (initialisation, batch order, MC labels, independent Fisher
batches) comes from its own ``torch.Generator`` seeded from the run's seed. Runs execute in worker
processes (``--jobs``) with one intra-op thread each.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from curvkit.linalg import SingularError

REPO_ROOT = Path(__file__).resolve().parents[1]
PKG_DIR = Path(__file__).resolve().parent

HOLDS, PARTLY, FAILS = "holds", "partly", "does not hold"
NOT_RUN = "not run"
VERDICTS = (HOLDS, PARTLY, FAILS, NOT_RUN)

#: Batch size of the paper's minibatch experiments; also the ``N`` of the η/λ mapping.
BATCH = 100
#: How many next-best grid points :meth:`Harness.tune` tries when the selected one diverges on
#: another seed.
MAX_FALLBACKS = 2


# ---------------------------------------------------------------------------------------- config
@dataclass
class Config:
    """How a check runs.

    Attributes:
        level: ``"full"`` (the REPORT run), ``"quick"`` (every check at reduced size, < 10 min in
            total) or ``"tiny"`` (unit tests: a few seconds per check).
        seeds: number of seeds per selected hyperparameter point.
        jobs: worker processes for training runs (1 = in-process).
        out_dir: where ``<name>.json`` and ``figures/<name>.png`` are written.
        commit: also write the committed copies ``paper_checks/results/<name>.json`` and
            ``paper_checks/figures/<name>.png`` (full runs only).
        progress: show tqdm progress bars.
        command: the command line, recorded in every JSON.
    """

    level: str = "full"
    seeds: int = 3
    jobs: int = 1
    out_dir: Path = REPO_ROOT / "results"
    commit: bool = False
    progress: bool = True
    command: str = ""

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


# ---------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Setup:
    """Data, network and training length of a run (hashable: part of the run cache key).

    Attributes:
        data: ``"mnist1d"`` (4000 train, 40 features) or ``"digits"`` (1438 train, 64 features).
        n_train: use a fixed random subset of this many training points (``None``: all).
        hidden: hidden widths of the MLP (``()``: logistic regression).
        batch_size: minibatch size; ``None`` = full batch.
        steps: number of updates.
        eval_every: evaluate the full training loss every this many updates.
    """

    data: str = "mnist1d"
    n_train: int | None = None
    hidden: tuple[int, ...] = (128, 128, 128)
    batch_size: int | None = BATCH
    steps: int = 1000
    eval_every: int = 50

    def describe(self) -> str:
        sub = f"{self.n_train}-point subset of " if self.n_train else ""
        arch = "-".join(["in", *map(str, self.hidden), "10"])
        batch = "full batch" if self.batch_size is None else f"batch {self.batch_size}"
        return f"{sub}{self.data}, MLP {arch} (no biases), {batch}, {self.steps} updates"


@functools.lru_cache(maxsize=8)
def dataset(name: str, n_train: int | None = None):
    """The training data ``(x, y, num_classes)`` of a packaged data set (cached per process)."""
    from curvkit import datasets

    if name == "mnist1d":
        ds = datasets.load_mnist1d()
    elif name == "digits":
        ds = datasets.load_digits()
    else:
        raise ValueError(f"unknown data set {name!r}; supported: 'mnist1d', 'digits'")
    if n_train is not None:
        ds = datasets.subset(ds, n_train, seed=42)
    return ds


def mlp(d_in: int, hidden: Sequence[int], d_out: int, generator: torch.Generator) -> nn.Sequential:
    """Bias-free ReLU MLP with Kaiming-normal (ReLU gain) initialisation of every layer."""
    dims = [d_in, *hidden, d_out]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(a, b, bias=False)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu", generator=generator)
        mods.append(lin)
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


# ---------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """An optimizer with its fixed options (hashable).

    ``opt`` is one of ``"sgd"`` (momentum 0.9 unless given), ``"adam"``, ``"foof"``, ``"kfac"``,
    ``"natural"``; ``options`` are keyword arguments of the optimizer (plus ``fisher_size``: the
    size of the independent Fisher batches of the natural gradient). The label is not part of the
    equality, so identically configured methods under different labels share cached runs.
    """

    label: str = field(compare=False)
    opt: str = ""
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, label: str, opt: str, **options: Any) -> Method:
        if opt not in ("sgd", "adam", "foof", "kfac", "natural"):
            raise ValueError(f"unknown optimizer {opt!r}")
        return cls(label, opt, tuple(sorted(options.items())))

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def uses_damping(self) -> bool:
        return self.opt in ("foof", "kfac", "natural")


def _fisher_batches(x: Tensor, size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless independent random Fisher batches (without replacement within a batch)."""
    n = x.shape[0]
    while True:
        if size >= n:
            yield x
        else:
            yield x[torch.randperm(n, generator=generator)[:size]]


def make_optimizer(method: Method, model: nn.Module, lr: float, damping: float | None,
                   seed: int, x_train: Tensor, full_batch: bool) -> torch.optim.Optimizer:
    """Build the optimizer of ``method`` through curvkit's (or torch's) public API."""
    o = method.opts
    if method.opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.get("momentum", 0.9))
    if method.opt == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    from curvkit.optim import FOOF, KFAC, NaturalGradient

    gen = torch.Generator().manual_seed(30_000 + seed)
    assert damping is not None
    if method.opt == "foof":
        T = o.get("inv_period", 1)
        return FOOF(model, lr=lr, damping=damping, ema_decay=o.get("ema_decay", 0.95), inv_period=T,
                    ema_steps=o.get("ema_steps", T), momentum=o.get("momentum", 0.0))
    if method.opt == "kfac":
        T = o.get("inv_period", 1)
        return KFAC(model, lr=lr, damping=damping, kind=o.get("kind", "mc"),
                    damping_mode=o.get("damping_mode", "heuristic"), ema_decay=o.get("ema_decay", 0.95),
                    inv_period=T, ema_steps=o.get("ema_steps", T), momentum=o.get("momentum", 0.0),
                    generator=gen)
    fisher_batch = o.get("fisher_batch", "same" if full_batch else "independent")
    loader = None
    if fisher_batch == "independent":
        loader = _fisher_batches(x_train, o.get("fisher_size", BATCH),
                                 torch.Generator().manual_seed(40_000 + seed))
    return NaturalGradient(model, lr=lr, damping=damping, kind=o.get("kind", "mc"),
                           structure=o.get("structure", "full"), fisher_batch=fisher_batch,
                           inv_period=o.get("inv_period", 1), momentum=o.get("momentum", 0.0),
                           generator=gen, fisher_loader=loader)


# ---------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec:
    """One training run (hashable: the cache key).

    ``probe`` names a function ``"module:function"`` called as ``probe(step, model, opt, x, y,
    loss)`` after the backward pass and before ``opt.step()``; it returns a dict of floats that is
    appended to ``Run.probe``.
    """

    setup: Setup
    method: Method
    lr: float
    damping: float | None
    seed: int
    probe: str | None = None


@dataclass
class Run:
    """The outcome of one training run."""

    steps: list[int]
    loss: list[float]
    final: float
    diverged: bool
    seconds: float
    step_seconds: float
    probe: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None


def _resolve(name: str) -> Callable[..., dict[str, float]]:
    module, fn = name.split(":")
    return getattr(importlib.import_module(module), fn)


@torch.no_grad()
def full_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy on ``(x, y)`` (chunks of 2000), the log-softmax taken in float64 so that
    losses far below float32's resolution near 0 stay measurable."""
    total = 0.0
    for xs, ys in zip(x.split(2000), y.split(2000)):
        total += float(F.cross_entropy(model(xs).double(), ys, reduction="sum"))
    return total / x.shape[0]


def train(spec: RunSpec, progress: bool = False) -> Run:
    """Train one MLP as ``spec`` says and return its training-loss curve.

    The curve holds the full training loss at step 0 and every ``eval_every`` updates and after
    the last update. A non-finite loss or gradient, or an optimizer refusing a step, ends the run
    as diverged (``final = inf``).
    """
    s = spec.setup
    ds = dataset(s.data, s.n_train)
    x, y = ds.x_train, ds.y_train
    n = x.shape[0]
    model = mlp(x.shape[1], s.hidden, ds.num_classes, torch.Generator().manual_seed(10_000 + spec.seed))
    full_batch = s.batch_size is None or s.batch_size >= n
    opt = make_optimizer(spec.method, model, spec.lr, spec.damping, spec.seed, x, full_batch)
    probe = _resolve(spec.probe) if spec.probe else None
    order_gen = torch.Generator().manual_seed(20_000 + spec.seed)
    bs = n if full_batch else int(s.batch_size)  # type: ignore[arg-type]
    perm, pos = torch.randperm(n, generator=order_gen), 0
    steps, losses, records = [0], [full_loss(model, x, y)], []
    diverged, error, n_done = False, None, 0
    t0 = time.perf_counter()
    train_time = 0.0
    bar = tqdm(range(s.steps), desc=f"{spec.method.label} lr={spec.lr:g} λ={spec.damping} s{spec.seed}",
               leave=False, disable=not progress, mininterval=1.0)
    for t in bar:
        if full_batch:
            xb, yb = x, y
        else:
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=order_gen), 0
            idx = perm[pos: pos + bs]
            pos += bs
            xb, yb = x[idx], y[idx]
        ts = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        if not math.isfinite(float(loss.detach())):
            diverged = True
            break
        loss.backward()
        if probe is not None:
            records.append(probe(t, model, opt, xb, yb, loss))
        try:
            opt.step()
        except (FloatingPointError, torch.linalg.LinAlgError, SingularError) as err:
            diverged, error = True, f"{type(err).__name__} at step {t}: {str(err)[:200]}"
            break
        train_time += time.perf_counter() - ts
        n_done += 1
        if (t + 1) % s.eval_every == 0 or t + 1 == s.steps:
            value = full_loss(model, x, y)
            steps.append(t + 1)
            losses.append(value)
            if not math.isfinite(value) or value > 1e3:
                diverged = True
                break
    bar.close()
    final = math.inf if diverged else losses[-1]
    return Run(steps, losses, final, diverged, time.perf_counter() - t0, train_time / max(1, n_done),
               records, error)


def _worker_init() -> None:
    torch.set_num_threads(1)


def _execute(spec: RunSpec) -> Run:
    return train(spec)


# ---------------------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class Grid:
    """A hyperparameter grid.

    Attributes:
        lrs: learning rates, or ratios ``α = η/λ`` if ``ratio``.
        dampings: damping values (``(None,)`` for SGD/Adam).
        ratio: whether ``lrs`` are ``α = η/λ`` (then ``η = α·λ``).
    """

    lrs: tuple[float, ...]
    dampings: tuple[float | None, ...] = (None,)
    ratio: bool = False

    def points(self) -> list[tuple[float, float | None, float]]:
        """``(lr, damping, grid value)`` triples, dampings outermost."""
        out = []
        for d in self.dampings:
            for a in self.lrs:
                lr = _round(a * d) if (self.ratio and d is not None) else a
                out.append((lr, d, a))
        return out

    def describe(self) -> str:
        lr = "α=η/λ" if self.ratio else "η"
        d = "" if self.dampings == (None,) else f", λ ∈ {{{', '.join(f'{v:g}' for v in self.dampings)}}}"
        return f"{lr} ∈ {{{', '.join(f'{v:g}' for v in self.lrs)}}}{d}"


def _round(v: float) -> float:
    return float(f"{v:.6g}")


@dataclass
class MethodResult:
    """Grid search and seeds of one method."""

    label: str
    method: Method
    grid: Grid
    table: list[dict[str, Any]]
    lr: float
    damping: float | None
    edges: list[str]
    finals: list[float]
    curve_steps: list[int]
    curve_mean: list[float]
    curve_std: list[float]
    runs: list[Run]
    fallbacks: int = 0

    @property
    def mean(self) -> float:
        return float(np.mean(self.finals))

    @property
    def std(self) -> float:
        return float(np.std(self.finals))

    @property
    def diverged(self) -> bool:
        return not all(map(math.isfinite, self.finals))

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (non-finite numbers as ``null``)."""
        return {
            "label": self.label,
            "optimizer": self.method.opt,
            "options": self.method.opts,
            "grid": self.grid.describe(),
            "grid_table": [{k: _num(v) for k, v in row.items()} for row in self.table],
            "lr": self.lr,
            "damping": self.damping,
            "best_on_grid_edge": self.edges,
            "fallbacks": self.fallbacks,
            "final_losses": [_num(v) for v in self.finals],
            "final_mean": _num(self.mean),
            "final_std": _num(self.std),
            "diverged_seeds": sum(not math.isfinite(v) for v in self.finals),
            "seconds_per_update": _num(float(np.mean([r.step_seconds for r in self.runs]))),
            "curve": {"steps": self.curve_steps, "mean": [_num(v) for v in self.curve_mean],
                      "std": [_num(v) for v in self.curve_std]},
        }


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _edges(grid: Grid, lr: float, damping: float | None, table: list[dict[str, Any]]) -> list[str]:
    """Which grid boundaries the selected point lies on (only for axes with > 1 value)."""
    out = []
    key = [row["lr_or_ratio"] for row in table if row["damping"] == damping]
    sel = next(row["lr_or_ratio"] for row in table if row["lr"] == lr and row["damping"] == damping)
    if len(key) > 1:
        if sel == min(key):
            out.append("lr low")
        if sel == max(key):
            out.append("lr high")
    ds = [d for d in grid.dampings if d is not None]
    if len(ds) > 1 and damping is not None:
        if damping == min(ds):
            out.append("damping low")
        if damping == max(ds):
            out.append("damping high")
    return out


def _curves(runs: Sequence[Run]) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over seeds of the loss curves (a diverged seed makes the rest ``inf``)."""
    steps = max((r.steps for r in runs), key=len)
    rows = []
    for r in runs:
        vals = list(r.loss) + [math.inf] * (len(steps) - len(r.loss))
        rows.append(vals)
    arr = np.asarray(rows, dtype=float)
    with np.errstate(invalid="ignore"):
        mean = arr.mean(axis=0)
        std = arr.std(axis=0)
    return list(steps), [float(v) for v in mean], [float(v) for v in std]


# ---------------------------------------------------------------------------------------- harness
class Harness:
    """Runs training jobs (cached, optionally in parallel) and writes results for one CLI call.

    Args:
        cfg: the configuration.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cache: dict[RunSpec, Run] = {}
        self._pool: ProcessPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle
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

    # ------------------------------------------------------------------ runs
    def run_many(self, specs: Sequence[RunSpec], desc: str = "runs", parallel: bool = True) -> list[Run]:
        """Execute the runs not in the cache (in worker processes if ``jobs > 1`` and ``parallel``;
        ``parallel=False`` runs them one after the other in this process, e.g. for timing)."""
        todo = list(dict.fromkeys(s for s in specs if s not in self.cache))
        if todo:
            bar = tqdm(total=len(todo), desc=desc, disable=not self.cfg.progress, leave=False)
            if parallel and self.cfg.jobs > 1 and len(todo) > 1:
                if self._pool is None:
                    import multiprocessing as mp

                    self._pool = ProcessPoolExecutor(self.cfg.jobs, mp_context=mp.get_context("spawn"),
                                                     initializer=_worker_init)
                futures = {self._pool.submit(_execute, s): s for s in todo}
                from concurrent.futures import as_completed

                for fut in as_completed(futures):
                    self.cache[futures[fut]] = fut.result()
                    bar.update()
            else:
                for s in todo:
                    self.cache[s] = train(s, progress=self.cfg.progress)
                    bar.update()
            bar.close()
        return [self.cache[s] for s in specs]

    def tune(self, setup: Setup, plans: Sequence[tuple[Method, Grid]],
             seeds: Sequence[int] | None = None, desc: str = "grid") -> dict[str, MethodResult]:
        """Grid-search every method on seed 0 (final training loss), then run the selected point
        with all seeds. Grid points of all methods run together (parallel across methods).

        Stability rule: if the selected point diverges on another seed, the next-best grid point
        (by seed-0 final loss) is tried, up to :data:`MAX_FALLBACKS` times; the number of skipped
        points is reported (``fallbacks``). If every try diverges, the first choice is reported
        with its diverged seeds.
        """
        seeds = self.seeds if seeds is None else list(seeds)
        grid_specs = [[RunSpec(setup, m, lr, d, seeds[0]) for lr, d, _ in g.points()] for m, g in plans]
        flat = [s for group in grid_specs for s in group]
        self.run_many(flat, desc=f"{desc}: grid")
        ranked = []
        for group in grid_specs:
            finals = np.array([self.cache[s].final for s in group], dtype=float)
            order = [int(i) for i in np.argsort(np.where(np.isfinite(finals), finals, np.inf), kind="stable")]
            ranked.append([group[i] for i in order if math.isfinite(finals[i])] or [group[order[0]]])
        tries = [0] * len(plans)
        done = [False] * len(plans)

        def seed_specs(k: int) -> list[RunSpec]:
            c = ranked[k][tries[k]]
            return [RunSpec(setup, c.method, c.lr, c.damping, sd) for sd in seeds]

        for _ in range(MAX_FALLBACKS + 1):
            todo = [k for k in range(len(plans)) if not done[k]]
            if not todo:
                break
            self.run_many([s for k in todo for s in seed_specs(k)], desc=f"{desc}: seeds")
            for k in todo:
                stable = all(math.isfinite(self.cache[s].final) for s in seed_specs(k))
                if stable or tries[k] + 1 >= min(len(ranked[k]), MAX_FALLBACKS + 1):
                    done[k] = True
                    if not stable:
                        tries[k] = 0  # nothing stable: report the first choice
                else:
                    tries[k] += 1
        chosen = [ranked[k][tries[k]] for k in range(len(plans))]
        all_seed_specs = [seed_specs(k) for k in range(len(plans))]
        out: dict[str, MethodResult] = {}
        for (m, g), group, c, sspecs, nfb in zip(plans, grid_specs, chosen, all_seed_specs, tries):
            table = []
            for (_, _, a), s in zip(g.points(), group):
                table.append({"lr": s.lr, "damping": s.damping, "lr_or_ratio": a,
                              "final": self.cache[s].final})
            runs = [self.cache[s] for s in sspecs]
            steps, mean, std = _curves(runs)
            out[m.label] = MethodResult(
                label=m.label, method=m, grid=g, table=table, lr=c.lr, damping=c.damping,
                edges=_edges(g, c.lr, c.damping, table), finals=[r.final for r in runs],
                curve_steps=steps, curve_mean=mean, curve_std=std, runs=runs, fallbacks=nfb)
        return out

    def fixed(self, setup: Setup, method: Method, lr: float, damping: float | None,
              seeds: Sequence[int] | None = None, desc: str = "runs") -> MethodResult:
        """Run a fixed hyperparameter point (no search) with all seeds."""
        grid = Grid((lr,), (damping,))
        return self.tune(setup, [(method, grid)], seeds=seeds, desc=desc)[method.label]

    # ------------------------------------------------------------------ output
    def figure_path(self, name: str) -> Path:
        return self.cfg.out_dir / "figures" / f"{name}.png"

    def finish(self, result: CheckResult, fig: Any | None = None) -> CheckResult:
        """Save the figure and write ``<out_dir>/<name>.json`` (and the committed copies)."""
        import matplotlib.pyplot as plt

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
        result.level = self.cfg.level
        result.seeds = self.cfg.seeds
        result.command = self.cfg.command
        result.environment = environment()
        write_json(out / f"{result.name}.json", result.to_json())
        if self.cfg.commit:
            (PKG_DIR / "results").mkdir(exist_ok=True)
            write_json(PKG_DIR / "results" / f"{result.name}.json", result.to_json())
        return result


@dataclass
class CheckResult:
    """What one check reports.

    Attributes:
        name: short name (``fig1ab``, ...), also the JSON/figure file name.
        title: the paper's figure/section.
        claim: the claim, in words.
        paper: the paper's number(s) (math_spec §11).
        ours: our number(s), in words.
        verdict: ``holds``, ``partly``, ``does not hold`` or ``not run``.
        rule: the explicit rule that decided the verdict.
        setup: the data/network/protocol in words.
        details: everything measured (JSON-ready).
        seconds: wall time of the check.
        figure: path of the figure relative to the output folder.
    """

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
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (non-finite floats become ``null``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1, allow_nan=False, ensure_ascii=False) + "\n")


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "platform": sys.platform}


# ---------------------------------------------------------------------------------------- verdicts
def ratio(worse: MethodResult | float, better: MethodResult | float) -> float:
    """``mean(worse) / mean(better)`` (``inf`` if only the better one converged)."""
    w = worse.mean if isinstance(worse, MethodResult) else float(worse)
    b = better.mean if isinstance(better, MethodResult) else float(better)
    if not math.isfinite(w):
        return math.inf if math.isfinite(b) else math.nan
    if not math.isfinite(b):
        return 0.0
    return w / b if b > 0 else math.inf


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


def fmt(v: float | None, digits: int = 2) -> str:
    """Compact number: ``3.1e-03``, ``0.15``, ``inf`` for non-finite."""
    if v is None or not math.isfinite(v):
        return "diverged" if v is None or v > 0 else "-inf"
    if v == 0:
        return "0"
    if 1e-2 <= abs(v) < 1e3:
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits + 1}g}"
    return f"{v:.{digits - 1}e}"


def fmt_pm(m: MethodResult) -> str:
    """``mean ± std`` of a method's final losses."""
    if m.diverged:
        n = sum(not math.isfinite(v) for v in m.finals)
        return f"diverged ({n}/{len(m.finals)} seeds)"
    return f"{fmt(m.mean)} ± {fmt(m.std, 1)}"


def fmt_ratio(r: float) -> str:
    return "∞" if math.isinf(r) else (f"{r:.1f}×" if r < 100 else f"{r:.0f}×")


# ---------------------------------------------------------------------------------------- figures
def new_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure with ``ncols`` axes (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def plot_curves(ax: Any, results: Sequence[MethodResult], title: str = "", log: bool = True) -> None:
    """Mean ± std training-loss curves of several methods."""
    for m in results:
        s = np.asarray(m.curve_steps)
        mu = np.asarray(m.curve_mean)
        sd = np.asarray(m.curve_std)
        ok = np.isfinite(mu)
        label = f"{m.label} ({fmt_pm(m)})"
        (line,) = ax.plot(s[ok], mu[ok], label=label)
        lo = np.maximum(mu - sd, mu * 1e-2)
        ax.fill_between(s[ok], lo[ok], (mu + sd)[ok], color=line.get_color(), alpha=0.2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel("training loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def combine(verdicts: Sequence[str]) -> str:
    """One verdict from several sub-claims: all hold → holds; none better than ``does not hold``
    → does not hold; otherwise partly."""
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if all(v == FAILS for v in verdicts):
        return FAILS
    return PARTLY


def gap_closed(base: MethodResult, variant: MethodResult, kfac: MethodResult) -> float:
    """Fraction of the log-loss gap between ``base`` and KFAC that ``variant`` closes:
    ``log(L_base / L_variant) / log(L_base / L_kfac)`` (0: no help, 1: as good as KFAC; ``nan``
    if KFAC is not better than ``base``, i.e. there is no gap)."""
    lb, lv, lk = base.mean, variant.mean, kfac.mean
    if not (math.isfinite(lb) and math.isfinite(lk)) or lk >= lb or lk <= 0:
        return math.nan
    if not math.isfinite(lv):
        return -math.inf
    return math.log(lb / lv) / math.log(lb / lk)


def gap_verdict(f: float, kfac: MethodResult, variant: MethodResult) -> str:
    """``holds`` if the variant closes at most half of the (log) gap and every KFAC seed stays
    below every variant seed; ``partly`` if KFAC is still better on average; otherwise (or if
    there is no gap to begin with) ``does not hold``."""
    if math.isnan(f):
        return FAILS
    if f <= 0.5 and separated(kfac, variant):
        return HOLDS
    if kfac.mean < variant.mean:
        return PARTLY
    return FAILS
