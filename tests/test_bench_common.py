"""``benchmarks/_common.py``: interleaved Timer rounds (order switched each round), per-round
ratios, the JSON writer and the fresh-process runner with its error paths."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interleaved_switches_order_and_keeps_threads(common):
    """A B, then B A; every contender timed once per round; the thread count is the caller's."""
    calls: list[str] = []
    seen_threads: list[int] = []

    def mk(name):
        def f():
            calls.append(name)
            seen_threads.append(torch.get_num_threads())
        return f

    times = common.interleaved({"a": mk("a"), "b": mk("b")}, 3, min_run_time=0.0)
    assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) > 0 for v in times.values())
    # per measurement: one untimed warm-up call and one timed call of the same contender
    firsts = [calls[i] for i in range(0, len(calls), 2)]
    assert firsts == ["a", "b", "b", "a", "a", "b"]
    assert set(seen_threads) == {torch.get_num_threads()}


def test_setup_runs_before_every_timed_call(common):
    """``measure``'s untimed setup runs before every block (the optimizer benchmark places the
    step counter there)."""
    state = {"placed": 0, "ok": True}

    def setup():
        state["placed"] = 1

    def fn():
        state["ok"] &= state["placed"] == 1
        state["placed"] = 0

    m = common.measure(fn, setup=setup, min_run_time=0.0)
    assert state["ok"] and m.median > 0


def test_round_ratios_and_json(common, tmp_path):
    q = common.round_ratios([2.0, 3.0, 8.0], [1.0, 1.0, 2.0])
    assert q == {"median": 3.0, "min": 2.0, "max": 4.0, "rounds": 3, "per_round": [2.0, 3.0, 4.0]}
    with pytest.raises(ValueError, match="ratio of 2 and 1 rounds"):
        common.round_ratios([1.0, 2.0], [1.0])
    p = common.write_json(tmp_path / "sub" / "r.json", {"x": q})
    assert json.loads(p.read_text())["x"]["median"] == 3.0


def test_run_worker_result_and_errors(common, tmp_path):
    """The last JSON line of ``script --worker spec``; a failure or timeout names its cause."""
    script = tmp_path / "w.py"
    script.write_text(
        "import json, sys, time\n"
        "spec = json.loads(sys.argv[2])\n"
        "if spec.get('fail'): sys.exit('worker failed on purpose')\n"
        "if spec.get('sleep'): time.sleep(spec['sleep'])\n"
        "print('noise'); print(json.dumps({**spec, 'ok': True}))\n")
    assert common.run_worker(script, {"a": 1}, timeout=60) == {"a": 1, "ok": True}
    bad = common.run_worker(script, {"fail": True}, timeout=60)
    assert bad["error"] == "worker failed on purpose"
    slow = common.run_worker(script, {"sleep": 30}, timeout=1.0)
    assert slow == {"sleep": 30, "error": "timeout after 1 s"}
