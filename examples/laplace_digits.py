"""Laplace posteriors on digits: MAP vs full (Woodbury), KFAC, FOOF and diagonal Laplace.

Trains a small MLP (weak weight decay) to its MAP on scikit-learn's digits (1438 training
images: 1138 to fit, 300 held out for validation; 359 test images), then builds
``curvkit.laplace.LaplacePosterior`` with ``Λ = δ I + n·F`` (``F`` the exact mean Fisher/GGN of
the 1138 fitting images, ``n = 1138``) for every structure. The prior precision ``δ`` is chosen
in two ways: by maximising each posterior's Laplace evidence (``method="marglik"``), and by
minimising the validation NLL of the predictive (``method="gridsearch"``). Reported on the test
set for the linearised (GLM, probit) predictive: accuracy, NLL, expected calibration error (ECE,
15 equal-width confidence bins) and reliability diagrams.

This is the comparison Benzing (2022), App. G asks for: a FOOF-style posterior (first Kronecker
factor only, ``I ⊗ Â``) next to KFAC's and the exact full-covariance one. FOOF's "Fisher"
``I ⊗ Â`` carries no loss curvature, so its scale is not that of the Fisher (its evidence is
correspondingly poor).

Usage::

    python examples/laplace_digits.py [--quick] [--out results]

Writes ``<out>/laplace_digits.json`` and ``<out>/laplace_digits_reliability.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_calibration_error
from tqdm.auto import tqdm

import curvkit
from curvkit.datasets import load_digits
from curvkit.laplace import LaplacePosterior
from curvkit.table import format_table

N_BINS = 15
MIN_BIN_COUNT = 5


def train_map(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, weight_decay: float,
              seed: int = 0, progress: bool = True) -> nn.Module:
    """Full-batch Adam on mean cross-entropy + (wd/2)‖θ‖² (a MAP with prior precision n·wd)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in tqdm(range(epochs), desc="MAP (full-batch Adam)", unit="step", disable=not progress):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model


def metrics(probs: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, mean NLL, ECE (torchmetrics, L1, equal-width bins) and the reliability curve.

    The curve holds per-bin (mean confidence, accuracy, count) for the diagram.
    """
    probs = probs.clamp_min(1e-12)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    nll = float(nn.functional.nll_loss(probs.log(), y))
    ece = float(multiclass_calibration_error(probs, y, num_classes=probs.shape[1], n_bins=N_BINS,
                                             norm="l1"))
    edges = torch.linspace(0, 1, N_BINS + 1, dtype=probs.dtype)
    curve = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            curve.append((float(conf[mask].mean()), float(correct[mask].mean()), int(mask.sum())))
    return {"accuracy": float(correct.mean()), "nll": nll, "ece": ece, "reliability": curve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: small model and Fisher batch")
    ap.add_argument("--out", default="results", help="output folder (JSON and PNG)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden width (default 32; quick 16)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    ds = load_digits()
    x_all = torch.as_tensor(ds.x_train, dtype=torch.float64)
    y_all = torch.as_tensor(ds.y_train, dtype=torch.int64)
    xtr, ytr, xval, yval = x_all[:-300], y_all[:-300], x_all[-300:], y_all[-300:]
    xte = torch.as_tensor(ds.x_test, dtype=torch.float64)
    yte = torch.as_tensor(ds.y_test, dtype=torch.int64)
    n = xtr.shape[0]
    hidden = args.hidden or (16 if args.quick else 32)
    epochs = 100 if args.quick else 800
    # weak weight decay (prior precision n·wd ≈ 0.01): a slightly overfit, overconfident MAP
    model = train_map(xtr, ytr, hidden, epochs, weight_decay=1e-5, progress=not args.no_progress)
    model.eval()
    # Fisher batch: the whole fitting set (quick: a 100-image subsample, scaled to n by num_data)
    nf = 100 if args.quick else n
    xf, yf = xtr[:nf], ytr[:nf]
    P = sum(p.numel() for p in model.parameters())
    grid = np.logspace(-1, 5, 4 if args.quick else 13)

    results: dict = {"P": P, "n_fit": n, "n_val": int(yval.shape[0]), "fisher_batch": nf,
                     "n_test": int(yte.shape[0]), "hidden": hidden, "quick": args.quick,
                     "grid": grid.tolist(), "methods": {}}
    with torch.no_grad():
        results["methods"]["MAP"] = {**metrics(torch.softmax(model(xte), 1), yte), "tuning": "–",
                                     "prior_precision": None, "log_evidence": None, "seconds": 0.0}
    for structure in tqdm(["full", "kfac", "foof", "diag"], desc="Laplace posteriors",
                          disable=args.no_progress):
        if structure not in curvkit.structures():
            print(f"skipping {structure!r}: not registered")
            continue
        t0 = time.perf_counter()
        post = LaplacePosterior(model, xf, yf, structure=structure, prior_precision=1.0, num_data=n)
        info = {"M": post.rank, "route": post.route} if structure == "full" else {}
        for tuning in ("evidence", "val NLL"):
            if tuning == "evidence":
                delta = post.optimize_prior_precision(method="marglik")
            else:
                delta = post.optimize_prior_precision(method="gridsearch", val_inputs=xval,
                                                      val_targets=yval, grid=grid)
            probs = post.predictive(xte, pred_type="glm", link_approx="probit")
            results["methods"][f"{structure} Laplace, δ by {tuning}"] = {
                **metrics(probs, yte), "tuning": tuning, "prior_precision": delta,
                "log_evidence": float(post.log_marginal_likelihood()),
                "seconds": time.perf_counter() - t0, **info}
            t0 = time.perf_counter()

    # ---------------------------------------------------------------- table
    print(f"digits MLP 64-{hidden}-10 (P = {P}), MAP by full-batch Adam on {n} images; Laplace "
          f"with the exact Fisher on {nf} images, num_data = {n}; GLM probit predictive on "
          f"{int(yte.shape[0])} test images")
    print(format_table(
        ["method", "δ", "log evidence", "test acc", "test NLL", "ECE", "seconds"],
        [[name, r["prior_precision"], r["log_evidence"], r["accuracy"], r["nll"], r["ece"], r["seconds"]]
         for name, r in results["methods"].items()],
        formats=[None, ".3g", ".1f", ".4f", ".4f", ".4f", ".1f"], style="markdown"))

    # ---------------------------------------------------------------- outputs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["total_seconds"] = time.perf_counter() - t_start
    (out / "laplace_digits.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharey=True)
    for ax, tuning in zip(axes, ("evidence", "val NLL")):
        ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
        for name, r in results["methods"].items():
            bins = [b for b in r["reliability"] if b[2] >= MIN_BIN_COUNT]
            if r["tuning"] in ("–", tuning) and bins:
                c, a, cnt = zip(*bins)
                line, = ax.plot(c, a, "-", lw=1, label=f"{name.split(',')[0]} (ECE {r['ece']:.3f})")
                ax.scatter(c, a, s=[4 + 60 * k / max(cnt) for k in cnt], color=line.get_color())
        ax.set_xlim(0.0, 1.02)
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("confidence")
        ax.set_title(f"δ by {tuning}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy")
    fig.suptitle(f"digits, MLP 64-{hidden}-10, GLM probit predictive: reliability ({N_BINS} bins, "
                 f"bins with ≥ {MIN_BIN_COUNT} test points; marker area ∝ count)")
    fig.tight_layout()
    fig.savefig(out / "laplace_digits_reliability.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'laplace_digits.json'} and {out / 'laplace_digits_reliability.png'} "
          f"({results['total_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
