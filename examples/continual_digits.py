"""Continual learning on permuted digits: plain SGD vs EWC with diagonal, KFAC and full Fishers.

Five tasks share scikit-learn's 8x8 digits, each with its own fixed pixel permutation (task 1 is
unpermuted). A 64-100-100-10 MLP is trained on the tasks one after the other with SGD; after
each task ``curvkit.ewc.EWC.consolidate`` stores that task's Fisher and anchor, and later tasks add
``ewc.penalty() = (κ/2) Σ_t (θ − θ*_t)ᵀ F_t (θ − θ*_t)`` to their (mean) cross-entropy.

Methods: ``sgd`` (no penalty), ``diag`` (diagonal Fisher, the classic EWC), ``kfac`` (one
Kronecker product per layer) and ``full`` (the exact Fisher of a subsample of ``--fisher-n``
images per task, stored as per-layer inputs and errors: ``N·Σ_l(d_in + R·d_out)`` floats, App. C.2
of Benzing 2022). All Fishers are the exact mean Fisher (``kind="exact"``, ``R = 10`` classes) on
``--fisher-n`` images of the task.

The strength ``κ`` of every EWC variant is chosen from ``--strengths`` by the average accuracy on
a validation split held out of the training images (never on the test images). Reported: the
average test accuracy over the five tasks after training on all of them, the accuracy of each
task after each stage (plot), and the bytes each method stores.

Run: ``python examples/continual_digits.py [--out results/]`` (about a minute on 2 cores);
``--quick`` runs a reduced version for the smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import curvkit
from curvkit.datasets import load_digits
from curvkit.ewc import EWC
from curvkit.table import format_table

METHODS = ("sgd", "diag", "kfac", "full")


def make_tasks(n_tasks: int, seed: int, val_fraction: float = 0.2):
    """Permuted-digits tasks: ``[(x_train, y_train, x_val, y_val, x_test, y_test)]``."""
    data = load_digits(seed=seed)
    g = torch.Generator().manual_seed(seed)
    n_val = int(round(val_fraction * data.n_train))
    split = torch.randperm(data.n_train, generator=g)
    tr, va = split[n_val:], split[:n_val]
    tasks = []
    for t in range(n_tasks):
        perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=g)
        tasks.append((data.x_train[tr][:, perm], data.y_train[tr], data.x_train[va][:, perm],
                      data.y_train[va], data.x_test[:, perm], data.y_test))
    return tasks


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def run(method: str, strength: float, tasks, args) -> dict:
    """Train sequentially; return per-stage val/test accuracies and the stored memory."""
    model = make_model(args.seed)
    ewc = None
    if method != "sgd":
        ewc = EWC(model, strength, kind="exact", structure=method)
    g = torch.Generator().manual_seed(args.seed + 1)
    test_acc, val_acc = [], []  # [stage][task]
    for x, y, _, _, _, _ in tqdm(tasks, desc=f"{method} κ={strength:g}", unit="task", leave=False,
                                 disable=not args.progress):
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        for _ in range(args.epochs):
            for idx in torch.randperm(len(y), generator=g).split(args.batch):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                if ewc is not None and ewc.num_tasks:
                    loss = loss + ewc.penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
        if ewc is not None:
            sub = torch.randperm(len(y), generator=g)[: args.fisher_n]
            ewc.consolidate(x[sub], y[sub])
        test_acc.append([accuracy(model, t[4], t[5]) for t in tasks])
        val_acc.append([accuracy(model, t[2], t[3]) for t in tasks])
    return {
        "method": method,
        "strength": strength if ewc is not None else None,
        "val_acc": val_acc,
        "test_acc": test_acc,
        "final_val": sum(val_acc[-1]) / len(tasks),
        "final_test": sum(test_acc[-1]) / len(tasks),
        "memory": ewc.memory_breakdown() if ewc is not None else {"curvature": 0, "anchors": 0,
                                                                  "total": 0},
    }


def run_or_none(method: str, strength: float, tasks, args) -> dict | None:
    """:func:`run`, or ``None`` (with a note) when SGD diverges under a too large ``κ``."""
    try:
        return run(method, strength, tasks, args)
    except FloatingPointError as err:
        tqdm.write(f"  {method} κ={strength:g} diverged ({err}); dropped from the sweep")
        return None


def plot(results: dict, n_tasks: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.0), sharey=True)
    axes = [axes] if len(results) == 1 else list(axes)
    for ax, (method, r) in zip(axes, results.items()):
        stages = list(range(1, n_tasks + 1))
        for k in range(n_tasks):
            ax.plot(stages[k:], [r["test_acc"][s][k] for s in range(k, n_tasks)], marker="o",
                    label=f"task {k + 1}")
        kappa = "" if r["strength"] is None else f", κ={r['strength']:g}"
        ax.set_title(f"{method}{kappa}\navg {r['final_test']:.3f}")
        ax.set_xlabel("after training task")
        ax.set_xticks(stages)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fisher-n", type=int, default=200, help="images per task for the Fisher")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0, 100.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="reduced run for the smoke test")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.epochs, args.fisher_n, args.strengths = 3, 1, 50, [100.0]
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tasks = make_tasks(args.tasks, args.seed)
    P = sum(p.numel() for p in make_model(args.seed).parameters())

    methods = []
    for method in args.methods:
        if method != "sgd" and method not in curvkit.structures():
            print(f"skipping {method}: structure {method!r} is not registered in this curvkit")
        else:
            methods.append(method)
    jobs = [(m, s) for m in methods for s in ([0.0] if m == "sgd" else args.strengths)]
    bar = tqdm(total=len(jobs), desc="runs (method × κ)", disable=not args.progress)
    results, sweeps = {}, {}
    for method in methods:
        t0 = time.perf_counter()
        runs = []
        for m, s in jobs:
            if m == method:
                runs.append(run(m, s, tasks, args) if m == "sgd" else run_or_none(m, s, tasks, args))
                bar.update()
        runs = [r for r in runs if r is not None]
        if not runs:
            tqdm.write(f"skipping {method}: every strength diverged")
            continue
        best = max(runs, key=lambda r: r["final_val"])
        best["seconds"] = time.perf_counter() - t0
        results[method] = best
        sweeps[method] = {str(r["strength"]): {"final_val": r["final_val"],
                                               "final_test": r["final_test"]} for r in runs}
    bar.close()

    print(f"\nPermuted digits, {args.tasks} tasks, MLP 64-100-100-10 (P = {P}), {args.epochs} "
          f"epochs/task, Fisher on {args.fisher_n} images/task (kind='exact')")
    print(format_table(
        ["method", "κ (val)", "avg test acc", "avg val acc", "stored KiB", "Fisher KiB", "anchors KiB",
         "time s"],
        [[m, r["strength"], r["final_test"], r["final_val"], r["memory"]["total"] / 1024,
          r["memory"]["curvature"] / 1024, r["memory"]["anchors"] / 1024, r["seconds"]]
         for m, r in results.items()],
        formats=[None, "g", ".3f", ".3f", ".1f", ".1f", ".1f", ".1f"]))
    print(f"(P floats = {4 * P / 1024:.1f} KiB; full stores N·Σ_l(d_in + 10·d_out) floats per task)")
    print("\ntest accuracy of each task after training on all of them:")
    for m, r in results.items():
        print(f"  {m:<6} " + "  ".join(f"{a:.3f}" for a in r["test_acc"][-1]))

    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.tasks, args.out / "continual_digits.png")
    total = time.perf_counter() - t_start
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_params": P,
        "results": results,
        "strength_sweep": sweeps,
        "seconds": total,
    }
    with open(args.out / "continual_digits.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {args.out / 'continual_digits.json'} and {args.out / 'continual_digits.png'} "
          f"({total:.1f} s, {os.cpu_count()} CPUs, {args.threads} torch thread(s))")
    return summary


if __name__ == "__main__":
    main()
