"""Full-covariance Laplace on the LoRA adapters of a GPT-2-config model, against laplace-torch.

Task (generated in code, nothing downloaded): sequences of ``--seq`` tokens from a random sparse
Markov chain over ``--vocab`` tokens (each token has ``--branch`` likely successors, so the next
token is genuinely uncertain); the model predicts the **last token from its prefix** (logits of
the last position, ``(N, V)``). The model is Hugging Face GPT-2 built from a config with random
weights (``--layers`` × ``--width``), frozen; peft LoRA adapters (rank ``--rank`` on ``c_attn``,
``c_proj``, ``c_fc``) are trained briefly with Adam, then made Bayesian:

* **curvkit full**: ``Λ = δI + n·F`` with ``F`` the MC Fisher (one sampled label per predicted
  token, ``F = (1/N) Σ_n g(ŷ_n) g(ŷ_n)ᵀ``) of the ``n`` training sequences (``--fit``; default
  all), never formed as ``P × P`` (Woodbury / determinant lemma, Benzing 2022 App. C.1); the prior
  precision ``δ`` maximises the Laplace evidence; predictive: linearised (GLM) with the probit
  approximation;
* **curvkit kfac / diag** on the same Fisher batch, same prior selection;
* **laplace-torch** ``KronLaplace`` and ``DiagLaplace`` (GGN, ``subset_of_weights="all"`` with only
  the adapters requiring grad), fitted on the same sequences, ``optimize_prior_precision
  (method="marglik")``, GLM probit predictive. laplace-torch's ``FullLaplace`` would store a
  ``P × P`` matrix; its size is printed instead of running it when it exceeds ``--full-max-gb``.

Reported per method on held-out sequences: NLL, ECE (15 equal-width bins), accuracy, wall time
(fit + prior selection), and the peak resident memory above the start of the method (sampled
every 5 ms). ``--quick`` runs a tiny configuration in seconds (used by the smoke test).

Run: ``python examples/lora_laplace.py [--quick] [--no-progress]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curvkit.table import format_table  # noqa: E402


# ---------------------------------------------------------------------------- data and model
def markov_data(num: int, seq: int, vocab: int, branch: int, g: torch.Generator):
    """``num`` sequences of a random sparse Markov chain: ``(input_ids (num, seq−1), last)``."""
    logits = torch.full((vocab, vocab), -1e9)
    gt = torch.Generator().manual_seed(1234)  # the chain itself is fixed
    for v in range(vocab):
        nxt = torch.randperm(vocab, generator=gt)[:branch]
        logits[v, nxt] = torch.randn(branch, generator=gt)
    P = torch.softmax(logits, 1)
    x = torch.empty(num, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (num,), generator=g)
    for t in range(1, seq):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g)[:, 0]
    return x[:, :-1].contiguous(), x[:, -1].contiguous()


class LastToken(nn.Module):
    """``input_ids -> logits of the last position (N, V)`` of a causal LM."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits[:, -1]


def build_model(layers: int, width: int, vocab: int, seq: int, rank: int) -> LastToken:
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 32),
                                  vocab_size=vocab, n_positions=seq, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"  # laplace-torch's full GGN uses forward AD (no SDPA rule)
    torch.manual_seed(0)
    lm = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0, fan_in_fan_out=True))
    return LastToken(lm)


# ---------------------------------------------------------------------------- metrics
def nll_ece_acc(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> tuple[float, float, float]:
    probs = probs.double().clamp_min(1e-12)
    nll = float(-probs.log().gather(1, y[:, None]).mean())
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean() * (conf[m].mean() - correct[m].mean()).abs())
    return nll, ece, float(correct.mean())


class PeakMemory:
    """Peak resident set size above the value at entry, sampled every 5 ms (psutil)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.gb = (self.peak - self.start) / 1e9


# ---------------------------------------------------------------------------- methods
def curvkit_posterior(model, x_fit, y_fit, x_test, num_data, structure, generator):
    from curvkit.laplace import LaplacePosterior

    post = LaplacePosterior(model, x_fit, y_fit, kind="mc", structure=structure,
                            num_data=num_data, generator=generator, prior_precision=1.0)
    post.optimize_prior_precision()
    probs = post.predictive(x_test, pred_type="glm", link_approx="probit")
    delta = post.prior_precision
    return probs, float(delta.reshape(-1)[0]) if torch.is_tensor(delta) else float(delta)


def laplace_torch_posterior(model, x_fit, y_fit, x_test, structure, batch):
    from laplace import Laplace

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_fit, y_fit),
                                         batch_size=batch)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader, progress_bar=False)
    la.optimize_prior_precision(method="marglik")
    with torch.no_grad():
        probs = la(x_test, pred_type="glm", link_approx="probit")
    return probs, float(la.prior_precision.reshape(-1)[0])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--branch", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--train", type=int, default=2000, help="training sequences")
    ap.add_argument("--fit", type=int, default=0,
                    help="training sequences the posteriors are fitted on (0: all)")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-max-gb", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.vocab, args.seq, args.rank = 1, 16, 8, 6, 2
        args.train, args.test, args.steps, args.batch = 64, 32, 10, 16
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(0)
    x_tr, y_tr = markov_data(args.train, args.seq, args.vocab, args.branch, g)
    x_te, y_te = markov_data(args.test, args.seq, args.vocab, args.branch, g)
    model = build_model(args.layers, args.width, args.vocab, args.seq, args.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    opt = torch.optim.Adam(params, lr=args.lr)
    bar = tqdm(range(args.steps), desc="train LoRA", disable=args.no_progress, file=sys.stderr)
    for _ in bar:
        idx = torch.randint(0, args.train, (args.batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    n_fit = args.fit or args.train
    x_fit, y_fit = x_tr[:n_fit], y_tr[:n_fit]
    rows = []
    with torch.no_grad():
        t0 = time.perf_counter()
        probs = torch.softmax(model(x_te), 1)
        rows.append(dict(method="MAP (no Laplace)", seconds=time.perf_counter() - t0, peak_gb=0.0,
                         prior=None, metrics=nll_ece_acc(probs, y_te)))
    methods = [("curvkit full (Woodbury, MC)", lambda: curvkit_posterior(
                   model, x_fit, y_fit, x_te, n_fit, "full",
                   torch.Generator().manual_seed(1))),
               ("curvkit kfac (MC)", lambda: curvkit_posterior(
                   model, x_fit, y_fit, x_te, n_fit, "kfac",
                   torch.Generator().manual_seed(1))),
               ("curvkit diag (MC)", lambda: curvkit_posterior(
                   model, x_fit, y_fit, x_te, n_fit, "diag",
                   torch.Generator().manual_seed(1)))]
    try:
        import laplace  # noqa: F401

        methods += [("laplace-torch kron (GGN)", lambda: laplace_torch_posterior(
                        model, x_fit, y_fit, x_te, "kron", args.batch)),
                    ("laplace-torch diag (GGN)", lambda: laplace_torch_posterior(
                        model, x_fit, y_fit, x_te, "diag", args.batch))]
        full_gb = 8 * P * P / 1e9
        if full_gb <= args.full_max_gb:
            methods.append(("laplace-torch full (GGN)", lambda: laplace_torch_posterior(
                model, x_fit, y_fit, x_te, "full", args.batch)))
    except ImportError:
        full_gb = None
    for name, run in tqdm(methods, desc="posteriors", disable=args.no_progress, file=sys.stderr):
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            probs, prior = run()
            secs = time.perf_counter() - t0
        rows.append(dict(method=name, seconds=secs, peak_gb=mem.gb, prior=prior,
                         metrics=nll_ece_acc(probs.detach(), y_te)))
    print(f"GPT-2 {args.layers}×{args.width}, vocab {args.vocab}, LoRA rank {args.rank}: "
          f"P = {P} adapter parameters; {args.train} training / {n_fit} posterior-fit / "
          f"{args.test} test sequences of {args.seq} tokens")
    print(format_table(["method", "test NLL", "ECE", "accuracy", "time s", "peak GB", "prior δ"],
                       [[r["method"], *r["metrics"][:2], r["metrics"][2], r["seconds"],
                         r["peak_gb"], r["prior"]] for r in rows],
                       [None, ".4f", ".4f", ".3f", ".2f", ".3f", ".3g"]))
    if full_gb is not None and full_gb > args.full_max_gb:
        print(f"laplace-torch FullLaplace not run: its P × P posterior precision needs "
              f"{full_gb:.1f} GB (float64) at P = {P}; curvkit's full posterior above never forms it.")
    return rows


if __name__ == "__main__":
    main()
