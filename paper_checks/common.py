"""Setups, methods and starting grids shared by several checks (identical specs hit the run cache).

Grids start around the paper's Table 1 values mapped to curvkit's units (see
:mod:`paper_checks.harness`) with **independent** learning-rate and damping axes, and are widened
automatically wherever the selected point lands on an edge (:mod:`paper_checks.grids`). Only the
natural gradient's minibatch grids keep App. D.3's ``α = η/λ`` (its widening then runs along α).
"""

from __future__ import annotations

from paper_checks.grids import Grid
from paper_checks.harness import BATCH, Harness
from paper_checks.runs import Method, Setup
from paper_checks.variants import STANDARD

#: Hidden widths of the minibatch MLPs (the paper: 1000 ×3 on 784 inputs; 64 keeps the full run
#: with 3 seeds per candidate and automatic widening within the time budget of 2 shared cores).
WIDTH = (64, 64, 64)
#: App. K: minibatches that fill FOOF's/KFAC's factor EMAs before training (the paper: 50).
INIT_BATCHES = 50


def minibatch(h: Harness) -> Setup:
    """MNIST-1D generated with 20 000 training points, batch 100 (the Fig 1A/3A/4B analogue; the
    4000-point set saturates: KFAC drove it to ~1e-5 within 2000 updates)."""
    return Setup(data=h.pick("mnist1d-20k", "mnist1d-20k", "mnist1d"), n_train=None, hidden=WIDTH,
                 batch_size=BATCH,
                 steps=h.pick(400, 200, 20), eval_every=h.pick(50, 50, 10),
                 budgets=h.pick((100, 200), (50, 100), (10,)), init_batches=h.pick(INIT_BATCHES, 10, 2))


def fullbatch(h: Harness, n_full: int, n_quick: int, hidden: tuple[int, ...] = WIDTH,
              data: str = "mnist1d") -> Setup:
    """A fixed random subset, full batch, 100 updates (the Fig 1D/2A/2C analogue)."""
    return Setup(data=data, n_train=h.pick(n_full, n_quick, min(n_quick, 32)), hidden=hidden,
                 batch_size=None, steps=h.pick(100, 40, 5), eval_every=h.pick(5, 5, 1),
                 budgets=h.pick((10, 30), (10,), (2,)), init_batches=1)


# ------------------------------------------------------------------------------------ methods
SGD = Method.make("SGD+M", "sgd", momentum=0.9)
ADAM = Method.make("Adam", "adam")
KFAC = Method.make("KFAC (EMA 0.95)", "kfac", ema_decay=0.95, inv_period=1)
KFAC_SUB = Method.make("KFAC subsampled (EMA 0)", "kfac", ema_decay=0.0, inv_period=1)
KFAC_STD = Method.make("KFAC standard damping (correct)", "kfac", ema_decay=0.95, inv_period=1,
                       damping_mode=STANDARD)
KFAC_STD_PUB = Method.make("KFAC standard damping (public code)", "kfac", ema_decay=0.95, inv_period=1,
                           damping_mode=STANDARD, standard_impl="public")
FOOF1 = Method.make("FOOF T=1", "foof", ema_decay=0.95, inv_period=1)
NAT = Method.make("Nat. grad. MC (N_F=100)", "natural", kind="mc", structure="full",
                  fisher_batch="independent", fisher_size=100)
NAT_BD = Method.make("Block-diag. Nat. MC (N_F=100)", "natural", kind="mc", structure="block_diag",
                     fisher_batch="independent", fisher_size=100)


def grid_sgd(h: Harness) -> Grid:
    """SGD+M (momentum 0.9); Table 1: 0.01."""
    return Grid(h.pick((0.01, 0.03, 0.1, 0.3), (0.03, 0.1), (0.1,)))


def grid_adam(h: Harness) -> Grid:
    """Adam; Table 1: 1e-4."""
    return Grid(h.pick((1e-3, 3e-3, 1e-2), (1e-3, 3e-3), (3e-3,)))


def grid_kfac(h: Harness) -> Grid:
    """KFAC, heuristic damping; Table 1 (0.3, 1) → (3e-3, 1e-2)."""
    return Grid(h.pick((1e-3, 3e-3, 1e-2), (3e-3, 1e-2), (3e-3,)),
                h.pick((1e-6, 1e-4, 1e-2), (1e-4, 1e-2), (1e-2,)))


def grid_kfac_std(h: Harness) -> Grid:
    """KFAC, standard damping, independent η and λ (Table 1 (0.1, 1) → (1e-3, 1e-2)); reaches
    α = η/λ = 10 at λ = 1e-4 (η = 1e-3) up to α = 100 (η = 1e-2)."""
    return Grid(h.pick((1e-3, 3e-3, 1e-2), (3e-3, 1e-2), (1e-2,)),
                h.pick((1e-4, 1e-2, 1.0), (1e-4, 1e-2), (1e-2,)))


def grid_foof(h: Harness) -> Grid:
    """FOOF; Table 1 (30, 100) → (0.3, 1)."""
    return Grid(h.pick((0.3, 1.0, 3.0), (1.0, 3.0), (1.0,)), h.pick((1e-2, 1.0, 1e2), (1.0,), (1.0,)))


def grid_nat(h: Harness) -> Grid:
    """Natural gradient (minibatch) as α = η/λ (App. D.3) and λ; Table 1 Fig 1A (1e-5, 1e-4) → α = 0.1."""
    return Grid(h.pick((0.1, 0.3, 1.0), (0.3, 1.0), (0.3,)),
                h.pick((1e-4, 1e-2, 1.0), (1.0,), (1.0,)), ratio=True)


# ------------------------------------------------------------------ full-batch controls (1D/2A/2C)
#: Subset sizes of the full-batch MLP controls (the paper: 1000 images). The exact Full Fisher of
#: N inputs has 10·N columns: a 480 × 480 Cholesky per update at N = 48 keeps the independent η × λ
#: grids (with widening) of four natural-gradient variants within the budget.
SUBSET_FULL, SUBSET_QUICK = 48, 32

KFAC_FB = Method.make("KFAC (EMA 0)", "kfac", ema_decay=0.0, inv_period=1)
GD_M = Method.make("GD+M", "sgd", momentum=0.9)
GD = Method.make("GD", "sgd", momentum=0.0)
NAT_MC_FB = Method.make("Nat. grad. MC", "natural", kind="mc", structure="full")
NAT_FULL_FB = Method.make("Nat. grad. Full Fisher", "natural", kind="exact", structure="full")
BD_MC_FB = Method.make("Block-diag. Nat. MC", "natural", kind="mc", structure="block_diag")
BD_FULL_FB = Method.make("Block-diag. Nat. Full Fisher", "natural", kind="exact", structure="block_diag")


def grid_kfac_fb(h: Harness) -> Grid:
    """KFAC full batch: Table 1 has (0.1, 1e-4) for Fig 1D/2C → (1e-3, 1e-6) in curvkit units."""
    return Grid(h.pick((1e-4, 1e-3, 1e-2), (1e-3, 1e-2), (1e-3,)),
                h.pick((1e-8, 1e-6, 1e-4), (1e-6, 1e-4), (1e-4,)))


def grid_gd(h: Harness) -> Grid:
    return Grid(h.pick((0.1, 0.3, 1.0, 3.0), (0.3, 1.0), (0.3,)))


def grid_nat_fb(h: Harness) -> Grid:
    """Natural gradient, full batch (MC or Full Fisher): independent η and λ, so that damped
    Newton (η ≈ 1, small λ) is inside the grid next to the GD-like large-λ regime."""
    return Grid(h.pick((0.3, 1.0, 3.0), (0.3, 1.0), (1.0,)),
                h.pick((1e-4, 1e-2, 1.0), (1e-4, 1.0), (1.0,)))
