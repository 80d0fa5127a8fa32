"""Full-covariance Laplace: curvkit's exact Woodbury/perturbation posterior vs laplace-torch.

For MLPs with ``P ≈ 6k, 17k`` (digits-shaped, 64 inputs) and ``P ≈ 2.8M`` (784-1000-1000-1000-10,
random 784-dim inputs), ``N = 1000`` inputs, ``C = 10`` classes, float32 models at initialisation:

* curvkit ``LaplacePosterior(structure="full")`` with the exact Fisher (``M = N·(C−1) = 9000``
  columns after the softmax rank reduction) and the MC Fisher (``M = N = 1000``): **fit** time
  (capture, ``M × M`` Gram, Cholesky) and the time for **100 exact samples**;
* curvkit's **evidence at one new prior** (``log_marginal_likelihood(2.0)`` after the fit at 1.0:
  one more Cholesky of the core) and its ratio to the fit (goal ≤ 1);
* laplace-torch ``FullLaplace`` (curvlinops GGN, ``stochastic=True`` for MC): ``fit`` and
  ``sample(100)`` (which factorises the ``P × P`` precision), skipped above ``P = 20 000`` where
  the ``P × P`` precision and its factor would need ``P²·8`` bytes (printed). Its DataLoader
  batch is the largest of ``N, 500, 200, 100`` whose estimated peak memory fits (at ``P ≈ 17k``
  batch 1000 needs ≈ 50 GB and is OOM-killed on a 24 GB machine; batch 100 ≈ 12 GB).

Every measurement runs in a fresh subprocess; **peak** memory is that process's ``ru_maxrss``
(it includes the Python/torch baseline of ≈ 0.3 GB). Contenders are **interleaved**: each of
``--rounds`` rounds runs every contender once (A B A B, the order reversed every other round), and
ratios are taken within a round, then reported as median and min over rounds, so machine load
cancels. ``--baseline DIR`` adds a contender ``curvkit_base`` importing curvkit from ``DIR`` (e.g.
an export of an older commit) for before/after comparisons. Not a test.

Usage::

    python benchmarks/laplace.py                 # full mode (N = 1000, all three sizes)
    python benchmarks/laplace.py --quick         # smoke mode (N = 200, P ≈ 6k and 17k)
    python benchmarks/laplace.py --out results   # JSON goes to results/laplace_benchmark.json
    python benchmarks/laplace.py --no-laplace-torch                 # curvkit only (≈ 3 min)
    python benchmarks/laplace.py --configs 17k --laplace-torch-kinds exact --name laplace_17k
    python benchmarks/laplace.py --quick --no-laplace-torch --rounds 5 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks._common, after PYTHONPATH
from benchmarks._common import run_worker  # noqa: E402

CONFIGS = {
    "6k": {"widths": [64, 80, 10], "data": "digits"},
    "17k": {"widths": [64, 128, 64, 10], "data": "digits"},
    "2.8M": {"widths": [784, 1000, 1000, 1000, 10], "data": "random"},
}
LAPLACE_TORCH_MAX_P = 20_000
N_SAMPLES = 100
#: laplace-torch's peak memory per entry of the P × P matrix, measured at P = 6010 with curvlinops'
#: GGN: ≈ 171 B at DataLoader batch 1000, ≈ 40 B at batch 100 (≈ 23 + 0.15·batch bytes).
LT_BYTES_PER_ENTRY = (23.0, 0.15)


def laplace_torch_batch(P: int, N: int) -> int:
    """The largest DataLoader batch (fastest) whose estimated peak fits in 60% of free memory."""
    from curvkit.linalg import available_memory_bytes

    free = 0.6 * available_memory_bytes()
    for b in (N, 500, 200, 100):
        if b <= N and (LT_BYTES_PER_ENTRY[0] + LT_BYTES_PER_ENTRY[1] * b) * P * P + 5e8 <= free:
            return b
    return min(N, 100)


# ====================================================================== worker (one measurement)
def _model_and_data(config: str, N: int, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    widths = CONFIGS[config]["widths"]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    if CONFIGS[config]["data"] == "digits":
        from curvkit.datasets import load_digits

        ds = load_digits()
        x = torch.as_tensor(ds.x_train[:N], dtype=torch.float32)
        y = torch.as_tensor(ds.y_train[:N], dtype=torch.int64)
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, widths[0], generator=g)
        y = torch.randint(0, widths[-1], (N,), generator=g)
    return model, x, y


def _drop_script_dir() -> None:
    """This file is named ``laplace.py``: keep it from shadowing the laplace-torch package."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    mod = sys.modules.get("laplace")
    if mod is not None and os.path.dirname(os.path.abspath(getattr(mod, "__file__", "") or "")) == here:
        del sys.modules["laplace"]


def _import_laplace_torch():
    """laplace-torch, with torchvision reported unavailable (a torchvision/torch mismatch here)."""
    _drop_script_dir()
    try:
        import lightning_utilities.core.imports as lui
    except ImportError:  # pragma: no cover
        import laplace

        return laplace
    orig = lui.RequirementCache.__bool__

    def no_torchvision(self):
        return False if str(getattr(self, "requirement", "")).startswith("torchvision") else orig(self)

    lui.RequirementCache.__bool__ = no_torchvision
    try:
        import laplace
    finally:
        lui.RequirementCache.__bool__ = orig
    return laplace


def worker(spec: dict) -> dict:
    import torch

    model, x, y = _model_and_data(spec["config"], spec["N"])
    P = sum(p.numel() for p in model.parameters())
    out: dict = {**spec, "P": P}
    if spec["library"] in ("curvkit", "curvkit_base"):
        from curvkit.laplace import LaplacePosterior

        LaplacePosterior(model, x[:4], y[:4], kind=spec["kind"],
                         generator=torch.Generator().manual_seed(0))  # warm-up (lazy imports)
        t0 = time.perf_counter()
        post = LaplacePosterior(model, x, y, kind=spec["kind"], prior_precision=1.0,
                                generator=torch.Generator().manual_seed(0))
        t1 = time.perf_counter()
        samples = post.sample(N_SAMPLES, torch.Generator().manual_seed(1))
        t2 = time.perf_counter()
        evidence = post.log_marginal_likelihood(2.0)  # a new scalar prior
        t3 = time.perf_counter()
        route = post.route if hasattr(post, "route") and isinstance(post.route, str) \
            else post.engine.blocks[0].route  # older checkouts (--baseline)
        out.update(fit_s=t1 - t0, sample_s=t2 - t1, evidence_s=t3 - t2, M=post.rank, route=route,
                   evidence=float(evidence), finite=bool(torch.isfinite(samples).all()))
    else:
        from torch.utils.data import DataLoader, TensorDataset

        laplace = _import_laplace_torch()
        la = laplace.FullLaplace(model, "classification", prior_precision=1.0,
                                 backend_kwargs={"stochastic": spec["kind"] == "mc"})
        batch = laplace_torch_batch(P, spec["N"])
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        t0 = time.perf_counter()
        la.fit(loader)
        t1 = time.perf_counter()
        samples = la.sample(N_SAMPLES, generator=torch.Generator().manual_seed(1))
        t2 = time.perf_counter()
        out.update(fit_s=t1 - t0, sample_s=t2 - t1, M=None, route="P×P", batch=batch,
                   finite=bool(torch.isfinite(samples).all()))
    out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return out


# ====================================================================== driver
def _total(m: dict) -> float | None:
    return None if "error" in m else m["fit_s"] + m["sample_s"]


def summarise(rounds: list[dict]) -> dict:
    """Median measurement per contender and median/min of the per-round ratios."""
    out: dict = {}
    for lib in rounds[0]:
        ok = [r[lib] for r in rounds if "error" not in r[lib]]
        if not ok:
            out[lib] = rounds[0][lib]
            continue
        med = dict(ok[0])
        for key in ("fit_s", "sample_s", "evidence_s", "peak_gb"):
            if key in med:
                med[key] = statistics.median(m[key] for m in ok)
        out[lib] = med

    ratios: dict = {}

    def ratio(name: str, num, den) -> None:
        vals = [num(r) / den(r) for r in rounds
                if all("error" not in m for m in r.values()) and num(r) and den(r)]
        if vals:
            ratios[name] = {"median": statistics.median(vals), "min": min(vals), "rounds": len(vals)}

    ratio("evidence_new_prior / fit", lambda r: r["curvkit"].get("evidence_s"),
          lambda r: r["curvkit"].get("fit_s"))
    if "curvkit_base" in rounds[0]:
        ratio("base fit+samples / new", lambda r: _total(r["curvkit_base"]), lambda r: _total(r["curvkit"]))
        ratio("base evidence_new_prior / new", lambda r: r["curvkit_base"].get("evidence_s"),
              lambda r: r["curvkit"].get("evidence_s"))
    if "laplace_torch" in rounds[0]:
        ratio("laplace-torch fit+samples / curvkit", lambda r: _total(r["laplace_torch"]),
              lambda r: _total(r["curvkit"]))
    out["ratios"] = {k: f"{v['median']:.3g} (min {v['min']:.3g}, {v['rounds']} rounds)"
                     for k, v in ratios.items()}
    out["ratio_values"] = ratios
    return out


def _fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (curvkit's one table formatter, imported only here)."""
    from curvkit.table import format_table

    head = ["config", "P", "Fisher", "M", "route", "curvkit fit s", "curvkit 100 samples s",
            "curvkit peak GB", "laplace-torch fit s", "laplace-torch 100 samples s",
            "laplace-torch peak GB", "speed-up"]
    lines = []
    for r in rows:
        ck, lt = r["curvkit"], r.get("laplace_torch")
        ck_total = None if "error" in ck else ck["fit_s"] + ck["sample_s"]
        if lt is None or "error" in lt:
            why = r.get("laplace_torch_note") or (lt or {}).get("error", "not run")
            lt_cells = [why, "–", "–"]
            speed = "–"
        else:
            lt_cells = [f"{_fmt(lt['fit_s'])} (batch {lt.get('batch', '?')})", _fmt(lt["sample_s"]),
                        _fmt(lt["peak_gb"])]
            speed = f"{(lt['fit_s'] + lt['sample_s']) / ck_total:.1f}×" if ck_total else "–"
        if "error" in ck:
            ck_cells = [ck["error"], "–", "–"]
            M, route = "–", "–"
        else:
            ck_cells = [_fmt(ck["fit_s"]), _fmt(ck["sample_s"]), _fmt(ck["peak_gb"])]
            M, route = str(ck["M"]), ck["route"]
        lines.append([r["config"], f"{r['P']:,}", r["kind"], M, route, *ck_cells, *lt_cells, speed])
    return format_table(head, lines, style="markdown")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: N = 200, P ≈ 6k and 17k")
    ap.add_argument("--out", default="results", help="output folder for laplace_benchmark.json")
    ap.add_argument("--configs", nargs="*", default=None, help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--no-laplace-torch", action="store_true", help="skip the laplace-torch runs")
    ap.add_argument("--kinds", nargs="*", default=["exact", "mc"], help="Fisher kinds to run")
    ap.add_argument("--laplace-torch-kinds", nargs="*", default=["exact", "mc"],
                    help="kinds for which laplace-torch also runs")
    ap.add_argument("--name", default="laplace_benchmark", help="JSON file name (without .json)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (≥ 5 where feasible)")
    ap.add_argument("--baseline", default=None,
                    help="folder holding an older curvkit package: adds the contender curvkit_base")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    N = 200 if args.quick else 1000
    configs = args.configs or (["6k", "17k"] if args.quick else list(CONFIGS))
    have_lt = not args.no_laplace_torch
    if have_lt:
        import importlib.util

        _drop_script_dir()
        have_lt = importlib.util.find_spec("laplace") is not None
    rows = []
    base = os.path.abspath(args.baseline) if args.baseline else None
    here = os.environ.get("PYTHONPATH")
    for config in configs:
        widths = CONFIGS[config]["widths"]
        P = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
        for kind in args.kinds:
            spec = {"config": config, "kind": kind, "N": N}
            row: dict = {"config": config, "kind": kind, "P": P, "N": N}
            contenders = [("curvkit", here)] + ([("curvkit_base", base)] if base else [])
            if P > LAPLACE_TORCH_MAX_P:
                row["laplace_torch_note"] = f"skipped: needs P²·8 B = {P * P * 8 / 1e12:.1f} TB"
            elif not have_lt:
                row["laplace_torch_note"] = "laplace-torch not installed/disabled"
            elif args.quick and config != "6k":
                row["laplace_torch_note"] = "skipped in --quick"
            elif kind not in args.laplace_torch_kinds:
                row["laplace_torch_note"] = "not run (--laplace-torch-kinds)"
            else:
                contenders.append(("laplace_torch", here))
            rounds: list[dict] = []
            for r in range(args.rounds):  # A B A B, order reversed every other round
                order = contenders if r % 2 == 0 else contenders[::-1]
                rounds.append({lib: run_worker(__file__, {**spec, "library": lib}, args.timeout, path)
                               for lib, path in order})
            row["rounds"] = rounds
            row.update(summarise(rounds))
            rows.append(row)
            print(f"  done {config} {kind}: " + ", ".join(f"{k} {v}" for k, v in row["ratios"].items()),
                  flush=True)
    text = table(rows)
    print(text)
    goals = []
    for r in rows:
        ck, lt = r["curvkit"], r.get("laplace_torch")
        if "error" in ck:
            continue
        tot = ck["fit_s"] + ck["sample_s"]
        if r["config"] == "17k" and r["kind"] == "exact" and lt and "error" not in lt:
            goals.append(f"exact Fisher, P≈17k: {(lt['fit_s'] + lt['sample_s']) / tot:.1f}× faster than "
                         "FullLaplace (goal ≥ 10×)")
        if r["config"] == "17k" and r["kind"] == "mc":
            goals.append(f"MC Fisher, P≈17k: fit + 100 samples {tot:.2f} s (goal < 1 s)")
        if r["config"] == "2.8M" and r["kind"] == "exact":
            goals.append(f"exact Fisher, P≈2.8M: fit + 100 samples {tot:.1f} s (goal < 60 s)")
        ev = r.get("ratios", {}).get("evidence_new_prior / fit")
        if r["kind"] == "exact" and ev:
            goals.append(f"exact Fisher, P≈{r['config']}: evidence at one new prior ÷ fit = {ev} "
                         "(goal ≤ 1)")
    for g in goals:
        print("goal:", g)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"N": N, "quick": args.quick, "cpus": os.cpu_count(), "n_samples": N_SAMPLES,
            "rounds": args.rounds, "baseline": base, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "command": "python benchmarks/laplace.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    path = out / f"{args.name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows, "goals": goals}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
