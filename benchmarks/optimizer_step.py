"""Per-step wall time of SGD, Adam, FOOF, KFAC and the natural gradient, side by side (paper
Fig 4A and the ResNet wall-clock claim of §5).

Models (random data: timing does not need real images):

* ``mlp``: the paper's MLP 784-1000-1000-1000-10, ReLU, no biases, Kaiming-normal, batch 100;
  FOOF and KFAC at ``T = 1, 10, 100`` with ``S = T``.
* ``cnn``: a ResNet-8-style network (3×3 stem to 16 channels, three basic blocks of widths
  16/32/64 with strides 1/2/2 and 1×1 projection shortcuts, no BatchNorm, no biases, global
  average pooling, linear head) on CIFAR-shaped batches 3×32×32 of 100; FOOF and KFAC at
  ``T = 1, 10, 100`` (``S = T``) and ``T = 500, S = 10``.

FOOF/KFAC run with ``precondition_with="current"``: the work per step kind is the same in both
update orders, and the timing walks the step counter of that order.

Plus ASDL's ``KfacGradientMaker`` (+ SGD) when ``asdl`` is importable (not in ``--quick`` mode),
timed the same way: its three kinds of steps (curvature update + inversion, curvature update
only, preconditioning only) are measured with update intervals 1 or "never", and combined into
the same amortised formula for each ``(T, S)``.

**Interleaving.** Each of the ``--rounds`` rounds (default 5) times every method, in the order
A B C … in even rounds and … C B A in odd ones, with the two sides of each reported ratio next
to each other (:data:`TIMING_ORDER`); ratios (curvkit KFAC ÷ ASDL KFAC, FOOF ÷ KFAC,
each ÷ SGD) are formed per round from that round's samples and reported as median / min / max
over rounds, so slow drifts of a shared machine's load cancel.

A *step* is the whole training step ``zero_grad; loss = CE(model(x), y); backward; step``.
Steps of FOOF/KFAC fall into three kinds under Algorithm 1: *inversion* steps (``t ≡ 0 mod T``,
factor update + inversion), *statistics* steps (factor EMA update, and KFAC's extra backward)
and *plain* steps. Running full periods of ``T = 500`` steps for every optimizer does not fit a
CPU budget, so the benchmark times samples of each kind and reports the amortised per-step time
``(t_inv + (S−1)·t_stats + (T−S)·t_plain) / T`` from the median time of each kind. All methods are
timed round-robin in the same run, so ratios are measured side by side.

**Timing** is ``torch.utils.benchmark.Timer`` (``benchmarks/_common.py``): per method, kind and
round one ``blocked_autorange`` of at least ``--min-time`` seconds of single timed steps, after
its own untimed warm-up step; its untimed setup places the step counter (through
``state_dict``/``load_state_dict``) at a step of that kind before every timed step. ``--threads``
fixes the torch thread count (Timer keeps it during the measurement).

Usage::

    python benchmarks/optimizer_step.py --threads 1 --out results/optimizer_step.json
    python benchmarks/optimizer_step.py --quick      # tiny sizes, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import measure, ratio_stats, write_json  # noqa: E402
from curvkit.optim import FOOF, KFAC, FactoredOptimizer, NaturalGradient  # noqa: E402


# ---------------------------------------------------------------------- models
def make_mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


class BasicBlock(nn.Module):
    """``relu(conv(relu(conv(x))) + shortcut(x))`` without BatchNorm."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


def make_resnet8(width: int = 16, classes: int = 10) -> nn.Module:
    w = width
    model = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1, bias=False), nn.ReLU(),
        BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes, bias=False),
    )
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


# ---------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    family: str
    make: Callable[[nn.Module], object]
    T: int = 1
    S: int = 1
    times: dict[str, list[float]] = field(default_factory=lambda: {"plain": [], "stats": [], "inv": []})
    rounds: list[dict[str, list[float]]] = field(default_factory=list)  # the samples of each round


def asdl_available() -> bool:
    try:
        import asdl  # noqa: F401
    except Exception:
        return False
    return True


class AsdlKfac:
    """ASDL's KFAC (``KfacGradientMaker`` + SGD), driven like the others."""

    def __init__(self, model: nn.Module, lr: float, damping: float, batch: int, curvature: bool,
                 inversion: bool) -> None:
        import contextlib

        import asdl

        if not torch.cuda.is_available():  # asdl 0.1a4 wraps its work in NVTX ranges (CUDA-only)
            torch.cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()

        never = 10**9  # (every update also happens at ASDL's step 0, i.e. during the warm-up)
        cfg = asdl.PreconditioningConfig(data_size=batch, damping=damping, ema_decay=0.05,
                                         preconditioner_upd_interval=1 if inversion else never,
                                         curvature_upd_interval=1 if curvature else never)
        self.gm = asdl.KfacGradientMaker(model, cfg)
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        self.model = model

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        dummy = self.gm.setup_model_call(self.model, x)
        self.gm.setup_loss_call(F.cross_entropy, dummy, y)
        self.gm.forward_and_backward()
        self.opt.step()


def methods_for(model_name: str, quick: bool, batch: int) -> list[Method]:
    out = [
        Method("SGD", "sgd", lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)),
        Method("Adam", "adam", lambda m: torch.optim.Adam(m.parameters(), lr=1e-4)),
    ]
    schedules = [(1, 1), (10, 10), (100, 100)] + ([] if model_name == "mlp" else [(500, 10)])
    for T, S in schedules:
        out.append(Method(f"FOOF T={T}", "foof", lambda m, T=T, S=S: FOOF(
            m, lr=0.3, damping=1.0, inv_period=T, ema_steps=S, momentum=0.9,
            precondition_with="current"), T, S))  # same work per step; the timing walks this order
        out.append(Method(f"KFAC T={T}", "kfac", lambda m, T=T, S=S: KFAC(
            m, lr=0.003, damping=0.01, inv_period=T, ema_steps=S, momentum=0.9,
            precondition_with="current"), T, S))
    out.append(Method("NaturalGradient", "natural", lambda m: NaturalGradient(
        m, lr=1e-3, damping=0.01, momentum=0.9)))
    if asdl_available() and not quick:
        kinds = [("inv", True, True), ("stats", True, False)]
        if any(T > S for T, S in schedules):
            kinds.append(("plain", False, False))
        for kind, curv, inv in kinds:
            out.append(Method(f"ASDL KFAC [{kind}]", "asdl", lambda m, c=curv, i=inv: AsdlKfac(
                m, lr=0.003, damping=0.01, batch=batch, curvature=c, inversion=i)))
    return sorted(out, key=lambda m: TIMING_ORDER.index(m.name))


#: The order methods are timed in within a round (reversed every other round): the two sides of
#: each reported ratio are neighbours, so they are measured close together in time.
TIMING_ORDER = ["FOOF T=1", "KFAC T=1", "ASDL KFAC [inv]", "ASDL KFAC [stats]", "KFAC T=10",
                "KFAC T=100", "FOOF T=10", "FOOF T=100", "ASDL KFAC [plain]", "KFAC T=500",
                "FOOF T=500", "SGD", "Adam", "NaturalGradient"]


# ---------------------------------------------------------------------- timing
def train_step(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if isinstance(opt, AsdlKfac):
        opt.train_step(x, y)
        return
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def place(opt: FactoredOptimizer, t: int) -> None:
    """Move the step counter to ``t`` (same kind of step as any ``t' ≡ t mod T``)."""
    sd = opt.state_dict()
    sd["curvkit"]["step"] = t
    opt.load_state_dict(sd)


def step_of_kind(opt: FactoredOptimizer, kind: str) -> int:
    """A future step counter ``t`` whose step is of ``kind`` (``"inv"``, ``"stats"``, ``"plain"``)."""
    T = opt.schedule.inv_period
    base = (opt.step_count // T + 1) * T
    for t in range(base, base + T):
        if kind_at(opt, t) == kind:
            return t
    raise ValueError(f"no {kind} step in a period of {type(opt).__name__} (T = {T})")


def kind_at(opt: FactoredOptimizer, t: int) -> str:
    if opt.schedule.is_inversion(t):
        return "inv"
    return "stats" if opt.schedule.is_stats(t) else "plain"


def run_round(m: Method, opt, model, batches, min_time: float) -> None:
    """One round of timed steps for one method (see the module doc).

    Each step kind is one ``torch.utils.benchmark.Timer`` measurement (``_common.measure``) whose
    untimed setup places the step counter at a step of that kind before every timed step.
    """
    it = itertools.cycle(batches)

    def step() -> None:
        train_step(opt, model, *next(it))

    if isinstance(opt, FactoredOptimizer):
        kinds = ["inv"] + (["stats"] if m.S > 1 else []) + (["plain"] if m.T > m.S else [])
        for kind in kinds:
            t = step_of_kind(opt, kind)
            meas = measure(step, setup=lambda t=t: place(opt, t), min_run_time=min_time)
            m.times[kind].extend(meas.times)
        return
    key = "inv" if m.family == "natural" else "plain"
    m.times[key].extend(measure(step, min_run_time=min_time).times)


def per_step(m: Method, times: dict[str, list[float]]) -> float:
    """Amortised per-step time from the samples ``times`` (kinds missing there: all samples)."""
    med = {k: statistics.median(v) if v else (statistics.median(m.times[k]) if m.times[k] else None)
           for k, v in times.items()}
    if m.family in ("foof", "kfac"):
        return (med["inv"] + (m.S - 1) * (med["stats"] or 0.0) + (m.T - m.S) * (med["plain"] or 0.0)) / m.T
    return med["plain"] if med["plain"] is not None else med["inv"]


def amortised(m: Method) -> dict[str, float | None]:
    med = {k: (statistics.median(v) if v else None) for k, v in m.times.items()}
    if m.family in ("foof", "kfac"):
        T, S = m.T, m.S
        total = med["inv"] + (S - 1) * (med["stats"] or 0.0) + (T - S) * (med["plain"] or 0.0)
        per_step = total / T
    else:
        per_step = med["plain"] if med["plain"] is not None else med["inv"]
    return {"per_step_s": per_step, "median_plain_s": med["plain"], "median_stats_s": med["stats"],
            "median_inversion_s": med["inv"], "samples": {k: len(v) for k, v in m.times.items()}}


def bench_model(name: str, quick: bool, rounds: int, seed: int = 0, min_time: float = 1.0) -> dict:
    torch.manual_seed(seed)
    if name == "mlp":
        widths = (64, 32, 32, 32, 10) if quick else (784, 1000, 1000, 1000, 10)
        batch = 16 if quick else 100
        build = lambda: make_mlp(widths)  # noqa: E731
        x_shape = (batch, widths[0])
    else:
        width, hw = (4, 8) if quick else (16, 32)
        batch = 8 if quick else 100
        build = lambda: make_resnet8(width)  # noqa: E731
        x_shape = (batch, 3, hw, hw)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(*x_shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(4)]
    methods = methods_for(name, quick, batch)
    init = build()
    state = {k: v.clone() for k, v in init.state_dict().items()}
    runs, failed = [], {}
    for m in methods:
        model = build()
        model.load_state_dict(state)
        try:
            opt = m.make(model)
            for b in batches[:2]:  # warm-up (includes step 0's inversion)
                train_step(opt, model, *b)
        except Exception as exc:  # an optional third-party comparison must not stop the run
            if m.family != "asdl":
                raise
            failed[m.name] = f"{type(exc).__name__}: {exc}"
            continue
        runs.append((m, opt, model))
    methods = [m for m, _, _ in runs]
    for r in range(rounds):  # interleaved: A B C … then … C B A, so drifts in load cancel
        for m, opt, model in (runs if r % 2 == 0 else runs[::-1]):
            before = {k: len(v) for k, v in m.times.items()}
            run_round(m, opt, model, batches, 0.0 if quick else min_time)
            m.rounds.append({k: v[before[k]:] for k, v in m.times.items()})
    results = {m.name: {"family": m.family, "T": m.T, "S": m.S, **amortised(m)} for m in methods}
    # per-round amortised step times of every method (ASDL's three step kinds combined per (T, S))
    rounds_of = {m.name: [per_step(m, rt) for rt in m.rounds] for m in methods}
    asdl = {name.split("[")[1][:-1]: results.pop(name) for name in list(results)
            if name.startswith("ASDL KFAC [")}
    if "inv" in asdl and "stats" in asdl:
        for T, S in sorted({(m.T, m.S) for m in methods if m.family == "kfac"}):
            def combine(inv: float, stats: float, plain: float | None) -> float:
                return (inv + (S - 1) * stats + (T - S) * (plain or 0.0)) / T
            per_round = [combine(rounds_of["ASDL KFAC [inv]"][r], rounds_of["ASDL KFAC [stats]"][r],
                                 rounds_of["ASDL KFAC [plain]"][r] if "plain" in asdl else None)
                         for r in range(rounds)]
            results[f"ASDL KFAC T={T}"] = {
                "family": "asdl", "T": T, "S": S,
                "median_plain_s": asdl["plain"]["per_step_s"] if "plain" in asdl else None,
                "median_stats_s": asdl["stats"]["per_step_s"],
                "median_inversion_s": asdl["inv"]["per_step_s"],
                "per_step_s": statistics.median(per_round)}
            rounds_of[f"ASDL KFAC T={T}"] = per_round
    for k in list(rounds_of):
        if k.startswith("ASDL KFAC ["):
            del rounds_of[k]
    sgd = results["SGD"]["per_step_s"]
    for r in results.values():
        r["ratio_to_sgd"] = r["per_step_s"] / sgd
    ratios = {}
    for T in sorted({m.T for m in methods if m.family == "kfac"}):
        pairs = [(f"KFAC T={T} / ASDL KFAC T={T}", f"KFAC T={T}", f"ASDL KFAC T={T}"),
                 (f"FOOF T={T} / KFAC T={T}", f"FOOF T={T}", f"KFAC T={T}"),
                 (f"KFAC T={T} / SGD", f"KFAC T={T}", "SGD"), (f"FOOF T={T} / SGD", f"FOOF T={T}", "SGD")]
        for key, a, b in pairs:
            if a in rounds_of and b in rounds_of:
                ratios[key] = ratio_stats([x / y for x, y in zip(rounds_of[a], rounds_of[b])])
    return {"model": name, "batch": batch, "input_shape": list(x_shape[1:]),
            "parameters": sum(p.numel() for p in init.parameters()), "methods": results,
            "per_round_ratios": ratios, "rounds_per_step_s": rounds_of, "failed": failed}


def goals(res: dict) -> dict:
    """Issue goals, each the median (and min) over rounds of the per-round ratio."""
    out = {}
    mlp, cnn = res.get("mlp"), res.get("cnn")
    if mlp:
        k, f = mlp["methods"].get("KFAC T=100"), mlp["methods"].get("FOOF T=100")
        if k and f:
            out["mlp_kfac_over_foof_T100"] = {"value": k["per_step_s"] / f["per_step_s"], "goal": ">= 1.5"}
    if cnn:
        for fam, goal in (("FOOF T=500", 1.10), ("KFAC T=500", 1.15)):
            r = cnn["methods"].get(fam)
            if r:
                key = f"cnn_{fam.split()[0].lower()}_over_sgd"
                out[key] = {"value": r["ratio_to_sgd"], "goal": f"<= {goal}"}
    for name, r in res.items():
        for T in (1, 10, 100):
            for key, goal, label in ((f"KFAC T={T} / ASDL KFAC T={T}", "<= 1", "kfac_over_asdl"),
                                     (f"FOOF T={T} / KFAC T={T}", "<= 1", "foof_over_kfac")):
                q = r.get("per_round_ratios", {}).get(key)
                if q:
                    out[f"{name}_{label}_T{T}"] = {"value": q["median"], "min": q["min"], "goal": goal}
    return out


def ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def print_table(res: dict) -> None:
    for name, r in res.items():
        print(f"\n{name}: batch {r['batch']}, input {r['input_shape']}, {r['parameters']} parameters")
        print(f"{'method':<18} {'T':>4} {'S':>4} {'per step ms':>12} {'÷ SGD':>7} {'plain':>8} "
              f"{'stats':>8} {'inv':>8}")
        for mname, m in r["methods"].items():
            cells = [ms(m[k]) for k in ("median_plain_s", "median_stats_s", "median_inversion_s")]
            print(f"{mname:<18} {m['T']:>4} {m['S']:>4} {ms(m['per_step_s']):>12} "
                  f"{m['ratio_to_sgd']:>7.2f} " + " ".join(f"{c:>8}" for c in cells))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (smoke test)")
    ap.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 5; quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--min-time", type=float, default=1.0,
                    help="seconds of timed steps of each kind per method and round (Timer's "
                         "blocked_autorange; --quick: one step)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 5)
    t0 = time.time()
    res = {}
    for name in args.models.split(","):
        res[name] = bench_model(name.strip(), args.quick, rounds, min_time=args.min_time)
    print_table(res)
    out = {
        "command": " ".join(["python benchmarks/optimizer_step.py", *(argv or sys.argv[1:])]),
        "quick": args.quick, "rounds": rounds, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "asdl": asdl_available(), "wall_s": time.time() - t0, "results": res, "goals": goals(res),
    }
    print("\nper-round ratios (median / min / max over rounds):")
    for name, r in res.items():
        for k, q in r["per_round_ratios"].items():
            print(f"  {name} {k}: {q['median']:.3f} / {q['min']:.3f} / {q['max']:.3f}")
    print("\ngoals:")
    for k, v in out["goals"].items():
        print(f"  {k}: {v['value']:.2f} (goal {v['goal']})")
    if args.out:
        print(f"wrote {write_json(args.out, out)}")
    return out


if __name__ == "__main__":
    main()
