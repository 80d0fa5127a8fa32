"""Shared pieces of the benchmarks: interleaved Timer rounds, per-round ratios, JSON, subprocesses.

* **Timing** of an in-process callable is ``torch.utils.benchmark.Timer``: it holds the thread
  count fixed during the measurement (the caller's, unless told otherwise), warms up while it
  estimates the calls per block, and returns a ``Measurement`` (median, per-block times).
* **Interleaving** (:func:`interleaved`): every round measures each contender once, in the order
  A B C … in even rounds and … C B A in odd ones, so slow drifts of a shared machine's load
  cancel in the *per-round* ratios (:func:`round_ratios`: median / min / max over rounds).
* **Fresh processes** (:func:`run_worker`): a benchmark script re-runs itself with
  ``--worker <spec JSON>`` and prints one JSON line (peak memory is that process's).

Benchmarks import this module as ``benchmarks._common`` with the repository root on
``sys.path`` (each script inserts it), so it also works when a test loads a script by path.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer

__all__ = ["measure", "interleaved", "ratio_stats", "round_ratios", "write_json", "run_worker"]


def measure(fn: Callable[[], Any], *, setup: Callable[[], Any] | None = None,
            min_run_time: float = 0.2, num_threads: int | None = None) -> Measurement:
    """``Timer(stmt="fn()", setup="setup()").blocked_autorange(min_run_time)``.

    ``setup`` runs (untimed) before every block of calls, e.g. to place an optimizer's step
    counter; a callable slower than ``min_run_time / 1000`` is timed one call per block after
    one untimed warm-up call, so ``min_run_time=0`` gives exactly one timed call.

    Args:
        fn: the callable.
        setup: optional untimed callable run before every block.
        min_run_time: seconds of timed calls at least.
        num_threads: torch threads during the measurement (default: the current count).

    Returns:
        The ``Measurement`` (``.median``: seconds per call; ``.times``: per block).
    """
    g = {"fn": fn, "setup": setup or (lambda: None)}
    timer = Timer(stmt="fn()", setup="setup()", globals=g,
                  num_threads=torch.get_num_threads() if num_threads is None else num_threads)
    return timer.blocked_autorange(min_run_time=min_run_time)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, *, min_run_time: float = 0.2,
                num_threads: int | None = None, progress: Callable[[int], None] | None = None
                ) -> dict[str, list[float]]:
    """Per-round median seconds per call of every contender, interleaved (module doc).

    Args:
        fns: contender name -> callable (each warmed up by :func:`measure` itself).
        rounds: number of rounds.
        min_run_time: per contender and round, see :func:`measure`.
        num_threads: see :func:`measure`.
        progress: called with the round index after each round.

    Returns:
        ``name -> [seconds per call in round r]``.
    """
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(measure(fns[k], min_run_time=min_run_time, num_threads=num_threads).median)
        if progress is not None:
            progress(r)
    return times


def ratio_stats(values: list[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "rounds", "per_round"}`` of per-round ratios."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": len(values), "per_round": list(values)}


def round_ratios(num: list[float], den: list[float]) -> dict[str, Any]:
    """:func:`ratio_stats` of ``num[r] / den[r]`` (same rounds)."""
    if len(num) != len(den):
        raise ValueError(f"ratio of {len(num)} and {len(den)} rounds")
    return ratio_stats([a / b for a, b in zip(num, den)])


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` (parent folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=indent))
    return p


def run_worker(script: str | os.PathLike, spec: dict, timeout: float,
               pythonpath: str | None = None, tail: int = 3) -> dict:
    """``python script --worker <spec JSON>`` in a fresh process; its last JSON line.

    Args:
        script: the benchmark script (``__file__`` of the caller).
        spec: the measurement's description, passed as JSON.
        timeout: seconds before the process is killed.
        pythonpath: ``PYTHONPATH`` for the process (default: inherited).
        tail: lines of stderr/stdout quoted when it fails.

    Returns:
        The worker's result, or ``{**spec, "error": ...}`` on a timeout, a non-zero exit or no
        JSON line.
    """
    cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-tail:])}
    return json.loads(lines[-1])
