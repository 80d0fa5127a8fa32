"""Setups, methods and grids shared by several checks (identical specs hit the run cache).

Grids are small and centred on the paper's Table 1 values mapped to curvkit's units (see
:mod:`paper_checks.harness`): KFAC (0.3, 1) → (3e-3, 1e-2); FOOF (30, 100) → (0.3, 1); natural
gradient as ``α = η/λ`` around Table 1's ``lr/damp = 0.1``; SGD+M around 0.01–0.03; Adam around
1e-4–1e-3. They were widened where a pilot run on MNIST-1D put the optimum on the edge;
selected points still on an edge are flagged in the report.
"""

from __future__ import annotations

from paper_checks.harness import BATCH, Grid, Harness, Method, Setup

#: Hidden widths of the MLP of the minibatch checks (the paper: 1000 ×3 on 784 inputs).
WIDTH = (128, 128, 128)


def minibatch(h: Harness) -> Setup:
    """MNIST-1D, full 4000-point training set, batch 100 (the Fig 1A/3A/4B analogue)."""
    return Setup(data="mnist1d", n_train=None, hidden=WIDTH, batch_size=BATCH,
                 steps=h.pick(2000, 300, 30), eval_every=h.pick(100, 50, 10))


def fullbatch(h: Harness, n_full: int, n_quick: int, hidden: tuple[int, ...] = WIDTH,
              data: str = "mnist1d") -> Setup:
    """A fixed random subset, full batch, 100 updates (the Fig 1D/2A/2C analogue)."""
    return Setup(data=data, n_train=h.pick(n_full, n_quick, min(n_quick, 64)), hidden=hidden,
                 batch_size=None, steps=h.pick(100, 50, 5), eval_every=h.pick(5, 5, 1))


# ------------------------------------------------------------------------------------ methods
SGD = Method.make("SGD+M", "sgd", momentum=0.9)
ADAM = Method.make("Adam", "adam")
KFAC = Method.make("KFAC (EMA 0.95)", "kfac", ema_decay=0.95, inv_period=1)
KFAC_SUB = Method.make("KFAC subsampled (EMA 0)", "kfac", ema_decay=0.0, inv_period=1)
KFAC_STD = Method.make("KFAC standard damping", "kfac", ema_decay=0.95, inv_period=1,
                       damping_mode="standard")
FOOF1 = Method.make("FOOF T=1", "foof", ema_decay=0.95, inv_period=1)
NAT = Method.make("Nat. grad. MC (N_F=100)", "natural", kind="mc", structure="full",
                  fisher_batch="independent", fisher_size=100)
NAT_BD = Method.make("Block-diag. Nat. MC (N_F=100)", "natural", kind="mc", structure="block_diag",
                     fisher_batch="independent", fisher_size=100)


def grid_sgd(h: Harness) -> Grid:
    """SGD+M (momentum 0.9); Table 1: 0.01."""
    return Grid(h.pick((0.01, 0.03, 0.1), (0.03, 0.1), (0.1,)))


def grid_adam(h: Harness) -> Grid:
    """Adam; Table 1: 1e-4 (a pilot on MNIST-1D put the optimum at 3e-3)."""
    return Grid(h.pick((1e-3, 3e-3, 1e-2), (1e-3, 3e-3), (3e-3,)))


def grid_kfac(h: Harness) -> Grid:
    """KFAC, heuristic damping; Table 1 (0.3, 1) → (3e-3, 1e-2)."""
    return Grid(h.pick((1e-3, 3e-3, 1e-2, 3e-2), (3e-3, 1e-2), (3e-3,)),
                h.pick((1e-6, 1e-4, 1e-2), (1e-4, 1e-2), (1e-2,)))


def grid_foof(h: Harness) -> Grid:
    """FOOF; Table 1 (30, 100) → (0.3, 1)."""
    return Grid(h.pick((0.3, 1.0, 3.0, 10.0), (1.0, 3.0), (1.0,)), h.pick((1e-2, 1.0, 1e2), (1.0,), (1.0,)))


def grid_nat(h: Harness) -> Grid:
    """Natural gradient as α = η/λ; Table 1 Fig 1A (1e-5, 1e-4) → α = 0.1, λ = 1e-4."""
    return Grid(h.pick((0.1, 0.3, 1.0), (0.3, 1.0), (0.3,)),
                h.pick((1e-4, 1e-2, 1.0), (1.0,), (1.0,)), ratio=True)


# ------------------------------------------------------------------ full-batch controls (1D/2A/2C)
#: Subset sizes of the full-batch controls. The paper uses 1000 images; the exact Full Fisher of
#: N inputs has N·C = 10·N columns (a 10N × 10N Cholesky per update), so the MLP controls use a
#: smaller subset that keeps its grid search within the time budget.
SUBSET_FULL, SUBSET_QUICK = 128, 96

KFAC_FB = Method.make("KFAC (EMA 0)", "kfac", ema_decay=0.0, inv_period=1)
GD_M = Method.make("GD+M", "sgd", momentum=0.9)
GD = Method.make("GD", "sgd", momentum=0.0)
NAT_MC_FB = Method.make("Nat. grad. MC", "natural", kind="mc", structure="full")
NAT_FULL_FB = Method.make("Nat. grad. Full Fisher", "natural", kind="exact", structure="full")
BD_MC_FB = Method.make("Block-diag. Nat. MC", "natural", kind="mc", structure="block_diag")
BD_FULL_FB = Method.make("Block-diag. Nat. Full Fisher", "natural", kind="exact", structure="block_diag")


def grid_kfac_fb(h: Harness) -> Grid:
    """KFAC full batch: Table 1 has (0.1, 1e-4) for Fig 1D/2C → (1e-3, 1e-6) in curvkit units."""
    return Grid(h.pick((1e-4, 1e-3, 1e-2, 1e-1), (1e-3, 1e-2), (1e-3,)),
                h.pick((1e-8, 1e-6, 1e-4, 1e-2), (1e-6, 1e-4), (1e-4,)))


def grid_gd(h: Harness) -> Grid:
    return Grid(h.pick((0.03, 0.1, 0.3, 1.0), (0.1, 0.3), (0.1,)))


def grid_nat_fb(h: Harness) -> Grid:
    """Natural gradient, full batch (MC or Full Fisher): ``α = η/λ`` and ``λ`` (a pilot on a 256-point
    subset put the optimum at the largest α and λ of (0.1, 0.3, 1) × (1e-2, 1), i.e. GD-like)."""
    return Grid(h.pick((1.0, 3.0), (1.0, 3.0), (1.0,)), h.pick((1e-2, 1.0, 1e2), (1.0,), (1.0,)), ratio=True)
