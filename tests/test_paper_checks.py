"""Tests of ``paper_checks``: grid search logic (median selection, edge widening) on synthetic
surfaces, the public-code KFAC variants, the harness, the report and two checks at a tiny size."""

from __future__ import annotations

import json
import math

import pytest
import torch

from paper_checks import CHECKS, load
from paper_checks.__main__ import main
from paper_checks.grids import edges, next_value, search, select
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
    ratio,
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
        return MethodResult("m", Method.make("m", "sgd"), Grid((0.1,)), [], 0.1, None, [], [v], [])

    assert gap_closed(fake(1.0), fake(0.1), fake(0.01)) == pytest.approx(0.5)
    assert math.isnan(gap_closed(fake(0.01), fake(0.1), fake(1.0)))  # no gap
    # losses that underflow to 0: a tie favours nobody, KFAC alone at 0 is an infinite gap
    assert math.isnan(ratio(fake(0.0), fake(0.0))) and ratio(fake(1e-3), fake(0.0)) == math.inf
    assert ratio_verdict(ratio(fake(0.0), fake(0.0)), 3.0) == FAILS
    assert gap_closed(fake(1.0), fake(0.5), fake(0.0)) == 0.0
    assert gap_closed(fake(1.0), fake(0.0), fake(0.0)) == 1.0


def test_next_grid_value_continues_the_pattern():
    assert next_value([1e-3, 3e-3, 1e-2, 3e-2], up=True) == 0.1
    assert next_value([1e-3, 3e-3, 1e-2, 3e-2], up=False) == pytest.approx(3e-4)
    assert next_value([1e-6, 1e-4, 1e-2], up=True) == 1.0
    assert next_value([1e-6, 1e-4, 1e-2], up=False) == pytest.approx(1e-8)


def _bowl(a_opt: float, d_opt: float, noise=lambda s: 0.0):
    """Synthetic loss surface: quadratic in (log η, log λ) with its minimum at (a_opt, d_opt)."""
    def f(todo):
        return [(math.log10(a / a_opt)) ** 2 + (math.log10(d / d_opt)) ** 2 + 1 + noise(s)
                for (a, d), s in todo]
    return f


def test_edge_widening_walks_to_an_interior_optimum():
    g = Grid((1e-3, 3e-3, 1e-2), (1e-2, 1.0))
    s = search(g, [0, 1, 2], _bowl(0.1, 1e-5), screen=3, cap=5)
    assert s.selected == (0.1, 1e-6) or s.selected == (0.1, 1e-4)  # log-distance ties: both 1 step away
    assert edges(s.keys, s.selected) == []  # interior: bracketed on both axes
    assert s.widened["lr high"] >= 3 and s.widened["damping low"] >= 2 and not s.capped


def test_edge_widening_stops_at_the_cap_and_says_so():
    s = search(Grid((1e-3, 3e-3), (1.0,)), [0, 1, 2], _bowl(10.0, 1.0), screen=2, cap=2)
    assert s.selected == (0.03, 1.0) and s.widened == {"lr high": 2}
    assert s.capped == ["lr high"] and s.summary()["remaining_edges"] == ["lr high"]


def test_diverged_neighbour_brackets_the_optimum_and_fixed_axes_are_not_widened():
    def f(todo):  # larger lr is better until it diverges at 0.1
        return [math.inf if a >= 0.1 else 1 / a for (a, _), _ in todo]

    s = search(Grid((0.01, 0.03, 0.1), (1e-2,), widen=("lr",)), [0, 1, 2], f)
    assert s.selected == (0.03, 1e-2) and s.widened == {}
    s = search(Grid((0.01, 0.03), (1e-4, 1e-2), widen=("lr",)), [0, 1, 2], _bowl(0.02, 1e-6))
    assert all(k[1] in (1e-4, 1e-2) for k in s.keys)  # damping fixed by design
    assert "damping low" in s.remaining_edges and not s.capped


def test_diverging_everywhere_steps_the_lr_axis_down_by_decades_until_an_interior_optimum():
    # FOOF'-like surface: diverges above lr 1e-6, optimum at 3e-7 (a grid starting at 3e-4)
    calls = []

    def f(todo):
        calls.extend(todo)
        return [math.inf if a > 1e-6 else (math.log10(a / 3e-7)) ** 2 + 1 for (a, _), _ in todo]

    s = search(Grid((3e-4, 1e-3, 3e-3), (1e-8,), widen=("lr",)), [0, 1, 2], f, screen=2, cap=2,
               diverged_cap=4)
    assert s.selected == (3e-7, 1e-8) and math.isfinite(s.finals[s.selected][1])
    assert s.widened["lr low (all diverged)"] == 3  # 1e-4 3e-5, 1e-5 3e-6, 1e-6 3e-7
    assert s.widened["lr low"] == 1 and edges(s.keys, s.selected) == []  # 1e-7 brackets it
    # seeds of points whose first seed diverged are never run
    assert not [k for k, sd in calls if sd > 0 and k[0] > 1e-6]


def test_diverging_everywhere_stops_at_the_cap_and_the_caveat_says_so():
    s = search(Grid((1e-3, 3e-3), (1e-2, 1.0)), [0, 1, 2], lambda todo: [math.inf] * len(todo),
               screen=2, cap=1, diverged_cap=2)
    assert s.done and s.widened == {"lr low (all diverged)": 2}
    assert s.capped == ["lr low (all diverged)"]
    assert sorted({k[0] for k in s.keys}) == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]  # at both dampings
    assert {k[1] for k in s.keys if k[0] == 1e-5} == {1e-2, 1.0}
    m = type("M", (), {"label": "X", "edges": [], "finals": [math.inf] * 3, "diverged": True,
                       "grid": Grid((1e-3,)), "search": s.summary()})()
    from paper_checks.verdicts import caveats
    assert any("extended 2 decade(s) downward (cap reached)" in c for c in caveats([m]))


def test_a_candidate_with_a_diverged_seed_is_replaced_by_the_next_converging_point():
    # the two best points on seed 0 diverge on seed 2; the third converges on every seed
    finals = {0.1: [0.01, 0.02, math.inf], 0.3: [0.02, 0.02, math.inf], 0.03: [0.05, 0.05, 0.05],
              0.01: [0.2, 0.2, 0.2]}

    def f(todo):
        return [finals[a][sd] for (a, _), sd in todo]

    s = search(Grid((0.01, 0.03, 0.1, 0.3)), [0, 1, 2], f, screen=2)
    assert s.selected == (0.03, None) and s.finals[(0.03, None)] == [0.05, 0.05, 0.05]
    assert "lr low (all diverged)" not in s.widened


def test_selection_is_by_the_median_over_seeds_not_by_seed_0():
    # point A is best on seed 0 but bad on the other two; B is consistently good
    finals = {(0.1, None): [0.01, 0.5, 0.6], (0.3, None): [0.05, 0.04, 0.06], (1.0, None): [0.2, 0.2, 0.2]}
    assert select(finals) == (0.3, None)
    assert select({(0.1, None): [0.01, math.inf, 0.01], (0.3, None): [0.5, 0.5, 0.5]}) == (0.3, None)

    def f(todo):
        return [finals[k][s] for k, s in todo]

    s = search(Grid((0.1, 0.3, 1.0)), [0, 1, 2], f, screen=2)
    assert s.selected == (0.3, None) and s.finals[(0.3, None)] == [0.05, 0.04, 0.06]


def test_tune_selects_by_median_from_the_run_cache(tmp_path):
    setup = Setup(data="digits", n_train=64, hidden=(8,), batch_size=32, steps=6, eval_every=3)
    method = Method.make("SGD+M", "sgd")
    finals = {0.1: [0.01, 0.5, 0.6], 0.3: [0.05, 0.04, 0.06], 1.0: [0.2, 0.2, 0.2], 3.0: [math.inf] * 3}
    cfg = Config(level="tiny", seeds=3, jobs=1, out_dir=tmp_path, progress=False, screen=2)
    with Harness(cfg) as h:
        for lr, vals in finals.items():  # pre-filled cache: no training happens
            for seed, v in enumerate(vals):
                run = Run([0, 6], [2.3, v], v, not math.isfinite(v), 0.0, 0.0)
                h.cache[RunSpec(setup, method, lr, None, seed)] = run
        res = h.tune(setup, [(method, Grid((0.1, 0.3, 1.0)))])["SGD+M"]
    assert res.lr == 0.3 and res.finals == [0.05, 0.04, 0.06] and res.median == 0.05
    assert res.edges == [] and res.summary()["search"]["candidates"] == [[0.1, None], [0.3, None]]


def _eig_pieces(seed: int = 0, d_out: int = 4, d_in: int = 3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_in, 2 * d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, 2 * d_out, generator=g, dtype=torch.float64)
    A, B = a @ a.T / 6, b @ b.T / 8
    sA, UA = torch.linalg.eigh(A)
    sB, UB = torch.linalg.eigh(B)
    M = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    pieces = {"heuristic": False, "damping": 0.1, "lambda_A": 1.0, "lambda_B": 1.0, "A_inv": None,
              "B_inv": None, "s_A": sA, "U_A": UA, "s_B": sB, "U_B": UB}  # KFAC's exact-mode state
    return A, B, M, pieces


def test_public_code_standard_damping_is_the_transposed_b_eigenbasis():
    from curvkit.optim import KFAC
    from paper_checks.variants import STANDARD, PublicCodeStandardKFAC

    A, B, M, pieces = _eig_pieces()
    lam = 0.1
    dense = torch.linalg.solve(torch.kron(B, A) + lam * torch.eye(12, dtype=torch.float64), M.reshape(-1))
    net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False)).double()
    ok = KFAC(net, lr=0.1, damping=lam, damping_mode=STANDARD)
    pub = PublicCodeStandardKFAC(net, lr=0.1, damping=lam, damping_mode=STANDARD)
    correct, public = ok._precondition(0, pieces, M, lam), pub._precondition(0, pieces, M, lam)
    assert torch.allclose(correct.reshape(-1), dense, atol=1e-12)
    swapped = dict(pieces, U_B=pieces["U_B"].T)
    assert torch.allclose(public, ok._precondition(0, swapped, M, lam), atol=1e-12)
    rel = float(torch.linalg.norm(public.reshape(-1) - dense) / torch.linalg.norm(dense))
    assert rel > 0.1  # a real difference, not a rounding one
    with pytest.raises(ValueError, match=f"damping_mode='{STANDARD}'"):
        PublicCodeStandardKFAC(torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False)), lr=0.1, damping=0.1)


def test_foof_prime_kfac_steps_along_the_d9_direction():
    from paper_checks.variants import direction_kwargs, kfac_class

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3, bias=False))
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    cls = kfac_class("correct", "foof_d9")
    opt = cls(model, lr=0.1, damping=1e-2, ema_decay=0.0, inv_period=1, ema_steps=1,
              generator=torch.Generator().manual_seed(0), **direction_kwargs("foof_d9"))
    opt.initialize([x])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    want = opt.direction(variant="foof", rescale="lambda_b")
    kfac = opt.direction(variant="kfac")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b, w, k in zip(model.parameters(), before, want, kfac):
        assert torch.allclose(p.detach() - b, w, atol=1e-6)
        assert not torch.allclose(w, k, atol=1e-6)


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
    assert {m["label"] for m in methods} >= {"FOOF T=1", "KFAC (EMA 0.95)", "SGD+M", "FOOF T=10 (own search)"}
    assert "own search" in data["ours"] and "amortised_own_search_over_t1" in data["details"]
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


def test_fig4b_amortised_verdict_keeps_protocol_and_own_search_apart():
    from paper_checks.fig4b import CLOSE, SAME, amortised_verdict

    assert amortised_verdict(1.0, 9.0) == HOLDS  # the paper's protocol decides when it holds
    assert amortised_verdict(SAME * 1.1, 1.0) == PARTLY
    assert amortised_verdict(float("inf"), 1.5) == PARTLY  # reused point diverged, own search close
    assert amortised_verdict(float("inf"), CLOSE) == FAILS
    assert amortised_verdict(CLOSE * 2, SAME * 1.01) == FAILS
