"""Smoke tests of ``paper_checks``: the harness, the report and two checks at a tiny size (< 60 s)."""

from __future__ import annotations

import json
import math

import pytest

from paper_checks import CHECKS, load
from paper_checks.__main__ import main
from paper_checks.harness import (
    FAILS,
    HOLDS,
    PARTLY,
    VERDICTS,
    CheckResult,
    Config,
    Grid,
    Harness,
    Method,
    MethodResult,
    Run,
    RunSpec,
    Setup,
    gap_closed,
    ratio_verdict,
    train,
)
from paper_checks.report import render, write_report

FIELDS = ("name", "title", "claim", "paper", "ours", "verdict", "rule", "setup", "details", "seconds",
          "level", "seeds", "command", "environment")


def _cfg(tmp_path) -> Config:
    return Config(level="tiny", seeds=1, jobs=1, out_dir=tmp_path, progress=False, command="pytest")


def test_every_check_declares_its_interface():
    for name in CHECKS:
        mod = load(name)
        assert mod.NAME == name
        for attr in ("TITLE", "CLAIM", "PAPER", "REQUIRES"):
            assert isinstance(getattr(mod, attr), (str, tuple)) and getattr(mod, attr)
        assert callable(mod.run)
    with pytest.raises(ValueError, match="unknown check"):
        load("fig9z")


def test_grid_points_and_ratio_parametrisation():
    g = Grid((0.1, 1.0), (1e-2, 1.0), ratio=True)
    assert g.points() == [(1e-3, 1e-2, 0.1), (1e-2, 1e-2, 1.0), (0.1, 1.0, 0.1), (1.0, 1.0, 1.0)]
    assert Grid((0.1, 0.3)).points() == [(0.1, None, 0.1), (0.3, None, 0.3)]


def test_verdict_rules():
    assert ratio_verdict(12.0, 10.0) == HOLDS
    assert ratio_verdict(12.0, 10.0, sep=False) == PARTLY
    assert ratio_verdict(3.0, 10.0) == PARTLY
    assert ratio_verdict(0.5, 10.0) == FAILS

    def fake(v: float) -> MethodResult:
        return MethodResult("m", Method.make("m", "sgd"), Grid((0.1,)), [], 0.1, None, [], [v], [0], [v],
                            [0.0], [])

    assert gap_closed(fake(1.0), fake(0.1), fake(0.01)) == pytest.approx(0.5)
    assert math.isnan(gap_closed(fake(0.01), fake(0.1), fake(1.0)))  # no gap


def test_tune_falls_back_when_the_selected_point_diverges_on_another_seed(tmp_path):
    setup = Setup(data="digits", n_train=64, hidden=(8,), batch_size=32, steps=6, eval_every=3)
    method = Method.make("SGD+M", "sgd")
    finals = {(0.1, 0): 0.5, (0.2, 0): 0.02, (0.3, 0): 0.01, (0.2, 1): 0.03, (0.3, 1): math.inf}
    cfg = Config(level="tiny", seeds=2, jobs=1, out_dir=tmp_path, progress=False)
    with Harness(cfg) as h:
        for (lr, seed), v in finals.items():  # pre-filled cache: no training happens
            h.cache[RunSpec(setup, method, lr, None, seed)] = Run([0, 6], [2.3, v], v, not math.isfinite(v),
                                                                   0.0, 0.0)
        res = h.tune(setup, [(method, Grid((0.1, 0.2, 0.3)))])["SGD+M"]
    assert res.lr == 0.2 and res.fallbacks == 1 and res.finals == [0.02, 0.03]
    assert res.summary()["fallbacks"] == 1


def test_training_run_is_reproducible_and_reports_divergence():
    setup = Setup(data="digits", n_train=64, hidden=(8,), batch_size=32, steps=6, eval_every=3)
    spec = RunSpec(setup, Method.make("SGD+M", "sgd"), 0.1, None, 0)
    a, b = train(spec), train(spec)
    assert a.steps == [0, 3, 6] and a.loss == b.loss and not a.diverged
    bad = train(RunSpec(setup, Method.make("SGD+M", "sgd"), 1e6, None, 0))
    assert bad.diverged and math.isinf(bad.final)


def test_toy_check_writes_json_with_verdict(tmp_path):
    with Harness(_cfg(tmp_path)) as h:
        res = load("appF_toy").run(h)
    assert res.verdict == HOLDS
    data = json.loads((tmp_path / "appF_toy.json").read_text())
    for key in FIELDS:
        assert key in data
    assert data["verdict"] == HOLDS and data["level"] == "tiny"
    assert (tmp_path / data["figure"]).exists()
    assert all(row["ok"] for row in data["details"]["values"])


def test_tiny_training_check_and_report(tmp_path):
    with Harness(_cfg(tmp_path)) as h:
        res = load("fig4b").run(h)
    assert res.verdict in VERDICTS[:3]
    data = json.loads((tmp_path / "fig4b.json").read_text())
    assert data["verdict"] == res.verdict
    methods = data["details"]["methods"]
    assert {m["label"] for m in methods} >= {"FOOF T=1", "KFAC (EMA 0.95)", "SGD+M"}
    for m in methods:
        assert len(m["final_losses"]) == 1 and m["grid_table"] and "curve" in m
    text = write_report(tmp_path, tmp_path / "REPORT.md")
    assert "| **Fig 4B**" in text and res.verdict in text and "figures/fig4b.png" in text


def test_report_renders_not_run_rows():
    r = CheckResult(name="fig1ab", title="Fig 1A/1B", claim="c", paper="p", ours="not run", verdict="not run",
                    rule="-").to_json()
    text = render([r], {"command": "python -m paper_checks", "seconds": 60.0, "level": "full", "seeds": 3,
                        "jobs": 2, "checks": ["fig1ab"], "finished": "now"})
    assert "**not run**" in text and "1.0 min" in text


def test_cli_runs_the_toy_check(tmp_path, capsys):
    assert main(["--list"]) == 0
    assert "appF_toy" in capsys.readouterr().out
    assert main(["--tiny", "--only", "appF_toy", "--jobs", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "appF_toy.json").exists() and (tmp_path / "REPORT.md").exists()
    meta = json.loads((tmp_path / "_run.json").read_text())
    assert meta["checks"] == ["appF_toy"] and meta["level"] == "tiny"
