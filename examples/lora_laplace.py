"""Full-covariance Laplace on the LoRA adapters of a GPT-2-config model, against laplace-torch.

Task (generated in code, nothing downloaded): sequences of ``--seq`` tokens from a random sparse
Markov chain over ``--vocab`` tokens (each token has ``--branch`` likely successors, so the next
token is genuinely uncertain); the model is a causal language model: **every position predicts
the next token** (logits ``(N, T, V)``, ``T = seq − 1`` loss terms per sequence). The model is
Hugging Face GPT-2 built from a config with random weights (``--layers`` × ``--width``), frozen;
peft LoRA adapters (rank ``--rank`` on ``c_attn``, ``c_proj``, ``c_fc``) are trained briefly with
Adam on the mean next-token cross-entropy, then made Bayesian:

* **curvkit full**: ``Λ = δI + n·F`` with ``F`` the MC Fisher over **every token** (one label
  sampled per position, ``F = (1/(N·T)) Σ_n g_n gₙᵀ`` with ``g_n = Σ_t ∇ℓ_{nt}(ŷ_{nt})``, one
  Woodbury column per sequence) and ``n`` the number of training tokens, never formed as
  ``P × P`` (Woodbury / determinant lemma, Benzing 2022 App. C.1); the prior precision ``δ``
  maximises the Laplace evidence; predictive: ``--samples`` exact posterior draws of the adapters
  (the network's softmax averaged, per position; the per-position GLM predictive needs ``T·V``
  Jacobian rows per sequence, too slow at this size on a CPU);
* **curvkit kfac / diag** on the same Fisher batch, same prior selection;
* **laplace-torch** ``KronLaplace`` and ``DiagLaplace`` (GGN, ``subset_of_weights="all"`` with only
  the adapters requiring grad), same prior selection, the same sampled predictive. laplace-torch
  takes ``(N, C)`` outputs, so it gets the same logits flattened to ``(N·T, V)``: every token one
  row (the same likelihood, the same ``n``). Its ``DiagLaplace`` builds the GGN diagonal from
  ``torch.func.jacrev`` of a batch's ``b·T·V`` logits, each a backward pass through all ``b``
  sequences (cost ``∝ b²``: 4 s for 16 sequences at ``b = 1``, 16 s at ``b = 4``), so it is fed
  one sequence per batch. (Passing every prefix
  ``x_{≤t}`` as a separate input with the last position's logits gives the same diagonal, to
  2e-7, at 8× the time: 33 s against 4 s for 16 sequences; ``KronLaplace`` on ``(N·T, V)`` is the
  "expand" KFAC over each sequence's positions.) ``FullLaplace`` (``P × P``) runs with
  ``--laplace-torch-full`` (and ``--quick``) when it fits ``--full-max-gb``.

The frozen base is initialised with std ``--init-range`` 0.3 (GPT-2's 0.02 leaves the tied output
embedding so small that the adapters cannot make confident predictions: the MAP stalls near
NLL 2.7). Reported per method on held-out sequences (every token): NLL, ECE (15 equal-width bins),
accuracy, wall time (fit + prior selection + test predictive), and the peak resident memory above
the start of the method (sampled every 5 ms). The default size (600 training / 200 test
sequences, P = 8192) takes about 4 minutes on one CPU thread, most of it laplace-torch's
``DiagLaplace``. ``--large`` (GPT-2 2×256, LoRA rank 48: P = 393,216) runs curvkit only and
prints what laplace-torch's ``FullLaplace`` would need (P²·8 bytes = 1237 GB). The full rows are the
weak ones here, and not only curvkit's: at P = 1024 (``--layers 1 --width 32 --vocab 8 --seq 8
--rank 2 --train 200 --test 100 --steps 300 --batch 32 --laplace-torch-full``) laplace-torch's
exact-GGN ``FullLaplace`` gives NLL 1.78 (δ 5.2) against the MAP's 1.26, curvkit full with
``--mc-samples 8`` (1600 columns > P) 1.82 (δ 4.9), with one label per position (200 columns)
2.08 (δ 2.8): the evidence of a rank-``M`` Fisher picks ``δ`` from ``M`` directions, and the
other ``P − M`` keep the prior variance ``1/δ`` in the sampled predictive. At ``P ≫ n``
(``--large``) the posterior is mostly prior, and every sampled predictive is near uniform.
``--quick`` runs a tiny configuration in seconds (used by the smoke test).

Run: ``python examples/lora_laplace.py [--quick | --large] [--no-progress] [--threads 1]``.
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
    """``num`` sequences of a random sparse Markov chain: ``(input_ids, next tokens)``, both
    ``(num, seq − 1)``."""
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
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class Tokens(nn.Module):
    """``input_ids -> logits (N, T, V)`` of a causal LM: every position is a loss term."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


class FlatTokens(nn.Module):
    """``input_ids -> logits (N·T, V)``: every token one row, the ``(N, C)`` layout laplace-torch
    takes (the same logits and likelihood as :class:`Tokens`)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids).logits
        return logits.reshape(-1, logits.shape[-1])


class TokenLoader:
    """Batches ``(x[i:i+b], y[i:i+b].reshape(-1))`` of ``b`` sequences; ``len(dataset)`` is the
    number of tokens (laplace-torch's ``N``, as ``len(y)`` of a batch counts tokens)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.dataset = range(y.numel())

    def __iter__(self):
        for i in range(0, self.x.shape[0], self.batch):
            yield self.x[i:i + self.batch], self.y[i:i + self.batch].reshape(-1)

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch)


def build_model(layers: int, width: int, vocab: int, seq: int, rank: int,
                init_range: float) -> nn.Module:
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 32),
                                  vocab_size=vocab, n_positions=seq, bos_token_id=0,
                                  eos_token_id=0, initializer_range=init_range,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"  # laplace-torch's full GGN uses forward AD (no SDPA rule)
    torch.manual_seed(0)
    lm = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0, fan_in_fan_out=True))
    return lm


# ---------------------------------------------------------------------------- metrics
def nll_ece_acc(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> tuple[float, float, float]:
    """Per-token NLL, ECE and accuracy of probabilities ``(…, V)`` for labels ``(…)``."""
    probs = probs.double().clamp_min(1e-12).reshape(-1, probs.shape[-1])
    y = y.reshape(-1)
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
def curvkit_posterior(lm, x_fit, y_fit, x_te, num_data, structure, generator, samples,
                      mc_samples):
    """curvkit on the per-position logits: MC Fisher over every token of ``x_fit``."""
    from curvkit.laplace import LaplacePosterior

    post = LaplacePosterior(Tokens(lm), x_fit, y_fit, kind="mc", structure=structure,
                            num_data=num_data, generator=generator, prior_precision=1.0,
                            mc_samples=mc_samples)
    terms = post.curvature.info["num_loss_terms"]
    if terms != y_fit.numel():  # every token a loss term
        raise RuntimeError(f"the Fisher has {terms} loss terms, expected every token ({y_fit.numel()})")
    post.optimize_prior_precision()
    probs = post.predictive(x_te, pred_type="nn", n_samples=samples,
                            generator=torch.Generator().manual_seed(2))
    delta = post.prior_precision
    return probs, float(delta.reshape(-1)[0]) if torch.is_tensor(delta) else float(delta)


def laplace_torch_posterior(lm, x_fit, y_fit, x_te, structure, batch, samples):
    """laplace-torch on the flattened per-token logits, GGN, marglik prior, sampled predictive.

    ``DiagLaplace`` gets one sequence per batch: its GGN diagonal comes from ``torch.func.jacrev``
    of the whole batch's ``(b·T, V)`` logits, ``b·T·V`` backward passes each through all ``b``
    sequences, so its cost grows as ``b²`` (one sequence: the least work, the same diagonal).
    """
    from laplace import Laplace

    la = Laplace(FlatTokens(lm), "classification", subset_of_weights="all",
                 hessian_structure=structure)
    la.fit(TokenLoader(x_fit, y_fit, 1 if structure == "diag" else batch), progress_bar=False)
    la.optimize_prior_precision(method="marglik")
    probs = torch.empty(*x_te.shape, lm.config.vocab_size)
    torch.manual_seed(2)
    with torch.no_grad():
        for i in range(0, x_te.shape[0], batch):
            xb = x_te[i:i + batch]
            probs[i:i + batch] = la(xb, pred_type="nn", link_approx="mc",
                                    n_samples=samples).reshape(*xb.shape, -1)
    return probs, float(la.prior_precision.reshape(-1)[0])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--branch", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--train", type=int, default=600, help="training sequences")
    ap.add_argument("--fit", type=int, default=0,
                    help="training sequences the posteriors are fitted on (0: all)")
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--init-range", type=float, default=0.3,
                    help="std of the frozen random base weights (GPT-2's 0.02 leaves the tied "
                         "output embedding so small that the adapters cannot fit the chain)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32, help="posterior samples of the predictive")
    ap.add_argument("--mc-samples", type=int, default=1,
                    help="curvkit: sampled labels per position (full: N·S Woodbury columns)")
    ap.add_argument("--full-max-gb", type=float, default=2.0)
    ap.add_argument("--laplace-torch-full", action="store_true",
                    help="also run laplace-torch FullLaplace (P × P from P GGN products: slow)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--large", action="store_true",
                    help="curvkit only, GPT-2 2×256 with LoRA rank 48: P = 393,216 adapters")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.large:
        args.width, args.rank = 256, 48
    if args.quick:
        args.layers, args.width, args.vocab, args.seq, args.rank = 1, 16, 8, 6, 2
        args.train, args.test, args.steps, args.batch, args.samples = 64, 32, 10, 16, 8
        args.laplace_torch_full = True
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(0)
    x_tr, y_tr = markov_data(args.train, args.seq, args.vocab, args.branch, g)
    x_te, y_te = markov_data(args.test, args.seq, args.vocab, args.branch, g)
    lm = build_model(args.layers, args.width, args.vocab, args.seq, args.rank, args.init_range)
    model = Tokens(lm)
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    opt = torch.optim.Adam(params, lr=args.lr)
    bar = tqdm(range(args.steps), desc="train LoRA", disable=args.no_progress, file=sys.stderr)
    for _ in bar:
        idx = torch.randint(0, args.train, (args.batch,), generator=g)
        logits = model(x_tr[idx])
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), y_tr[idx].reshape(-1))
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
        probs = torch.softmax(model(x_te), -1)
        rows.append(dict(method="MAP (no Laplace)", seconds=time.perf_counter() - t0, peak_gb=0.0,
                         prior=None, metrics=nll_ece_acc(probs, y_te)))
    S, MC = args.samples, args.mc_samples
    n_tokens = y_fit.numel()  # n: every fitted token is a loss term (as laplace-torch's N)
    methods = [("curvkit full (Woodbury, MC)", lambda: curvkit_posterior(
                   lm, x_fit, y_fit, x_te, n_tokens, "full", torch.Generator().manual_seed(1), S, MC)),
               ("curvkit kfac (MC)", lambda: curvkit_posterior(
                   lm, x_fit, y_fit, x_te, n_tokens, "kfac", torch.Generator().manual_seed(1), S, MC)),
               ("curvkit diag (MC)", lambda: curvkit_posterior(
                   lm, x_fit, y_fit, x_te, n_tokens, "diag", torch.Generator().manual_seed(1), S, MC))]
    try:
        if args.large:
            raise ImportError  # curvkit only
        import laplace  # noqa: F401

        methods += [("laplace-torch kron (GGN)", lambda: laplace_torch_posterior(
                        lm, x_fit, y_fit, x_te, "kron", args.batch, S)),
                    ("laplace-torch diag (GGN)", lambda: laplace_torch_posterior(
                        lm, x_fit, y_fit, x_te, "diag", args.batch, S))]
        full_gb = 8 * P * P / 1e9
        if full_gb <= args.full_max_gb and args.laplace_torch_full:
            methods.append(("laplace-torch full (GGN)", lambda: laplace_torch_posterior(
                lm, x_fit, y_fit, x_te, "full", args.batch, S)))
    except ImportError:
        full_gb = None
    full_gb = 8 * P * P / 1e9  # one P × P float64 matrix
    for name, run in tqdm(methods, desc="posteriors", disable=args.no_progress, file=sys.stderr):
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            probs, prior = run()
            secs = time.perf_counter() - t0
        rows.append(dict(method=name, seconds=secs, peak_gb=mem.gb, prior=prior,
                         metrics=nll_ece_acc(probs.detach(), y_te)))
        if not args.no_progress:  # each row as soon as it exists (the table comes at the end)
            print(f"{name}: NLL/ECE/acc {rows[-1]['metrics']}, {secs:.1f} s, {mem.gb:.3f} GB",
                  file=sys.stderr, flush=True)
    print(f"GPT-2 {args.layers}×{args.width}, vocab {args.vocab}, LoRA rank {args.rank}: "
          f"P = {P} adapter parameters; {args.train} training / {n_fit} posterior-fit / "
          f"{args.test} test sequences of {args.seq} tokens ({args.seq - 1} next-token loss terms "
          f"each: {n_tokens} fitted tokens, every one a loss term of every method; curvkit: MC "
          f"Fisher, laplace-torch: exact GGN, each token one row of its (N·T, V) logits)")
    print(format_table(["method", "test NLL", "ECE", "accuracy", "time s", "peak GB", "prior δ"],
                       [[r["method"], *r["metrics"][:2], r["metrics"][2], r["seconds"],
                         r["peak_gb"], r["prior"]] for r in rows],
                       [None, ".4f", ".4f", ".3f", ".2f", ".3f", ".3g"]))
    ran_full = any(r["method"] == "laplace-torch full (GGN)" for r in rows)
    if not ran_full:
        why = ("--large runs curvkit only" if args.large else "pass --laplace-torch-full"
               if full_gb <= args.full_max_gb else f"over --full-max-gb {args.full_max_gb:g}")
        print(f"laplace-torch FullLaplace not run ({why}): its P × P posterior precision alone "
              f"would need P²·8 bytes = {full_gb:.3g} GB (float64; half in float32) at P = {P}; "
              f"curvkit's full posterior above never forms it (Woodbury, {n_fit * MC} columns).")
    return rows


if __name__ == "__main__":
    main()
