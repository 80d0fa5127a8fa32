"""Smoke test: the optimizer benchmark runs in quick mode (tiny sizes) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("optimizer_step", ROOT / "benchmarks" / "optimizer_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: tiny ops on a loaded 2-core machine stall in OpenMP otherwise
        res = mod.main(["--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["quick"] and set(saved["results"]) == {"mlp", "cnn"}
    mlp = saved["results"]["mlp"]["methods"]
    assert {"SGD", "Adam", "FOOF T=1", "FOOF T=10", "FOOF T=100", "KFAC T=100", "NaturalGradient"} <= set(mlp)
    cnn = saved["results"]["cnn"]["methods"]
    assert cnn["FOOF T=500"]["samples"] == {"plain": 1, "stats": 1, "inv": 1}
    assert all(m["per_step_s"] > 0 for r in saved["results"].values() for m in r["methods"].values())
    assert {"mlp_kfac_over_foof_T100", "cnn_foof_over_sgd", "cnn_kfac_over_sgd"} <= set(saved["goals"])
    for name in ("mlp", "cnn"):  # per-round ratios of interleaved rounds (ASDL only outside --quick)
        assert {f"{name}_foof_over_kfac_T{T}" for T in (1, 10, 100)} <= set(saved["goals"])
        q = saved["results"][name]["per_round_ratios"]["FOOF T=1 / KFAC T=1"]
        assert q["rounds"] == 1 and q["min"] <= q["median"] <= q["max"]
    assert res["goals"] == saved["goals"]
