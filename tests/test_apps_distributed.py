"""validate.compare and hypergrad.implicit_grad under torch.distributed: each rank passes its
shard and gets the result of the union (2 gloo processes, float64, uneven shards as loaders);
validate with reference='woodbury' and hypergrad with a sharded Fisher keep the Woodbury columns
with their ranks. Teardown as in test_distributed: a barrier before destroying the group."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvkit
from curvkit.hypergrad import implicit_grad

N = 9
STRUCTS = ("full", "block_diag", "kfac", "diag")
METRICS = ("direction_error", "direction_cosine", "cosine_A", "cosine_A_network", "matrix_error")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (N,), generator=g)


def reports(model, data) -> dict:
    out = {}
    for reference in ("explicit", "woodbury"):
        rep = curvkit.validate.compare(model, data, structures=STRUCTS, reference=reference,
                                       damping=0.05, progress=False)
        for row in rep.rows:
            for m in METRICS:
                value = getattr(row, m)
                if value is not None:
                    out[f"{reference}/{row.label}/{m}"] = torch.tensor(value, dtype=torch.float64)
        out[f"{reference}/baseline"] = torch.tensor(rep.baseline["direction_cosine"])
        out[f"{reference}/num_data"] = torch.tensor(rep.settings["num_data"])
    return out


def hypergradients(model, data, data_v) -> dict:
    phi = torch.tensor([0.3, 0.1], dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())

    def inner(x, y):  # batch-mean NLL + per-layer weight decay φ
        return (torch.nn.functional.cross_entropy(model(x), y)
                + 0.5 * (phi[0] * (params[0] ** 2).sum() + phi[1] * (params[2] ** 2).sum()))

    def outer(x, y):
        return torch.nn.functional.cross_entropy(model(x), y)

    out = {}
    for structure in ("full", "kfac"):
        F = curvkit.fisher(model, data, structure=structure, progress=False)
        for damping in (0.2, [0.3, 0.05, 0.1, 0.05]):  # operator solve; per-parameter PCG
            hg, info = implicit_grad(inner, outer, params, [phi], curvature=F, damping=damping,
                                     inner_data=data, outer_data=data_v, progress=False,
                                     return_info=True)
            key = f"hypergrad/{structure}/{info['method']}"
            out[key] = hg[0]
            out[key + "/v"] = torch.cat([v.reshape(-1) for v in info["v"]])
    if torch.distributed.is_initialized():
        with pytest.raises(NotImplementedError, match=r"curvature='hessian' with inner_data under "
                                                      r"torch.distributed is not supported"):
            implicit_grad(inner, outer, params, [phi], curvature="hessian", inner_data=data,
                          outer_data=data_v, progress=False)
    return out


def _shard(X, y, lo, hi):
    return [(X[i:min(i + 2, hi)], y[i:min(i + 2, hi)]) for i in range(lo, hi, 2)]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        X, y = make_data()
        lo, hi = (0, 5) if rank == 0 else (5, N)  # uneven shards, batches of at most 2
        out = reports(make_model(), _shard(X, y, lo, hi))
        out.update(hypergradients(make_model(), _shard(X, y, lo, hi),
                                  _shard(X, y, 0, 3) if rank == 0 else _shard(X, y, 3, 4)))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still communicates
    finally:
        dist.destroy_process_group()


def test_union_over_ranks_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    X, y = make_data()
    ref = reports(make_model(), (X, y))
    ref.update(hypergradients(make_model(), (X, y), (X[:4], y[:4])))
    assert any(k.startswith("hypergrad/full/operator-pcg") for k in ref)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-10, msg=key)
