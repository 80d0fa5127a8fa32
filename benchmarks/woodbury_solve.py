"""Benchmark: Woodbury solves on the subsampled MC Fisher vs one forward+backward, and CG at equal residual.

The paper's MLP 784-1000-1000-1000-10 without biases (P = 2.79M), random MNIST-shaped inputs
with random labels, kind ``"mc"`` (``F = (1/N) Σₙ g(ŷₙ) g(ŷₙ)ᵀ``, ``g = ∇θ(−log p(ŷₙ|xₙ,θ))``),
damping λ, float32. Per N it reports:

* **accuracy** on a random and on a *gradient* right-hand side (the mean cross-entropy gradient
  on the same batch): the true relative residual ``‖(F + λI)x − v‖/‖v‖`` computed in float64
  (``F`` from the captured float32 factors converted to float64), the float32 representation
  *limit* (the residual of the float64 solution rounded to float32), the float64 solve's
  residual, and the residual of the previous formula (float32-accumulated products, ``x = (v −
  U w)/λ`` with ``Uᵀv`` and ``Uw`` in float32) for comparison; over ``--seeds`` data seeds;
* **time ratios** to one plain forward+backward of the mean cross-entropy: ``build``
  (``curvkit.fisher`` + Gram + Cholesky; with and without the capture guard when
  ``curvkit.fisher`` has ``check=``), ``solve`` (one ``(F + λI)⁻¹ g``, factorisation in place),
  ``solve32`` (the previous float32 formula), ``matvec`` (one ``F @ v``);
* **CG at equal residual**: curvlinops' ``CGInverseLinearOperator`` on the same MC Fisher
  (its ``EFLinearOperator`` at curvkit's sampled labels) + λI for the gradient right-hand side,
  with the tolerance tightened (×0.1 per attempt) until its *true* residual reaches curvkit's,
  or until it stops improving (plateau: the residual CG reaches is reported); then timed
  against curvkit's solve.

Contenders are interleaved (``benchmarks/_common.interleaved``): in each of ``--rounds`` rounds
every contender is measured once with ``torch.utils.benchmark.Timer`` (``blocked_autorange``, at
least ``--min-time`` seconds of timed calls after its warm-up; a slow contender such as CG is one
timed call after one untimed), the order reversed every other round, so machine load cancels in
the per-round ratios; the median, minimum and maximum of the per-round ratios are reported.

Run: ``python benchmarks/woodbury_solve.py [--quick] [--ns 32 100 300] [--train-steps 0]
[--out results/woodbury_solve.json]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys

import torch
from torch import nn

import curvkit
from curvkit.linalg import Woodbury

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks._common
from benchmarks._common import interleaved, round_ratios  # noqa: E402


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def train(model: nn.Sequential, steps: int, d_in: int, seed: int) -> float:
    """``steps`` SGD steps (batch 100) on a synthetic teacher task; returns the last loss."""
    g = torch.Generator().manual_seed(10_000 + seed)
    teacher = mlp([d_in, 64, 10])
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
    x = torch.randn(4000, d_in, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (100,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return float(loss)


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def solve_float32_products(W: Woodbury, v: torch.Tensor, lam: float) -> torch.Tensor:
    """The previous dual-route formula: ``Uᵀv`` and ``U w`` accumulated in float32."""
    u = W.factor.rmatmat(v[:, None]).to(torch.float64)
    w = W._factorize(lam).solve(u).to(v.dtype)
    return ((v[:, None] - W.factor.matmat(w)) / lam)[:, 0]


class Residual:
    """True relative residual ``‖(F + λI)x − v‖/‖v‖`` in float64 (layer space = flat here)."""

    def __init__(self, W: Woodbury, lam: float) -> None:
        self.W64 = Woodbury(W.factor.to64(), route="dual")
        self.lam = lam

    def __call__(self, x: torch.Tensor, v: torch.Tensor) -> float:
        x64, v64 = x.to(torch.float64), v.to(torch.float64)
        return float((self.W64 @ x64 + self.lam * x64 - v64).norm() / v64.norm())

    def exact(self, v: torch.Tensor) -> torch.Tensor:
        return self.W64.solve(v.to(torch.float64), self.lam)


def accuracy(F, v: torch.Tensor, res: Residual, lam: float) -> dict:
    x64 = res.exact(v)
    return {"curvkit": res(F.solve(v, lam), v), "limit": res(x64.float(), v),
            "float64_solve": res(x64, v),
            "float32_products": res(solve_float32_products(F.operator, v, lam), v)}


def make_cg(model, x, sampled, params, lam):
    """curvlinops CG on the *same* MC Fisher + λI; returns ``run(v, tol, max_iter) -> (x, iters)``.

    The MC Fisher with sampled labels ``ŷ`` is the empirical Fisher at ``ŷ``, so curvlinops'
    ``EFLinearOperator`` on ``(x, ŷ)`` with curvkit's draws is the matrix curvkit solves with
    (checked against ``F @ v``); its own ``FisherMCLinearOperator`` would draw other labels.
    """
    from curvlinops import CGInverseLinearOperator, EFLinearOperator
    from curvlinops._torch_base import PyTorchLinearOperator

    class _Damped(PyTorchLinearOperator):
        SELF_ADJOINT = True

        def __init__(self, F, lam):
            shapes = [tuple(p.shape) for p in params]
            super().__init__(shapes, shapes)
            self.F, self.lam, self.calls = F, lam, 0

        def _matmat(self, X):
            self.calls += 1
            return [fx + self.lam * xx for fx, xx in zip(self.F._matmat(X), X)]

        @property
        def dtype(self):
            return params[0].dtype

        @property
        def device(self):
            return params[0].device

    Fc = EFLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, sampled)], check_deterministic=False)
    A = _Damped(Fc, lam)

    def run(v: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, int]:
        A.calls = 0
        Ainv = CGInverseLinearOperator(A, tolerance=tol, max_iter=max_iter, stop_updating_after=0.0,
                                       eps=1e-30)
        return Ainv @ v, A.calls

    run.A = A
    return run


def cg_to_residual(run, v, target: float, res: Residual, max_iter: int, log) -> dict:
    """Tighten CG's tolerance until its true residual ≤ ``target``, or report its plateau."""
    tol, tried, best = target, [], None
    for _ in range(6):
        sol, iters = run(v, tol, max_iter)
        r = res(sol, v)
        tried.append({"tolerance": tol, "iterations": iters, "residual": r})
        log(f"    CG tol {tol:.1e}: {iters} matvecs, true residual {r:.2e} (target {target:.2e})")
        if r <= target:
            best = tried[-1]
            break
        if best is not None and r > 0.9 * best["residual"]:  # no longer improving: plateau
            break
        if best is None or r < best["residual"]:
            best = tried[-1]
        if iters >= max_iter:
            break
        tol /= 10
    return {"reached": best["residual"] <= target, "target": target, **best, "attempts": tried}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small widths, N in {16, 32}")
    parser.add_argument("--ns", type=int, nargs="*", default=None)
    parser.add_argument("--widths", type=int, nargs="*", default=None, help="MLP widths (smoke tests)")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds of timed calls per contender and round (Timer.blocked_autorange)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="data seeds for the accuracy rows")
    parser.add_argument("--train-steps", type=int, default=0, help="SGD steps on a synthetic task first")
    parser.add_argument("--no-cg", action="store_true")
    parser.add_argument("--no-timing", action="store_true", help="accuracy rows only")
    parser.add_argument("--cg-max-iter", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/woodbury_solve.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    widths = args.widths or ([784, 100, 100, 10] if args.quick else [784, 1000, 1000, 1000, 10])
    ns = args.ns or ([16, 32] if args.quick else [32, 100, 300])
    model = mlp(widths)
    train_loss = train(model, args.train_steps, widths[0], 0) if args.train_steps else None
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    lam = args.damping
    has_check = "check" in inspect.signature(curvkit.fisher).parameters
    print(f"MLP {'-'.join(map(str, widths))} (no bias), P = {P:,}, kind='mc', λ = {lam:g}, float32, "
          f"{torch.get_num_threads()} threads, {args.train_steps} training steps"
          + (f" (loss {train_loss:.3f})" if train_loss is not None else ""), flush=True)
    rows: list[dict] = []
    result = {
        "benchmark": "woodbury_solve", "widths": widths, "damping": lam, "kind": "mc", "dtype": "float32",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "train_steps": args.train_steps,
        "train_loss": train_loss, "rounds": args.rounds, "min_time": args.min_time,
        "machine": platform.processor() or platform.machine(), "capture_guard": has_check, "rows": rows,
    }

    def save() -> None:  # after every N, so a long run keeps what it measured
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    for N in ns:
        row: dict = {"N": N, "P": P, "accuracy": []}
        for s in args.seeds:
            g_ = torch.Generator().manual_seed(s)
            x = torch.randn(N, widths[0], generator=g_)
            y = torch.randint(0, widths[-1], (N,), generator=g_)
            F = curvkit.fisher(model, x, kind="mc", generator=torch.Generator().manual_seed(1)).factorize(lam)
            res = Residual(F.operator, lam)
            acc = {"seed": s, "random": accuracy(F, torch.randn(P, generator=g_), res, lam),
                   "gradient": accuracy(F, gradient(model, x, y), res, lam)}
            row["accuracy"].append(acc)
            for rhs in ("random", "gradient"):
                a = acc[rhs]
                print(f"N={N:>4} seed {s} {rhs:>8}: residual {a['curvkit']:.2e}  limit {a['limit']:.2e}  "
                      f"(÷ {a['curvkit'] / a['limit']:.2f})  float64 {a['float64_solve']:.1e}  "
                      f"float32 products {a['float32_products']:.2e}", flush=True)
        if args.no_timing:
            rows.append(row)
            save()
            continue
        # timing on the first seed's batch
        g_ = torch.Generator().manual_seed(args.seeds[0])
        x = torch.randn(N, widths[0], generator=g_)
        y = torch.randint(0, widths[-1], (N,), generator=g_)
        gen = torch.Generator().manual_seed(1)
        F = curvkit.fisher(model, x, kind="mc", generator=gen).factorize(lam)
        res = Residual(F.operator, lam)
        v = gradient(model, x, y)
        vr = torch.randn(P, generator=g_)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

        fns = {"fwd_bwd": fwd_bwd,
               "build": lambda: curvkit.fisher(model, x, kind="mc", generator=gen).factorize(lam)}
        if has_check:
            fns["build_check_off"] = lambda: curvkit.fisher(model, x, kind="mc", generator=gen,
                                                            check=False).factorize(lam)
        fns.update({"solve": lambda: F.solve(v, lam),
                    "solve32": lambda: solve_float32_products(F.operator, v, lam),
                    "matvec": lambda: F @ vr})
        cg = None
        if not args.no_cg:
            try:
                run = make_cg(model, x, F.captured.sampled[0], params, lam)
            except ImportError:
                run = None
            if run is not None:
                Fv = torch.cat([t.reshape(-1) for t in run.A @ [t.reshape(p.shape) for t, p in zip(
                    vr.split([p.numel() for p in params]), params)]]) - lam * vr
                same = float((Fv - F @ vr).norm() / (F @ vr).norm())
                if same > 1e-4:
                    raise RuntimeError(f"CG's operator differs from curvkit's F (relative {same:.1e})")
                target = res(F.solve(v, lam), v)
                cg = cg_to_residual(run, v, target, res, args.cg_max_iter,
                                    lambda m: print(m, flush=True))
                fns["cg"] = lambda: run(v, cg["tolerance"], args.cg_max_iter)
        times = interleaved(fns, args.rounds, min_run_time=args.min_time)
        row["seconds"] = times
        row["ratios"] = {f"{k}/fwd_bwd": round_ratios(times[k], times["fwd_bwd"])
                         for k in fns if k != "fwd_bwd"}
        row["ratios"]["solve/solve32"] = round_ratios(times["solve"], times["solve32"])
        if has_check:
            row["ratios"]["build/build_check_off"] = round_ratios(times["build"], times["build_check_off"])
        if cg is not None:
            row["cg"] = cg
            row["ratios"]["cg/solve"] = round_ratios(times["cg"], times["solve"])
        rows.append(row)
        save()
        rt = row["ratios"]

        def fmt(k):
            return f"{rt[k]['median']:.2f} (min {rt[k]['min']:.2f})"

        guard = f" | build ÷ build(check=False) {fmt('build/build_check_off')}" if has_check else ""
        print(f"N={N:>4} fwd+bwd {statistics.median(times['fwd_bwd']) * 1e3:.1f} ms | "
              f"build {fmt('build/fwd_bwd')} | solve {fmt('solve/fwd_bwd')} | "
              f"matvec {fmt('matvec/fwd_bwd')} | "
              f"solve ÷ float32-products solve {fmt('solve/solve32')}{guard}", flush=True)
        if cg is not None:
            print(f"       CG: {cg['iterations']} matvecs, residual {cg['residual']:.2e} "
                  f"({'reached' if cg['reached'] else 'plateau; target'} {cg['target']:.2e}), "
                  f"CG ÷ solve {rt['cg/solve']['median']:.0f} (min {rt['cg/solve']['min']:.0f})", flush=True)
    if args.out:
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
