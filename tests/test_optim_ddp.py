"""Data parallel FOOF and KFAC: two CPU processes on gloo (DDP averages the gradients, the
optimizers average their factors at inversions). Parameters stay identical across ranks and equal
one process trained on the concatenated batches."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from curvkit.optim import FOOF, KFAC

WORLD = 2
STEPS = 4
PER_RANK = 5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_opt(name: str, model: nn.Module):
    if name == "foof":
        return FOOF(model, lr=0.3, damping=0.1, ema_decay=0.5, inv_period=2, ema_steps=2, momentum=0.5)
    return KFAC(model, lr=0.3, damping=0.1, kind="exact", ema_decay=0.5, inv_period=3, ema_steps=2,
                momentum=0.5)


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    n = WORLD * PER_RANK
    return [(torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=g),
             torch.randint(0, 3, (n,), generator=g)) for _ in range(STEPS)]


def train(name: str, model: nn.Module, forward: nn.Module, opt_model: nn.Module,
          rank: int | None) -> None:
    opt = make_opt(name, opt_model)
    for x, y in data():
        if rank is not None:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()
    opt.remove_hooks()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name in ("foof", "kfac"):
            model = make_model()
            ddp = DDP(model)
            # FOOF gets the DDP wrapper, KFAC the wrapped module: both work
            train(name, model, ddp, ddp if name == "foof" else model, rank)
            torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"{name}_{rank}.pt"))
            del ddp  # release the reducer (and its gloo work) before the group goes away
        dist.barrier()  # no rank tears gloo down while the other still communicates
    finally:
        dist.destroy_process_group()


def test_data_parallel_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for name in ("foof", "kfac"):
        ranks = [torch.load(tmp_path / f"{name}_{r}.pt") for r in range(WORLD)]
        for a, b in zip(*ranks):
            assert torch.equal(a, b), name  # every rank applied the same update
        model = make_model()
        train(name, model, model, model, None)
        start = make_model()
        for p, q, p0 in zip(model.parameters(), ranks[0], start.parameters()):
            assert not torch.equal(p0, q)
            torch.testing.assert_close(q, p.detach(), rtol=1e-10, atol=1e-12)
