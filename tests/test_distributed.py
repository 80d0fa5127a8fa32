"""torch.distributed: each rank passes its shard and gets the curvature of the union.

2 and 3 gloo processes on CPU, float64, uneven shards fed as loaders; every structure, the
Laplace evidence / samples / predictive and the EWC penalty equal one process on the concatenated
data (1e-10). Teardown as in test_optim_ddp: a barrier before destroying the group.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvkit
from curvkit.ewc import EWC
from curvkit.laplace import LaplacePosterior

STRUCTS = ("full", "block_diag", "kfac", "foof", "diag")
N = 11


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_data():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    return X, y, torch.randn(4, 4, dtype=torch.float64, generator=g)


def shard(X, y, rank: int, world: int) -> list:
    """Rank r's contiguous, uneven share of the data, as batches of at most 2."""
    bounds = [round(i * N / world) for i in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    return [(X[i:min(i + 2, hi)], y[i:min(i + 2, hi)]) for i in range(lo, hi, 2)]


def results(model: nn.Module, data, Xt) -> dict:
    out = {}
    v = torch.linspace(-1, 1, 43, dtype=torch.float64)
    for structure in STRUCTS:
        for route in (("auto", "primal", "dual") if structure in ("full", "block_diag")
                      else ("auto",)):
            opts = {"route": route} if route != "auto" else {}
            F = curvkit.fisher(model, data, structure=structure, progress=False, **opts)
            key = f"{structure}/{route}"
            out[key + "/dense"] = F.to_dense()
            out[key + "/solve"] = F.solve(v, 0.1)
            out[key + "/logdet"] = F.logdet(0.1)
    # float32: the float64-accumulated Woodbury products of the sharded factor
    data32 = [(x.float(), t) for x, t in data] if isinstance(data, list) else (data[0].float(), data[1])
    F32 = curvkit.fisher(copy.deepcopy(model).float(), data32, route="dual", progress=False)
    out["f32/solve"] = F32.solve(v.float(), 0.1).double()
    out["f32/logdet"] = F32.logdet(0.1).double()
    for structure in ("full", "kfac", "diag"):
        post = LaplacePosterior(model, data, structure=structure, prior_precision=0.7,
                                progress=False)
        out[f"laplace/{structure}/evidence"] = post.log_marginal_likelihood()
        out[f"laplace/{structure}/predictive"] = post.predictive(Xt)
        out[f"laplace/{structure}/samples"] = post.sample(3, torch.Generator().manual_seed(1))
        out[f"laplace/{structure}/prior"] = torch.tensor(post.optimize_prior_precision())
        if structure == "full":  # exact softmax: C − 1 columns per input, also when sharded
            out["laplace/full/rank"] = torch.tensor(post.rank)
    for structure in ("full", "kfac", "diag"):
        ewc = EWC(model, structure=structure)
        ewc.consolidate(data, progress=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
        out[f"ewc/{structure}"] = ewc.penalty().detach()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05)
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        X, y, Xt = make_data()
        model, data = make_model(), shard(X, y, rank, world)
        out = results(model, data, Xt)
        # the columns stay with their ranks: each holds only its shard's M_r = N_r·C of M = N·C
        U = curvkit.fisher(model, data, route="dual", progress=False).operator.factor
        out["columns"] = torch.tensor([U.local.rank, U.rank])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still communicates
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_union_over_ranks_equals_one_process(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    X, y, Xt = make_data()
    ref = results(make_model(), (X, y), Xt)  # one process, one batch
    bounds = [round(i * N / world) for i in range(world + 1)]
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got.pop("columns").tolist() == [3 * (bounds[r + 1] - bounds[r]), 3 * N]
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            tol = 1e-5 if key.startswith("f32") else 1e-10
            torch.testing.assert_close(got[key], value, rtol=tol, atol=tol, msg=key)
