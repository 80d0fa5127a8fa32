"""Fisher and full-covariance Laplace over a DataLoader, on one process or across processes.

Every rank builds a ``DataLoader`` over its own **contiguous, unpadded** share of the 1438 digits
training images and passes it to ``curvkit.fisher`` / ``LaplacePosterior``; with an initialised
``torch.distributed`` process group each rank gets the curvature of the *union*,
``F = (1/N) Σ_{n ≤ N}`` over all ranks' data (the exact Fisher/GGN, Benzing 2022 eq. 2), and for
``"full"`` the Woodbury columns stay with the rank that computed them (memory per rank shrinks with
the number of ranks; solves all-reduce one ``P``-vector). The printed numbers are the same on 1, 2
or 3 processes up to round-off.

Run::

    python examples/distributed_laplace.py                        # one process
    torchrun --nproc_per_node 2 examples/distributed_laplace.py   # two processes (gloo, CPU)

Why not ``DistributedSampler``: it pads the data set to a multiple of the world size (repeating
samples), which changes the union; use contiguous slices as here (or ``drop_last`` and say so).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

import curvkit
from curvkit.datasets import load_digits
from curvkit.laplace import LaplacePosterior


def shard(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``range(n)`` (sizes differ by at most one)."""
    return range(round(rank * n / world), round((rank + 1) * n / world))


def main(argv: list[str] | None = None) -> dict:
    """Fit a small MLP, then the Fisher and the Laplace posterior over each rank's loader.

    Returns:
        The printed figures (log evidence, optimised prior precision, a solve's norm, test NLL).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps to the MAP (every rank alike)")
    parser.add_argument("--rows", type=int, default=None, help="use only the first ROWS training images")
    args = parser.parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ and not dist.is_initialized()
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        torch.manual_seed(0)
        ds = load_digits()
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
        n = ds.n_train if args.rows is None else min(args.rows, ds.n_train)
        X, y = ds.x_train[:n].double(), ds.y_train[:n]
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(args.steps):  # the same MAP on every rank (same seed, same full batch)
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()

        mine = Subset(ds.train_set, list(shard(n, rank, world)))
        loader = DataLoader(mine, batch_size=args.batch_size,
                            collate_fn=lambda b: (torch.stack([x for x, _ in b]).double(),
                                                  torch.stack([t for _, t in b])))
        F = curvkit.fisher(model, loader, kind="exact", structure="full", progress=False)
        g = [torch.ones_like(p) for p in model.parameters()]
        x = F.solve(g, damping=1e-2)
        post = LaplacePosterior(model, loader, kind="exact", structure="full",
                                num_data=n, progress=False)
        delta = post.optimize_prior_precision()
        probs = post.predictive(ds.x_test.double(), pred_type="glm", link_approx="probit")
        nll = float(nn.functional.nll_loss(probs.clamp_min(1e-12).log(), ds.y_test))
        out = {"world": world, "rows_on_this_rank": len(mine), "log_evidence":
               float(post.log_marginal_likelihood()), "prior_precision": float(delta),
               "solve_norm": float(torch.cat([t.reshape(-1) for t in x]).norm()), "test_nll": nll}
        if rank == 0:
            for key, value in out.items():
                print(f"{key:>18}: {value}")
        return out
    finally:
        if distributed:
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
