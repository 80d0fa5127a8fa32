"""Data, network, optimizers and the training loop of one run (hashable specs: the run cache key).

* MLP without biases, ReLU, Kaiming-normal initialisation with the ReLU gain on *all* layers
  (including the last), cross-entropy on the logits;
* batch 100 (or full batch for the subset controls), constant learning rate and damping;
* App. K initialisation: FOOF/KFAC fill their factor EMAs from ``Setup.init_batches`` extra
  minibatches and invert once before the first update (``optimizer.initialize``);
* a run whose loss becomes non-finite (or whose optimizer refuses a step) counts as diverged,
  with final loss ``inf`` for the ranking (``null`` in the JSON).

Every random stream (initialisation, batch order, MC labels, independent Fisher batches, App. K
batches) comes from its own ``torch.Generator`` seeded from the run's seed.
"""

from __future__ import annotations

import functools
import importlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from curvkit.linalg import SingularError

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Batch size of the paper's minibatch experiments; also the ``N`` of the η/λ mapping.
BATCH = 100
#: Size of the generated large MNIST-1D (80% train: 20 000 training, 5 000 test points).
LARGE_MNIST1D = 25_000


@dataclass(frozen=True)
class Setup:
    """Data, network and training length of a run (hashable: part of the run cache key).

    Attributes:
        data: ``"mnist1d"`` (4000 train, 40 features), ``"mnist1d-20k"`` (the same generator with
            25 000 samples: 20 000 train, 5 000 test) or ``"digits"`` (1438 train, 64 features).
        n_train: use a fixed random subset of this many training points (``None``: all).
        hidden: hidden widths of the MLP (``()``: logistic regression).
        batch_size: minibatch size; ``None`` = full batch.
        steps: number of updates.
        eval_every: evaluate the full training loss every this many updates.
        budgets: early budgets (numbers of updates) at which the training loss is reported too
            (multiples of ``eval_every``).
        init_batches: App. K: minibatches that fill FOOF's/KFAC's factor EMAs before training.
    """

    data: str = "mnist1d"
    n_train: int | None = None
    hidden: tuple[int, ...] = (128, 128, 128)
    batch_size: int | None = BATCH
    steps: int = 1000
    eval_every: int = 50
    budgets: tuple[int, ...] = ()
    init_batches: int = 0

    def describe(self) -> str:
        sub = f"{self.n_train}-point subset of " if self.n_train else ""
        arch = "-".join(["in", *map(str, self.hidden), "10"])
        batch = "full batch" if self.batch_size is None else f"batch {self.batch_size}"
        init = f", App. K init from {self.init_batches} batch(es)" if self.init_batches else ""
        return f"{sub}{self.data}, MLP {arch} (no biases), {batch}, {self.steps} updates{init}"


def _large_mnist1d(seed: int = 42):
    """MNIST-1D generated with ``num_samples = 25 000`` (cached on disk under ``results/.cache``)."""
    from curvkit import datasets

    path = REPO_ROOT / "results" / ".cache" / f"mnist1d_{LARGE_MNIST1D}_{seed}.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = LARGE_MNIST1D, seed
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            d = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(d)}.tmp.npz")
        np.savez(tmp, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
        tmp.replace(path)
    d = np.load(path)
    x, xt = np.asarray(d["x"], np.float64), np.asarray(d["x_test"], np.float64)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    return datasets.Dataset(torch.from_numpy(((x - mean) / std).astype(np.float32)),
                            torch.from_numpy(np.asarray(d["y"], np.int64)),
                            torch.from_numpy(((xt - mean) / std).astype(np.float32)),
                            torch.from_numpy(np.asarray(d["y_test"], np.int64)), 10, "mnist1d-20k")


@functools.lru_cache(maxsize=8)
def dataset(name: str, n_train: int | None = None):
    """The data set ``name`` (cached per process), optionally a fixed training subset."""
    from curvkit import datasets

    if name == "mnist1d":
        ds = datasets.load_mnist1d()
    elif name == "mnist1d-20k":
        ds = _large_mnist1d()
    elif name == "digits":
        ds = datasets.load_digits()
    else:
        raise ValueError(f"unknown data set {name!r}; supported: 'mnist1d', 'mnist1d-20k', 'digits'")
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


@dataclass(frozen=True)
class Method:
    """An optimizer with its fixed options (hashable).

    ``opt`` is one of ``"sgd"`` (momentum 0.9 unless given), ``"adam"``, ``"foof"``, ``"kfac"``,
    ``"natural"``; ``options`` are keyword arguments of the optimizer plus ``fisher_size`` (the
    size of the independent Fisher batches of the natural gradient) and, for KFAC,
    ``standard_impl`` (``"public"``: the public code's transposed eigenbasis, see
    :mod:`paper_checks.variants`) and ``train_direction`` (``"foof_d9"``: train along App. D.9's
    FOOF'). The label is not part of the equality, so identically configured methods under
    different labels share cached runs.
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

    @property
    def factored(self) -> bool:
        return self.opt in ("foof", "kfac")


def _fisher_batches(x: Tensor, size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless independent random Fisher batches (without replacement within a batch)."""
    n = x.shape[0]
    while True:
        yield x if size >= n else x[torch.randperm(n, generator=generator)[:size]]


def make_optimizer(method: Method, model: nn.Module, lr: float, damping: float | None,
                   seed: int, x_train: Tensor, full_batch: bool) -> torch.optim.Optimizer:
    """Build the optimizer of ``method`` through curvkit's (or torch's) public API."""
    o = method.opts
    if method.opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.get("momentum", 0.9))
    if method.opt == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    from curvkit.optim import FOOF, NaturalGradient
    from paper_checks import variants

    gen = torch.Generator().manual_seed(30_000 + seed)
    if damping is None:
        raise ValueError(f"{method.label}: this optimizer needs a damping value")
    order = variants.order_kwargs(o.get("precondition_with"))
    if method.opt == "foof":
        T = o.get("inv_period", 1)
        return FOOF(model, lr=lr, damping=damping, ema_decay=o.get("ema_decay", 0.95), inv_period=T,
                    ema_steps=o.get("ema_steps", T), momentum=o.get("momentum", 0.0), **order)
    if method.opt == "kfac":
        T = o.get("inv_period", 1)
        cls = variants.kfac_class(o.get("standard_impl", "correct"), o.get("train_direction", "kfac"))
        extra = variants.direction_kwargs(o.get("train_direction", "kfac"))
        return cls(model, lr=lr, damping=damping, kind=o.get("kind", "mc"),
                   damping_mode=o.get("damping_mode", "heuristic"), ema_decay=o.get("ema_decay", 0.95),
                   inv_period=T, ema_steps=o.get("ema_steps", T), momentum=o.get("momentum", 0.0),
                   generator=gen, **order, **extra)
    fisher_batch = o.get("fisher_batch", "same" if full_batch else "independent")
    loader = None
    if fisher_batch == "independent":
        loader = _fisher_batches(x_train, o.get("fisher_size", BATCH),
                                 torch.Generator().manual_seed(40_000 + seed))
    return NaturalGradient(model, lr=lr, damping=damping, kind=o.get("kind", "mc"),
                           structure=o.get("structure", "full"), fisher_batch=fisher_batch,
                           inv_period=o.get("inv_period", 1), momentum=o.get("momentum", 0.0),
                           generator=gen, fisher_loader=loader)


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
    """The outcome of one training run (``test_*``: on the data set's test split, ``nan`` if
    diverged)."""

    steps: list[int]
    loss: list[float]
    final: float
    diverged: bool
    seconds: float
    step_seconds: float
    probe: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    test_loss: float = math.nan
    test_acc: float = math.nan

    def at(self, step: int) -> float:
        """Training loss after ``step`` updates (``inf`` if the run diverged before)."""
        return self.loss[self.steps.index(step)] if step in self.steps else math.inf


def _resolve(name: str) -> Callable[..., dict[str, float]]:
    module, fn = name.split(":")
    return getattr(importlib.import_module(module), fn)


@torch.no_grad()
def full_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy on ``(x, y)`` (chunks of 5000), the log-softmax taken in float64 so that
    losses far below float32's resolution near 0 stay measurable."""
    total = 0.0
    for xs, ys in zip(x.split(5000), y.split(5000)):
        total += float(F.cross_entropy(model(xs).double(), ys, reduction="sum"))
    return total / x.shape[0]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).double().mean())


def _batches(x: Tensor, y: Tensor, bs: int, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    n = x.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i: i + bs]
            yield x[idx], y[idx]


def train(spec: RunSpec, progress: bool = False) -> Run:
    """Train one MLP as ``spec`` says and return its training-loss curve and test metrics.

    The curve holds the full training loss at step 0, every ``eval_every`` updates and after the
    last update. A non-finite loss or gradient, or an optimizer refusing a step, ends the run as
    diverged (``final = inf``).
    """
    s = spec.setup
    ds = dataset(s.data, s.n_train)
    x, y = ds.x_train, ds.y_train
    n = x.shape[0]
    model = mlp(x.shape[1], s.hidden, ds.num_classes, torch.Generator().manual_seed(10_000 + spec.seed))
    full_batch = s.batch_size is None or s.batch_size >= n
    opt = make_optimizer(spec.method, model, spec.lr, spec.damping, spec.seed, x, full_batch)
    bs = n if full_batch else int(s.batch_size)  # type: ignore[arg-type]
    if spec.method.factored and s.init_batches:
        init = _batches(x, y, bs, torch.Generator().manual_seed(70_000 + spec.seed))
        opt.initialize([next(init)[0] for _ in range(s.init_batches)])  # type: ignore[attr-defined]
    probe = _resolve(spec.probe) if spec.probe else None
    batches = _batches(x, y, bs, torch.Generator().manual_seed(20_000 + spec.seed))
    steps, losses, records = [0], [full_loss(model, x, y)], []
    diverged, error, n_done = False, None, 0
    t0 = time.perf_counter()
    train_time = 0.0
    bar = tqdm(range(s.steps), desc=f"{spec.method.label} lr={spec.lr:g} λ={spec.damping} s{spec.seed}",
               leave=False, disable=not progress, mininterval=1.0)
    for t in bar:
        xb, yb = (x, y) if full_batch else next(batches)
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
    run = Run(steps, losses, final, diverged, time.perf_counter() - t0, train_time / max(1, n_done),
              records, error)
    if not diverged:
        run.test_loss = full_loss(model, ds.x_test, ds.y_test)
        run.test_acc = accuracy(model, ds.x_test, ds.y_test)
    return run
