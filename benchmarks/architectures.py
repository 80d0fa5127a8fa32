"""Benchmark: MC-Fisher build and Woodbury solve on real architectures vs one forward+backward.

Two models (random weights, float32, CPU):

* torchvision ``resnet18`` (10 classes, eval BatchNorm, in-place ReLU, every parameter trained,
  P = 11.2M) on ``N`` random 3×32×32 inputs (default ``N = 32``);
* Hugging Face GPT-2 from a config (``--gpt-layers`` layers, width ``--gpt-width``, vocabulary
  ``--gpt-vocab``) with peft LoRA adapters (rank ``--lora-rank`` on ``c_attn``, ``c_proj``,
  ``c_fc``; only the adapters trained) on a batch of 8 × 128 random tokens; logits ``(N, T, V)``,
  every token a loss term.

Contenders per model: ``fwd+bwd`` (one forward and backward of the mean cross-entropy, the
unit), ``build`` (``curvkit.fisher(kind="mc", structure="full")`` -- forward, one backward per
MC sample to the layer outputs, the capture guard's extra backward -- plus
``F.factorize(λ)``, the Gram and its float64 Cholesky), ``build_nocheck`` (the same with
``check=False``), ``solve`` (one ``(F + λI)⁻¹ g`` for the loss gradient ``g`` on the factorised
Fisher). They are interleaved: in each of ``--rounds`` rounds every contender is timed once
(``torch.utils.benchmark.Timer`` after an untimed warm-up call, ``benchmarks/_common.py``), the
order reversed every other round, so machine load cancels in the per-round ratios; the median
and minimum of the per-round ratios to ``fwd+bwd`` are reported. Goal (issue 12): build ≤ 3×,
solve ≤ 1×. Accuracy: the solve's true relative residual ``‖(F + λI)x − g‖/‖g‖`` in float64
(``F`` from the captured factors widened to float64) beside the float32 limit (the residual of the
float64 solution rounded to float32). ``first solve``: the first solve after a fresh build (it also
forms the cached explicit float64 columns of layers with more locations than columns per input),
three fresh builds, each timed once beside one fwd+bwd, median ratio.

Run: ``python benchmarks/architectures.py [--quick] [--rounds 5] [--threads 2]
[--out benchmarks/results/architectures.json]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import curvkit  # noqa: E402
from benchmarks._common import interleaved, write_json  # noqa: E402
from curvkit.linalg import Woodbury  # noqa: E402
from curvkit.table import format_table  # noqa: E402

LAMBDA = 1e-3


def resnet_case(N: int):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    return "resnet18", model, x, y, lambda: model(x), y


def gpt_case(layers: int, width: int, vocab: int, rank: int, N: int = 8, T: int = 128):
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64),
                                  vocab_size=vocab, n_positions=T, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0, fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (N, T), generator=g)
    name = f"GPT-2 {layers}×{width}, V={vocab} + LoRA r={rank}"
    return name, model, {"input_ids": ids}, ids, lambda: model(input_ids=ids).logits, ids


def measure_case(case, rounds: int, progress: bool = True) -> dict:
    name, model, batch, targets, logits_fn, labels = case
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        out = logits_fn()
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss().backward()

    fwd_bwd()
    grad = [p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    state = {}

    def build(check=True):
        gen = torch.Generator().manual_seed(0)
        F = curvkit.fisher(model, batch, targets, kind="mc", structure="full", generator=gen,
                           check=check)
        state["F"] = F.factorize(LAMBDA)
        return state["F"]

    def solve():
        return state["F"].solve(grad, LAMBDA)

    build()
    solve()  # warm-up
    contenders = {"fwd+bwd": fwd_bwd, "build": build, "build_nocheck": lambda: build(False),
                  "solve": solve}
    # interleaved Timer rounds (benchmarks/_common.py): one warm-up + one timed call each
    times = interleaved(contenders, rounds, min_run_time=0.0, progress=(lambda r: print(
        f"  {name}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)) if progress else None)
    names = list(contenders)
    base = times["fwd+bwd"]
    ratios = {k: [t / b for t, b in zip(times[k], base)] for k in names if k != "fwd+bwd"}
    # the first solve on a fresh build also forms the layers' cached explicit float64 columns
    # (linalg.outer.OuterProductFactor.explicit64): timed once per fresh build, beside a fwd+bwd
    first = []
    for _ in range(3):
        build()
        t_fb = interleaved({"fwd+bwd": fwd_bwd}, 1, min_run_time=0.0)["fwd+bwd"][0]
        t0 = time.perf_counter()
        solve()
        first.append((time.perf_counter() - t0) / t_fb)
    ratios["first_solve"] = first
    F = state["F"]
    x = solve()
    # true residual ‖(F + λI)x − g‖/‖g‖ in float64 (F from the captured factors widened to
    # float64, in layer space), beside the float32 limit: the float64 solution rounded to float32
    flat = lambda v: torch.cat([t.reshape(-1) for t in v]).double()[:, None]  # noqa: E731
    W64 = Woodbury(F.operator.factor.to64(), route="dual")
    g64 = F.to_layer_space(flat(grad))

    def residual(x64):
        return float((W64 @ x64 + LAMBDA * x64 - g64).norm() / g64.norm())

    res = residual(F.to_layer_space(flat(x)))
    limit = residual(W64.solve(g64, LAMBDA).float().double())
    return {
        "model": name, "P": sum(p.numel() for p in params), "columns": F.info.get("rank"),
        "fwd_bwd_ms": 1e3 * statistics.median(base),
        **{f"{k}_ratio_median": statistics.median(v) for k, v in ratios.items()},
        **{f"{k}_ratio_min": min(v) for k, v in ratios.items()},
        "solve_rel_residual": res, "solve_float32_limit": limit, "times_s": times,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resnet-n", type=int, default=32)
    ap.add_argument("--gpt-layers", type=int, default=2)
    ap.add_argument("--gpt-width", type=int, default=128)
    ap.add_argument("--gpt-vocab", type=int, default=2048)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke test)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "architectures.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.resnet_n = 2, 4
        args.gpt_layers, args.gpt_width, args.gpt_vocab, args.lora_rank = 1, 32, 64, 2
    cases = [resnet_case(args.resnet_n),
             gpt_case(args.gpt_layers, args.gpt_width, args.gpt_vocab, args.lora_rank,
                      T=16 if args.quick else 128)]
    results = [measure_case(c, args.rounds) for c in cases]
    rows = [[r["model"], r["P"], r["columns"], r["fwd_bwd_ms"], r["build_ratio_median"],
             r["build_ratio_min"], r["build_nocheck_ratio_median"], r["solve_ratio_median"],
             r["solve_ratio_min"], r["first_solve_ratio_median"], r["solve_rel_residual"],
             r["solve_float32_limit"]]
            for r in results]
    print(format_table(
        ["model", "P", "M", "fwd+bwd ms", "build ÷ fb (median)", "(min)",
         "build, check=False", "solve ÷ fb (median)", "(min)", "first solve ÷ fb",
         "solve rel. residual", "float32 limit"],
        rows, [None, "d", "d", ".1f", ".2f", ".2f", ".2f", ".3f", ".3f", ".3f", ".1e", ".1e"],
        style="markdown"))
    out = {"settings": {**vars(args), "lambda": LAMBDA, "torch": torch.__version__,
                        "platform": platform.platform(), "cpu_count": os.cpu_count()},
           "results": results}
    print(f"wrote {write_json(args.out, out, indent=1)}")


if __name__ == "__main__":
    main()
