"""Quickstart: exact subsampled Fisher of a small digits MLP, solved by Woodbury.

Trains a 64-32-10 MLP on scikit-learn's digits for a few epochs, then for every Fisher kind and
structure builds ``F`` on a batch of 100 images, solves ``(F + λI) x = ∇L`` and prints the
relative residual against the explicit P×P matrix built independently (torch.func, float64).

Run: ``python examples/quickstart.py`` (a few seconds on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import curvkit
from curvkit.datasets import load_digits
from curvkit.testing import dense_block_diagonal, dense_fisher


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = load_digits().to(torch.float64)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(data.y_train)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).double().mean().item()
    print(f"digits MLP 64-32-10: P = {sum(p.numel() for p in model.parameters())}, test acc {acc:.3f}")

    x, y = data.x_train[: args.batch], data.y_train[: args.batch]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grad = [p.grad.clone() for p in model.parameters()]
    g = torch.cat([t.reshape(-1) for t in grad])
    lam = args.damping

    print(f"\n(F + λI) x = ∇L on N = {args.batch}, λ = {lam:g}; residuals use the explicit float64 matrix")
    print(f"{'kind':<10} {'structure':<11} {'M':>6} {'build s':>8} {'solve s':>8} "
          f"{'rel. residual':>14} {'rel. err vs dense solve':>24}")
    gen = torch.Generator().manual_seed(0)
    for kind in ("exact", "mc", "empirical"):
        for structure in ("full", "block_diag"):
            t0 = time.perf_counter()
            F = curvkit.fisher(model, x, y, kind=kind, structure=structure, generator=gen)
            t1 = time.perf_counter()
            sol = F.solve(grad, lam)  # list in, list out
            t2 = time.perf_counter()
            xs = torch.cat([t.reshape(-1) for t in sol])
            targets = F.captured.sampled if kind == "mc" else y
            D = dense_fisher(model, x, targets, kind=kind)
            if structure == "block_diag":
                D = dense_block_diagonal(D, [layer.size for layer in F.layers])
            D = D + lam * torch.eye(D.shape[0], dtype=D.dtype)
            res = ((D @ xs - g).norm() / g.norm()).item()
            err = ((xs - torch.linalg.solve(D, g)).norm() / xs.norm()).item()
            M = F.captured.e[0].shape[0]
            print(f"{kind:<10} {structure:<11} {M:>6} {t1 - t0:>8.3f} {t2 - t1:>8.4f} "
                  f"{res:>14.2e} {err:>24.2e}")
    print(f"\n{F!r}")


if __name__ == "__main__":
    main()
