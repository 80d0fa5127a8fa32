"""EWC(distributed="shard") under torch.distributed: each rank keeps only its own Woodbury columns.

2 gloo processes on CPU, float64, uneven shards (6 and 5 of N = 11 data) fed as loaders. Rank r
keeps its M_r = N_r·C columns U_r of the union Fisher F = Σ_r U_r U_rᵀ; its penalty() is the DDP
share W·(κ/2)‖U_rᵀΔ‖², whose gradient averaged by DistributedDataParallel is κ F Δ, and
penalty_value() (mean of the shares) is the full penalty -- both equal one process on the
concatenated data (1e-10). A shard state loads only on its own rank of a group of its size.
Teardown as in test_distributed: a barrier before destroying the group.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from curvkit.ewc import EWC

N, C, W, KAPPA = 11, 3, 2, 1.7
STRUCTS = ("full", "block_diag", "kfac", "diag")
#: stored values per datum of the columns: Σ_l (d_in,l + C·d_out,l), bias ones column included
PER_DATUM = (4 + 1 + C * 5) + (5 + 1 + C * 3)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # P = 43 > M = 33


def make_data(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 4, dtype=torch.float64, generator=g),
            torch.randint(0, C, (N,), generator=g))


def bounds(rank: int) -> tuple[int, int]:
    b = [round(i * N / W) for i in range(W + 1)]
    return b[rank], b[rank + 1]


def shard(X, y, rank: int) -> list:
    """Rank r's contiguous, uneven share of the data, as batches of at most 2."""
    lo, hi = bounds(rank)
    return [(X[i:min(i + 2, hi)], y[i:min(i + 2, hi)]) for i in range(lo, hi, 2)]


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def task_loss(model, X, y, rank: int | None):
    """Mean cross-entropy over the union; on rank r its DDP share (W/N)·Σ_{n ∈ shard r} ℓ_n."""
    if rank is None:
        return nn.functional.cross_entropy(model(X), y)
    lo, hi = bounds(rank)
    return (W / N) * nn.functional.cross_entropy(model(X[lo:hi]), y[lo:hi], reduction="sum")


def penalties(rank: int | None) -> dict:
    """Penalty values (shard: penalty_value(); one process: penalty()) and DDP-style gradients."""
    X, y = make_data()
    X2, y2 = make_data(7)
    data = (X, y) if rank is None else shard(X, y, rank)
    data2 = (X2, y2) if rank is None else shard(X2, y2, rank)
    mode = "gather" if rank is None else "shard"
    out = {}
    for structure in STRUCTS:
        model = make_model()
        ewc = EWC(model, KAPPA, structure=structure, distributed=mode)
        ewc.consolidate(data, progress=False)
        perturb(model, 1)
        value = ewc.penalty() if rank is None else ewc.penalty_value()
        out[f"{structure}/value"] = value
        if structure == "full":  # a second task: two sharded Fishers, two anchors
            ewc.consolidate(data2, progress=False)
            perturb(model, 2)
            out["full/two_tasks"] = ewc.penalty() if rank is None else ewc.penalty_value()
    for structure in ("full", "block_diag"):
        model = make_model()
        ewc = EWC(model, KAPPA, structure=structure, distributed=mode)
        ewc.consolidate(data, progress=False)
        perturb(model, 1)
        net = model if rank is None else DistributedDataParallel(model)
        loss = task_loss(net, X, y, rank) + ewc.penalty()
        loss.backward()  # DDP averages the ranks' gradients
        for i, p in enumerate(model.parameters()):
            out[f"ddp/{structure}/grad{i}"] = p.grad.detach().clone()
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        out = penalties(rank)
        X, y = make_data()
        lo, hi = bounds(rank)
        for mode in ("shard", "gather"):
            model = make_model()
            ewc = EWC(model, KAPPA, structure="full", distributed=mode)
            ewc.consolidate(shard(X, y, rank), progress=False)
            out[f"memory/{mode}"] = torch.tensor(ewc.memory_breakdown()["curvature"])
            if mode == "shard":
                perturb(model, 1)
                state = ewc.state_dict()
                out["rows"] = torch.tensor([[a.shape[0], e.shape[0]] for a, e in zip(
                    state["terms"][0]["tensors"]["a"], state["terms"][0]["tensors"]["e"])])
                out["shard"] = torch.tensor(state["terms"][0]["shard"])
                share = ewc.penalty().detach()
                out["share"] = share
                torch.save(state, os.path.join(out_dir, f"state{rank}.pt"))
                dist.barrier()  # both states on disk
                same = EWC(model, structure="full", distributed="shard")
                same.load_state_dict(torch.load(os.path.join(out_dir, f"state{rank}.pt")))
                out["reloaded_share"] = same.penalty().detach()
                other = torch.load(os.path.join(out_dir, f"state{1 - rank}.pt"))
                with pytest.raises(ValueError, match=(
                        rf"EWC.load_state_dict: stored Fisher 0 holds only rank {1 - rank}'s "
                        rf"Woodbury columns of a 2-process group \(distributed='shard'\), but this "
                        rf"process is rank {rank} of 2; use it on rank {1 - rank} of a 2-process")):
                    same.load_state_dict(other)
                # a non-finite share on one rank: every rank still joins the collective and raises
                if rank == 0:
                    with torch.no_grad():
                        model[0].weight[0, 0] = float("inf")
                msg = (r"EWC.penalty: parameter '0.weight' has non-finite values" if rank == 0 else
                       r"EWC.penalty_value: the penalty share of another rank is not finite")
                with pytest.raises(FloatingPointError, match=msg):
                    same.penalty_value()
                assert lo < hi
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still communicates
    finally:
        dist.destroy_process_group()


def test_sharded_ewc_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=W, join=True)
    ref = penalties(None)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    for r, g in enumerate(got):
        lo, hi = bounds(r)
        # (1) rank r holds only its N_r inputs and N_r·C error columns per layer
        assert g.pop("rows").tolist() == [[hi - lo, C * (hi - lo)]] * 2
        assert g.pop("shard").tolist() == [r, W]
        assert int(g.pop("memory/shard")) == 8 * (hi - lo) * PER_DATUM
        assert int(g.pop("memory/gather")) == 8 * N * PER_DATUM
        torch.testing.assert_close(g.pop("reloaded_share"), g["share"], rtol=0, atol=0)
    # the shares are not the penalty; their mean is
    shares = [g.pop("share") for g in got]
    full = sum(shares) / W
    assert not torch.allclose(shares[0], full, rtol=1e-3)
    torch.testing.assert_close(full, got[0]["full/value"], rtol=1e-12, atol=1e-12)
    for g in got:
        # (2) penalty_value() == one process on the concatenated data; (3) DDP-averaged gradient
        # of (task share + penalty share) == gradient of (mean task loss + full penalty)
        assert g.keys() == ref.keys()
        for key, value in ref.items():
            torch.testing.assert_close(g[key], value.detach(), rtol=1e-10, atol=1e-10, msg=key)
    assert all(ref[k].abs().max() > 1e-3 for k in ref)  # nothing vanishes trivially

    # (4) a shard state refuses another world size / another mode, naming the fix
    state = torch.load(tmp_path / "state0.pt")
    model = make_model()
    with pytest.raises(ValueError, match=(
            r"EWC.load_state_dict: stored Fisher 0 holds only rank 0's Woodbury columns of a "
            r"2-process group \(distributed='shard'\), but this process is rank 0 of 1; use it on "
            r"rank 0 of a 2-process torch.distributed group \(each rank loads the state it "
            r"saved\), or consolidate again here")):
        EWC(model, structure="full", distributed="shard").load_state_dict(state)
    with pytest.raises(ValueError, match=(
            r"EWC.load_state_dict: the state was saved with distributed='shard' but this EWC has "
            r"distributed='gather'; construct EWC\(model, distributed='shard'\) to load it")):
        EWC(model, structure="full").load_state_dict(state)
    fresh = EWC(model, structure="full", distributed="shard")
    assert fresh.num_tasks == 0  # nothing changed by the refusals


def test_distributed_mode_is_checked_and_one_process_shard_is_plain():
    with pytest.raises(ValueError, match=r"EWC: distributed must be one of \['gather', 'shard'\] "
                                         r"\('gather': every rank holds all Woodbury columns; "
                                         r"'shard': each rank its own\), got 'scatter'"):
        EWC(make_model(), distributed="scatter")  # type: ignore[arg-type]
    # without a process group, "shard" keeps all columns and penalty_value() is the penalty
    X, y = make_data()
    a, b = make_model(), make_model()
    ea, eb = EWC(a, KAPPA, distributed="shard"), EWC(b, KAPPA)
    ea.consolidate(X, y)
    eb.consolidate(X, y)
    perturb(a, 1)
    perturb(b, 1)
    torch.testing.assert_close(ea.penalty(), eb.penalty(), rtol=0, atol=0)
    torch.testing.assert_close(ea.penalty_value(), eb.penalty().detach(), rtol=0, atol=0)
    assert ea.state_dict()["terms"][0]["shard"] is None
