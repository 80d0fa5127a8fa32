"""``examples/distributed_laplace.py``: the same figures on 1 and 2 (gloo) processes."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--rows", "60", "--steps", "5", "--batch-size", "16"]


def _load():
    path = ROOT / "examples" / "distributed_laplace.py"
    spec = importlib.util.spec_from_file_location("distributed_laplace", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = _load().main(ARGS)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_example_gives_the_union_on_two_processes(tmp_path):
    one = _load().main(ARGS)
    assert one["world"] == 1 and one["rows_on_this_rank"] == 60
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["world"] == 2 and got["rows_on_this_rank"] == 30
        for key in ("log_evidence", "prior_precision", "solve_norm", "test_nll"):
            assert abs(got[key] - one[key]) <= 1e-8 * max(1.0, abs(one[key])), (key, got[key], one[key])
