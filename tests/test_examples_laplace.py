"""Smoke test: ``examples/laplace_digits.py --quick`` runs end to end (< 30 s) and writes its outputs."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "laplace_digits.py"


def test_laplace_digits_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("laplace_digits_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t0 = time.process_time()  # CPU time: a loaded, shared machine does not count
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    elapsed = time.process_time() - t0
    data = json.loads((tmp_path / "laplace_digits.json").read_text())
    assert (tmp_path / "laplace_digits_reliability.png").stat().st_size > 0
    methods = data["methods"]
    assert "MAP" in methods and "full Laplace, δ by evidence" in methods
    for r in methods.values():
        assert 0.8 < r["accuracy"] <= 1.0 and r["nll"] > 0 and 0 <= r["ece"] <= 1
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| method "))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "δ", "log evidence", "test acc", "test NLL", "ECE", "seconds"]
    # ≈ 10 s on an idle 2-core machine; the bound only guards against a hang
    assert elapsed < 120, f"quick mode took {elapsed:.1f} s of CPU time"
