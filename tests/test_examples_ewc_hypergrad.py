"""Smoke tests: the EWC and hypergradient examples run end to end in their ``--quick`` mode."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _run(script: str, out: pathlib.Path) -> str:
    """Run ``examples/<script> --quick --out <out>`` in-process (its ``main(argv)``); stdout."""
    spec = importlib.util.spec_from_file_location(f"example_{script[:-3]}", ROOT / "examples" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            module.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the examples set their own thread count
    return buf.getvalue()


def test_continual_digits_quick(tmp_path):
    stdout = _run("continual_digits.py", tmp_path)
    summary = json.loads((tmp_path / "continual_digits.json").read_text())
    assert (tmp_path / "continual_digits.png").stat().st_size > 0
    results = summary["results"]
    assert "sgd" in results and "full" in results
    for method, r in results.items():
        assert len(r["test_acc"]) == summary["config"]["tasks"]
        assert 0.0 <= r["final_test"] <= 1.0
        if method == "sgd":
            assert r["memory"]["total"] == 0
        else:
            assert r["memory"]["total"] > 0 and r["memory"]["anchors"] > 0
    assert "avg test acc" in stdout


def test_hyperparameter_digits_quick(tmp_path):
    stdout = _run("hyperparameter_digits.py", tmp_path)
    summary = json.loads((tmp_path / "hyperparameter_digits.json").read_text())
    assert len(summary["grid"]) == 2
    run = summary["hypergradient"]["fisher-exact (full, CG)"]
    assert len(run["trace"]) == summary["config"]["outer_steps"] + 1
    assert all(len(r["hypergrad"]) == 2 for r in run["trace"])
    assert run["retrained"]["val_loss"] > 0
    assert summary["surrogates_step0"]
    assert "summary" in stdout
