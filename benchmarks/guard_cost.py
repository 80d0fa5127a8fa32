"""Cost of the capture guard ÷ one forward+backward (issue 10).

Paper MLP 784-1000-1000-1000-10 (no bias, tanh), N = 100, MC Fisher (one label per input),
float32, CPU. Per round, interleaved with the order switched each round (A B C, C B A, ...):

* fb:     one forward + ``loss.backward()`` (the training step's autograd work);
* off:    ``curvkit.capture.capture(..., kind="mc", check=False)``;
* on:     the same with ``check=True``.

Each contender and round is one ``torch.utils.benchmark.Timer`` ``blocked_autorange`` of at
least ``--min-time`` seconds (``benchmarks/_common.py``; warm-up included). The guard's cost is
``on − off``; reported is the median over rounds of ``(on − off) / fb``.
Run: ``PYTHONPATH=$PWD python benchmarks/guard_cost.py [--rounds 15] [--min-time 0.5]``; writes
JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import interleaved  # noqa: E402
from curvkit.capture import capture, find_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="seconds of timed calls per contender and round")
    args = ap.parse_args()
    torch.manual_seed(0)
    dims = [784, 1000, 1000, 1000, 10]
    mods: list[nn.Module] = []
    for i in range(4):
        mods += [nn.Linear(dims[i], dims[i + 1], bias=False)] + ([nn.Tanh()] if i < 3 else [])
    model = nn.Sequential(*mods)
    x = torch.randn(100, 784)
    y = torch.randint(0, 10, (100,))
    layers = find_layers(model, list(model.parameters()))
    loss_fn = nn.CrossEntropyLoss()

    def fb():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def cap(check):
        return lambda: capture(model, x, layers, kind="mc", likelihood="classification",
                               generator=torch.Generator().manual_seed(0), check=check)

    fns = {"fb": fb, "off": cap(False), "on": cap(True)}
    times = interleaved(fns, args.rounds, min_run_time=args.min_time)
    ratios = [(on - off) / f for on, off, f in zip(times["on"], times["off"], times["fb"])]
    out = {
        "model": "MLP 784-1000-1000-1000-10, no bias, tanh", "N": 100, "kind": "mc",
        "dtype": "float32", "threads": torch.get_num_threads(), "rounds": args.rounds,
        "min_time_s": args.min_time,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "guard_over_forward_backward_median": statistics.median(ratios),
        "guard_over_forward_backward_quartiles": statistics.quantiles(ratios, n=4),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
