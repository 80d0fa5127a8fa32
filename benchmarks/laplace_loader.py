"""Laplace fit over a DataLoader: curvkit vs laplace-torch ``fit(train_loader)``; 1 vs 2 processes.

MNIST-1D at a larger size (``--n`` training examples, default 50 000: the 5 000 examples of the
default recipe tiled with fresh noise, see :func:`make_data`; 40 features, 10 classes), float32
MLPs at a fixed seed (untrained: the timings do not depend on training):

* ``17k``: 40-256-24-10 (P = 16 914);  ``300k``: 40-512-512-10 (P = 288 778).

Per configuration and structure:

* curvkit ``LaplacePosterior(model, train_loader, structure=s, kind="exact")`` -- the Fisher of
  the union of all batches (``"diag"``, ``"kfac"``: exact accumulation; ``"full"``: the primal
  route, ``U Uᵀ`` accumulated batch by batch) -- then ``log_marginal_likelihood()`` (one more
  pass over the loader for the log-likelihood);
* laplace-torch ``DiagLaplace`` / ``KronLaplace`` (``backend=BackPackGGN``; the default
  curvlinops backend took 427 s for the diagonal at N = 2000, P ≈ 17k, here) and ``FullLaplace``
  (default backend), exact GGN, ``fit(train_loader)`` then ``log_marginal_likelihood()``;
* curvkit with 2 gloo processes (``torch.distributed``, each rank a contiguous half of the data;
  ``DistributedSampler`` would pad with repeated examples) against 1 process, both one thread
  per process: wall time and peak memory per rank.

Log evidence agreement is reported where both libraries define the same matrix: ``diag`` (exact
GGN diagonal) and ``full`` (exact GGN) -- laplace-torch sums per-datum GGNs, curvkit's
``num_data · F`` with ``F`` the mean over all data is the same matrix. ``kron`` is *not* the
same matrix (laplace-torch sums per-batch Kronecker products, curvkit takes the KFAC of the
union), so its evidence difference is shown but not expected to vanish.

``full`` needs ``P² · M`` flops (``M = N·C``); on a small shared machine pass ``--full-n`` to run
it on the first examples only (the table says which ``N`` each row used). Every measurement runs
in a fresh subprocess; peak memory is that process's ``ru_maxrss`` (including the ≈ 0.3 GB
torch baseline). Measurements alternate the library order per configuration (A B, then B A).

Usage::

    python benchmarks/laplace_loader.py                          # N = 50 000, all rows
    python benchmarks/laplace_loader.py --n 20000 --full-n 2000 --configs 17k
    python benchmarks/laplace_loader.py --out results            # JSON: results/laplace_loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks._common, after PYTHONPATH
from benchmarks._common import run_worker  # noqa: E402

CONFIGS = {"17k": [40, 256, 24, 10], "300k": [40, 512, 512, 10]}
STRUCTURES = {"diag": "DiagLaplace", "kfac": "KronLaplace", "full": "FullLaplace"}
SAME_MATRIX = {"diag", "full"}


def make_data(n: int, path: str) -> None:
    """``n`` MNIST-1D-like examples saved to ``path`` (generated; nothing downloaded).

    ``mnist1d``'s generator is a Python loop (≈ 50 s per 2 500 examples on a loaded 2-core
    machine), so the 5 000 examples of the default recipe (train + test) are generated once and
    tiled to ``n`` with fresh Gaussian noise (σ = 0.1 of the standardised features) per copy.
    """
    import torch

    from curvkit.datasets import load_mnist1d

    ds = load_mnist1d(seed=0)
    x = torch.cat([torch.as_tensor(ds.x_train), torch.as_tensor(ds.x_test)]).float()
    y = torch.cat([torch.as_tensor(ds.y_train), torch.as_tensor(ds.y_test)]).long()
    reps = -(-n // x.shape[0])
    g = torch.Generator().manual_seed(0)
    X = x.repeat(reps, 1)[:n]
    X = X + 0.1 * torch.randn(X.shape, generator=g)
    torch.save({"x": X.contiguous(), "y": y.repeat(reps)[:n].contiguous()}, path)


def _model(widths):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _laplace_torch():
    """laplace-torch, imported through benchmarks/laplace.py's helper (that file would shadow the
    ``laplace`` package; the helper also works around a torchvision/torch version mismatch)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "laplace.py")
    spec = importlib.util.spec_from_file_location("_curvkit_bench_laplace", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._import_laplace_torch()


def worker(spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    d = torch.load(spec["data"])
    n = spec["N"]
    ds = TensorDataset(d["x"][:n], d["y"][:n])
    model = _model(CONFIGS[spec["config"]]).eval()
    out = {**spec, "P": sum(p.numel() for p in model.parameters())}
    if spec["library"] == "curvkit":
        from curvkit.laplace import LaplacePosterior

        world = spec.get("world", 1)
        if world > 1:
            return _distributed(spec, out)
        loader = DataLoader(ds, batch_size=spec["batch"])
        t0 = time.perf_counter()
        post = LaplacePosterior(model, loader, structure=spec["structure"], prior_precision=1.0,
                                progress=False)
        t1 = time.perf_counter()
        ev = float(post.log_marginal_likelihood())
        t2 = time.perf_counter()
    else:
        lt = _laplace_torch()
        la_cls = getattr(lt, STRUCTURES[spec["structure"]])
        loader = DataLoader(ds, batch_size=spec["batch"])
        kw = {}
        if spec["structure"] != "full":  # BackPACK: laplace-torch's fastest diag/Kron GGN here
            from laplace.curvature import BackPackGGN

            kw["backend"] = BackPackGGN
        la = la_cls(model, "classification", prior_precision=1.0, **kw)
        t0 = time.perf_counter()
        la.fit(loader)
        t1 = time.perf_counter()
        ev = float(la.log_marginal_likelihood())
        t2 = time.perf_counter()
    out.update(fit_s=t1 - t0, evidence_s=t2 - t1, log_evidence=ev,
               peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    return out


def _rank_main(rank: int, spec: dict, init: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from curvkit.laplace import LaplacePosterior

    torch.set_num_threads(1)
    world = spec["world"]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        d = torch.load(spec["data"])
        n = spec["N"]
        ds = TensorDataset(d["x"][:n], d["y"][:n])
        lo, hi = rank * n // world, (rank + 1) * n // world  # contiguous shard, no padding
        loader = DataLoader(Subset(ds, range(lo, hi)), batch_size=spec["batch"])
        model = _model(CONFIGS[spec["config"]]).eval()
        dist.barrier()
        t0 = time.perf_counter()
        post = LaplacePosterior(model, loader, structure=spec["structure"], prior_precision=1.0,
                                progress=False)
        t1 = time.perf_counter()
        ev = float(post.log_marginal_likelihood())
        t2 = time.perf_counter()
        res = {"fit_s": t1 - t0, "evidence_s": t2 - t1, "log_evidence": ev,
               "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _distributed(spec: dict, out: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mp.spawn(_rank_main, args=(spec, os.path.join(tmp, "init"), tmp), nprocs=spec["world"],
                 join=True)
        wall = time.perf_counter() - t0
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(spec["world"])]
    out.update(fit_s=max(r["fit_s"] for r in ranks), evidence_s=max(r["evidence_s"] for r in ranks),
               log_evidence=ranks[0]["log_evidence"], peak_gb=max(r["peak_gb"] for r in ranks),
               spawn_wall_s=wall, evidence_equal_on_ranks=len({r["log_evidence"] for r in ranks}) == 1)
    return out


def _f(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (curvkit's one table formatter, imported only here)."""
    from curvkit.table import format_table

    head = ["config", "P", "structure", "N", "curvkit fit s", "curvkit peak GB", "laplace-torch fit s",
            "laplace-torch peak GB", "log-evidence curvkit", "laplace-torch", "rel. diff", "same matrix",
            "curvkit 2 procs fit s", "peak GB per rank"]
    lines = []
    for r in rows:
        ck, lt, d2 = r.get("curvkit", {}), r.get("laplace_torch", {}), r.get("curvkit_2", {})
        ev_c, ev_l = ck.get("log_evidence"), lt.get("log_evidence")
        rel = abs(ev_c - ev_l) / abs(ev_l) if ev_c is not None and ev_l is not None else None
        cells = [r["config"], f"{r['P']:,}", r["structure"], f"{r['N']:,}",
                 ck.get("error") or _f(ck.get("fit_s")), _f(ck.get("peak_gb")),
                 lt.get("error") or _f(lt.get("fit_s")), _f(lt.get("peak_gb")),
                 _f(ev_c, ".6g"), _f(ev_l, ".6g"), _f(rel, ".1e"),
                 "yes" if r["structure"] in SAME_MATRIX else "no (sum of per-batch Kron)",
                 d2.get("error") or _f(d2.get("fit_s")), _f(d2.get("peak_gb"))]
        lines.append(cells)
    return format_table(head, lines, style="markdown")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="training examples")
    ap.add_argument("--full-n", type=int, default=None, help="examples for structure='full'")
    ap.add_argument("--batch", type=int, default=500, help="DataLoader batch size")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--structures", nargs="*", default=list(STRUCTURES))
    ap.add_argument("--lt-n", type=int, default=None,
                    help="examples for the laplace-torch rows (default: as curvkit)")
    ap.add_argument("--no-laplace-torch", action="store_true")
    ap.add_argument("--no-distributed", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", default="results")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    tmp = tempfile.mkdtemp(prefix="curvkit_loader_bench_")
    data = os.path.join(tmp, "mnist1d.pt")
    t0 = time.perf_counter()
    make_data(args.n, data)
    print(f"generated MNIST-1D, N = {args.n} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows, flip = [], False
    for config in args.configs:
        w = CONFIGS[config]
        P = sum(a * b + b for a, b in zip(w[:-1], w[1:]))
        for structure in args.structures:
            too_big = structure == "full" and P * P * 8 > 40e9  # laplace-torch forms P × P
            N = args.full_n if structure == "full" and args.full_n else args.n
            spec = {"config": config, "structure": structure, "N": N, "batch": args.batch,
                    "data": data}
            row: dict = {"config": config, "P": P, "structure": structure, "N": N}
            order = ["curvkit", "laplace_torch"]
            if flip:
                order.reverse()
            flip = not flip
            for lib in order:
                if lib == "laplace_torch" and args.no_laplace_torch:
                    continue
                if lib == "laplace_torch" and too_big:
                    row[lib] = {"error": f"refused: P×P needs {P * P * 8 / 1e9:.0f} GB"}
                    continue
                lt_spec = dict(spec)
                if lib == "laplace_torch" and args.lt_n and structure != "full":
                    lt_spec["N"] = args.lt_n
                row[lib] = run_worker(__file__, {**lt_spec, "library": lib}, args.timeout, tail=2)
            if not args.no_distributed:
                spec2 = {**spec, "library": "curvkit", "world": 2}
                row["curvkit_2"] = run_worker(__file__, spec2, args.timeout, tail=2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/laplace_loader.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "laplace_loader.json").write_text(json.dumps(
        {"meta": {"command": cmd, "cpus": os.cpu_count()}, "rows": rows, "table": text}, indent=2))
    print(f"wrote {out / 'laplace_loader.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
