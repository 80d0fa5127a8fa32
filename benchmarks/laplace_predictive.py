"""Laplace GLM probit predictive: time ÷ fit at P ≈ 2.8M, and curvkit vs laplace-torch at P ≈ 17k.

Two measurements, every one in a fresh subprocess, contenders **interleaved** (each of
``--rounds`` rounds runs every contender once, the order reversed every other round; ratios are
taken within a round and reported as median and min over rounds, so machine load cancels):

* ``--part ratio`` (P ≈ 2.8M, MLP 784-1000-1000-1000-10, float32, random 784-dim inputs):
  curvkit ``LaplacePosterior(structure=s, kind=KIND)`` fitted on ``N_fit = 1000`` inputs, then
  ``post(x_test, pred_type="glm", link_approx="probit")`` on ``N_test = 200`` inputs; the
  **predictive ÷ fit** ratio of one process (goal ≤ 1) for ``s`` in full / kfac / diag. ``KIND``
  is ``"exact"`` (the exact Fisher, ``M = 9000`` columns for full) unless ``--kind mc``.
* ``--part peer`` (P ≈ 17k, digits MLP 64-128-64-10, float32, 1000 fit / 200 test inputs of
  scikit-learn's digits): the predictive time of curvkit's kfac / diag posterior (exact Fisher,
  ``prior_precision=1``) against laplace-torch ``KronLaplace`` / ``DiagLaplace`` (its default GGN
  backend, ``prior_precision=1``, fitted with DataLoader batches of 100: batch 1000 peaks at
  17 GB for DiagLaplace) on the same model and data, ``la(x_test, pred_type="glm",
  link_approx="probit")``. One process per structure fits both posteriors, then ``--rounds``
  rounds of one timed call each (``torch.utils.benchmark.Timer`` after an untimed warm-up call,
  ``benchmarks/_common.py``; curvkit first in even rounds, laplace-torch first in odd ones);
  per-round ratios, median and min. The maximum absolute
  difference of the two libraries' predictive probabilities is reported as a check that both
  compute the same thing.

Usage::

    python benchmarks/laplace_predictive.py --part ratio --rounds 3
    python benchmarks/laplace_predictive.py --part peer --rounds 5
    python benchmarks/laplace_predictive.py --part peer --rounds 1   # smoke

JSON goes to ``benchmarks/results/laplace_predictive_<part>.json`` (``--out``). Not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks._common, after PYTHONPATH
from benchmarks._common import interleaved, run_worker  # noqa: E402

HERE = Path(__file__).resolve().parent
N_FIT, N_TEST = 1000, 200
PARTS = {"ratio": {"config": "2.8M", "structures": ["full", "kfac", "diag"]},
         "peer": {"config": "17k", "structures": ["kfac", "diag"]}}


def _bench_laplace():
    """``benchmarks/laplace.py`` (model/data builders, the laplace-torch import), by path."""
    spec = importlib.util.spec_from_file_location("curvkit_bench_laplace", HERE / "laplace.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _data(config: str):
    import torch

    bl = _bench_laplace()
    model, _, _ = bl._model_and_data(config, 4)
    if bl.CONFIGS[config]["data"] == "digits":
        from curvkit.datasets import load_digits

        ds = load_digits()
        x = torch.as_tensor(ds.x_train[:N_FIT], dtype=torch.float32)
        y = torch.as_tensor(ds.y_train[:N_FIT], dtype=torch.int64)
        xt = torch.as_tensor(ds.x_test[:N_TEST], dtype=torch.float32)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N_FIT + N_TEST, 784, generator=g)
        y = torch.randint(0, 10, (N_FIT + N_TEST,), generator=g)
        x, y, xt = x[:N_FIT], y[:N_FIT], x[N_FIT:]
    return bl, model, x, y, xt


def peer_worker(spec: dict) -> dict:
    """Both libraries in one process, predictive calls interleaved.

    Fits each once, makes one warm-up call each, then ``rounds`` rounds of one call each
    (curvkit first in even rounds, laplace-torch first in odd ones).
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from curvkit.laplace import LaplacePosterior

    torch.manual_seed(0)
    bl, model, x, y, xt = _data(spec["config"])
    laplace = bl._import_laplace_torch()
    post = LaplacePosterior(model, x, y, structure=spec["structure"], kind=spec["kind"],
                            prior_precision=1.0, progress=False)
    cls = {"kfac": laplace.KronLaplace, "diag": laplace.DiagLaplace}[spec["structure"]]
    la = cls(model, "classification", prior_precision=1.0)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=100))  # batch 1000: 17 GB (diag)
    calls = {"curvkit": lambda: post(xt, pred_type="glm", link_approx="probit"),
             "laplace_torch": lambda: la(xt, pred_type="glm", link_approx="probit")}
    probs = {k: f() for k, f in calls.items()}  # the outputs compared below
    times = interleaved(calls, spec["rounds"], min_run_time=0.0)  # Timer: warm-up + one timed call
    ratios = [a / b for a, b in zip(times["curvkit"], times["laplace_torch"])]
    return {**spec, "P": sum(p.numel() for p in model.parameters()), "times": times,
            "ratios": ratios, "max_abs_diff_probs": float((probs["curvkit"].double()
                                                           - probs["laplace_torch"].double()).abs().max()),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def worker(spec: dict) -> dict:
    """One measurement (fit, then timed predictive calls) in this process."""
    import torch

    if spec["library"] == "both":
        return peer_worker(spec)

    torch.manual_seed(0)
    bl, model, x, y, xt = _data(spec["config"])
    out: dict = {**spec, "P": sum(p.numel() for p in model.parameters())}
    reps = spec["reps"]
    times = []
    if spec["library"] == "curvkit":
        from curvkit.laplace import LaplacePosterior

        kw = dict(structure=spec["structure"], kind=spec["kind"], progress=False,
                  generator=torch.Generator().manual_seed(0))
        LaplacePosterior(model, x[:4], y[:4], **kw)(xt[:2])  # warm-up (lazy imports)
        t0 = time.perf_counter()
        post = LaplacePosterior(model, x, y, prior_precision=1.0, **kw)
        out["fit_s"] = time.perf_counter() - t0
        for _ in range(reps):
            t0 = time.perf_counter()
            probs = post(xt, pred_type="glm", link_approx="probit")
            times.append(time.perf_counter() - t0)
    else:
        from torch.utils.data import DataLoader, TensorDataset

        laplace = bl._import_laplace_torch()
        cls = {"kfac": laplace.KronLaplace, "diag": laplace.DiagLaplace}[spec["structure"]]
        la = cls(model, "classification", prior_precision=1.0)
        t0 = time.perf_counter()
        la.fit(DataLoader(TensorDataset(x, y), batch_size=100))  # batch 1000: 17 GB (diag)
        out["fit_s"] = time.perf_counter() - t0
        la(xt[:2], pred_type="glm", link_approx="probit")  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            probs = la(xt, pred_type="glm", link_approx="probit")
            times.append(time.perf_counter() - t0)
    out.update(predictive_s=times[0], predictive_median_s=statistics.median(times),
               predictive_min_s=min(times), probs_head=probs[:20].double().tolist(),
               finite=bool(torch.isfinite(probs).all()),
               peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    return out


def _stats(vals: list[float]) -> dict | None:
    return {"median": statistics.median(vals), "min": min(vals), "rounds": len(vals)} if vals else None


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=list(PARTS), required=False, default="peer")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (≥ 3)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed predictive calls per process (default: 1 for ratio, 5 for peer)")
    ap.add_argument("--kind", default="exact", help="curvkit Fisher kind")
    ap.add_argument("--structures", nargs="*", default=None)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    part = PARTS[args.part]
    reps = args.reps or (1 if args.part == "ratio" else 5)
    structures = args.structures or part["structures"]
    base = {"config": part["config"], "kind": args.kind, "reps": reps}
    if args.part == "ratio":
        contenders = [{**base, "library": "curvkit", "structure": s} for s in structures]
    else:
        contenders = [{**base, "library": lib, "structure": s}
                      for s in structures for lib in ("curvkit", "laplace_torch")]
    if args.part == "peer":
        return main_peer(args, base, structures, argv)
    rounds: list[list[dict]] = []
    for r in range(args.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        res = []
        for spec in order:
            m = run_worker(__file__, spec, args.timeout)
            print(f"  round {r}: {spec['library']} {spec['structure']}: "
                  + (m["error"] if "error" in m else
                     f"fit {m['fit_s']:.2f} s, predictive {m['predictive_s']:.3f} s "
                     f"(median {m['predictive_median_s']:.3f} s), peak {m['peak_gb']:.2f} GB"),
                  flush=True)
            res.append(m)
        rounds.append(res)

    def find(rnd, lib, s):
        return next(m for m in rnd if m["library"] == lib and m["structure"] == s)

    summary: dict = {}
    for s in structures:
        if args.part == "ratio":
            ok = [find(rnd, "curvkit", s) for rnd in rounds]
            ok = [m for m in ok if "error" not in m]
            summary[s] = {"predictive / fit": _stats([m["predictive_s"] / m["fit_s"] for m in ok]),
                          "fit_s": _stats([m["fit_s"] for m in ok]),
                          "predictive_s": _stats([m["predictive_s"] for m in ok])}
        else:
            pairs = [(find(rnd, "curvkit", s), find(rnd, "laplace_torch", s)) for rnd in rounds]
            pairs = [(a, b) for a, b in pairs if "error" not in a and "error" not in b]
            diff = max((max(abs(u - v) for ru, rv in zip(a["probs_head"], b["probs_head"])
                            for u, v in zip(ru, rv)) for a, b in pairs), default=None)
            summary[s] = {
                "curvkit / laplace-torch predictive (median of reps)":
                    _stats([a["predictive_median_s"] / b["predictive_median_s"] for a, b in pairs]),
                "curvkit predictive_s": _stats([a["predictive_median_s"] for a, _ in pairs]),
                "laplace-torch predictive_s": _stats([b["predictive_median_s"] for _, b in pairs]),
                "max |Δ probs| (first 20 test inputs)": diff}
    for s, v in summary.items():
        print(s, json.dumps(v))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"N_fit": N_FIT, "N_test": N_TEST, "rounds": args.rounds, "reps": reps,
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "note": "shared machine (2 cores, several engineers running tests at the same time)",
            "command": "python benchmarks/laplace_predictive.py "
                       + " ".join(argv if argv is not None else sys.argv[1:])}
    path = out / f"laplace_predictive_{args.part}.json"
    for rnd in rounds:
        for m in rnd:
            m.pop("probs_head", None)
    path.write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rounds}, indent=2))
    print(f"wrote {path}")
    return 0


def main_peer(args, base: dict, structures: list[str], argv) -> int:
    """One process per structure (both libraries, interleaved calls; :func:`peer_worker`)."""
    rows, summary = [], {}
    for s in structures:
        m = run_worker(__file__, {**base, "library": "both", "structure": s, "rounds": args.rounds},
                       args.timeout)
        rows.append(m)
        if "error" in m:
            summary[s] = m["error"]
        else:
            summary[s] = {"curvkit / laplace-torch predictive": _stats(m["ratios"]),
                          "curvkit predictive_s": _stats(m["times"]["curvkit"]),
                          "laplace-torch predictive_s": _stats(m["times"]["laplace_torch"]),
                          "max |Δ probs|": m["max_abs_diff_probs"]}
        print(s, json.dumps(summary[s]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"N_fit": N_FIT, "N_test": N_TEST, "rounds": args.rounds, "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "note": "shared machine (2 cores, several engineers running tests at the same time); "
                    "both libraries in one process, calls interleaved A B / B A per round",
            "command": "python benchmarks/laplace_predictive.py "
                       + " ".join(argv if argv is not None else sys.argv[1:])}
    path = out / "laplace_predictive_peer.json"
    path.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
