"""Benchmark: Woodbury solves on the subsampled MC Fisher vs one forward+backward (and CG).

The paper's MLP 784-1000-1000-1000-10 without biases (P = 2.79M), random MNIST-shaped inputs,
kind ``"mc"`` (``F = (1/N) Σₙ g(ŷₙ) g(ŷₙ)ᵀ``), damping λ. For each N it measures, in one run:

* ``fwd+bwd``: one plain forward + backward of the mean cross-entropy (the unit);
* ``build``: ``curvkit.fisher(...)`` (forward + sampled-label backward) + Gram + Cholesky;
* ``solve``: one ``(F + λI)⁻¹ v`` with the factorisation in place;
* ``matvec``: one ``F @ v``;
* when curvlinops is installed: its ``CGInverseLinearOperator`` on its ``FisherMCLinearOperator``
  plus λI, run to the relative residual curvkit reached (capped at ``--cg-max-iter``).

Prints ratios to ``fwd+bwd`` and writes JSON. Run:
``python benchmarks/woodbury_solve.py [--quick] [--out results/woodbury_solve.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

import curvkit


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


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cg_solve(model, x, params, v, lam, rtol, max_iter):
    """curvlinops CG on its MC Fisher + λI; returns (seconds, iterations, relative residual)."""
    from curvlinops import CGInverseLinearOperator, FisherMCLinearOperator
    from curvlinops._torch_base import PyTorchLinearOperator

    class _Damped(PyTorchLinearOperator):
        SELF_ADJOINT = True

        def __init__(self, F, lam):
            shapes = [tuple(p.shape) for p in params]
            super().__init__(shapes, shapes)
            self.F, self.lam = F, lam
            self.calls = 0

        def _matmat(self, X):
            self.calls += 1
            FX = self.F._matmat(X)
            return [fx + self.lam * xx for fx, xx in zip(FX, X)]

        @property
        def dtype(self):
            return params[0].dtype

        @property
        def device(self):
            return params[0].device

    y = torch.zeros(x.shape[0], dtype=torch.long)  # labels are resampled by the MC Fisher
    F = FisherMCLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    A = _Damped(F, lam)
    A @ v  # warm-up (first data pass)
    A.calls = 0
    Ainv = CGInverseLinearOperator(A, tolerance=rtol, max_iter=max_iter,
                                   stop_updating_after=0.0, eps=1e-30)
    t0 = time.perf_counter()
    sol = Ainv @ v
    secs = time.perf_counter() - t0
    iters = A.calls
    res = float((A @ sol - v).norm() / v.norm())
    return secs, iters, res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small widths, N in {16, 32}")
    parser.add_argument("--ns", type=int, nargs="*", default=None)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cg", action="store_true")
    parser.add_argument("--cg-max-iter", type=int, default=1000)
    parser.add_argument("--out", default="results/woodbury_solve.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    widths = [784, 100, 100, 10] if args.quick else [784, 1000, 1000, 1000, 10]
    ns = args.ns or ([16, 32] if args.quick else [32, 100, 300])
    model = mlp(widths)
    params = [p for p in model.parameters()]
    P = sum(p.numel() for p in params)
    lam = args.damping
    rows = []
    print(f"MLP {'-'.join(map(str, widths))} (no bias), P = {P:,}, kind='mc', λ = {lam:g}, "
          f"float32, {torch.get_num_threads()} threads")
    hdr = (f"{'N':>5} {'fwd+bwd ms':>11} {'build ×':>8} {'solve ×':>8} {'matvec ×':>9} "
           f"{'residual':>9} {'CG ×':>9} {'CG iters':>9} {'CG resid':>9} {'CG ÷ solve':>11}")
    print(hdr)
    for N in ns:
        x = torch.randn(N, 784)
        y = torch.randint(0, 10, (N,))

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

        t_fb = timeit(fwd_bwd, args.repeats)
        gen = torch.Generator().manual_seed(1)

        def build():
            return curvkit.fisher(model, x, kind="mc", generator=gen).factorize(lam)

        t_build = timeit(build, max(1, args.repeats // 2))
        F = build()
        v = torch.randn(P)
        t_solve = timeit(lambda: F.solve(v, lam), args.repeats)
        t_mv = timeit(lambda: F @ v, args.repeats)
        sol = F.solve(v, lam)
        resid = float(((F @ sol) + lam * sol - v).norm() / v.norm())
        row = {"N": N, "P": P, "fwd_bwd_s": t_fb, "build_s": t_build, "solve_s": t_solve,
               "matvec_s": t_mv, "build_ratio": t_build / t_fb, "solve_ratio": t_solve / t_fb,
               "matvec_ratio": t_mv / t_fb, "residual": resid}
        cg_txt = f"{'n/a':>9} {'':>9} {'':>9} {'':>11}"
        if not args.no_cg:
            try:
                secs, iters, cres = cg_solve(model, x, params, v, lam, resid, args.cg_max_iter)
                row.update({"cg_s": secs, "cg_iters": iters, "cg_residual": cres,
                            "cg_ratio": secs / t_fb, "cg_over_solve": secs / t_solve})
                cg_txt = f"{secs / t_fb:>9.1f} {iters:>9d} {cres:>9.1e} {secs / t_solve:>11.0f}"
            except ImportError:
                row["cg_s"] = None
        rows.append(row)
        print(f"{N:>5} {t_fb * 1e3:>11.1f} {t_build / t_fb:>8.2f} {t_solve / t_fb:>8.2f} "
              f"{t_mv / t_fb:>9.2f} {resid:>9.1e} {cg_txt}")
    result = {
        "benchmark": "woodbury_solve", "widths": widths, "damping": lam, "kind": "mc",
        "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "rows": rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
