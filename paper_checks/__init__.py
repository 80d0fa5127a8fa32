"""Checks of the claims of Benzing (2022), "Gradient Descent on Neurons and its Link to Approximate
Second-Order Optimization", on packaged data (MNIST-1D, scikit-learn digits) with curvkit.

One module per claim; each exposes ``NAME``, ``TITLE``, ``CLAIM``, ``PAPER``, ``REQUIRES`` (the
library API it needs, ``"module:attribute"``) and ``run(h: Harness) -> CheckResult``. Run them with
``python -m paper_checks [--quick] [--only NAME ...] [--seeds 3]``; see ``REPORT.md``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Check modules in the paper's order. Runs shared between checks are cached within one process
#: (e.g. ``fig2bc``, ``fig3a``, ``fig4b``, ``fig4c`` and ``figI6`` reuse runs of ``fig1ab``/``fig1d``),
#: so a check run alone with ``--only`` recomputes what it needs.
CHECKS: tuple[str, ...] = (
    "appF_toy",
    "fig1ab",
    "fig1c",
    "fig1d",
    "fig2a",
    "fig2bc",
    "fig3a",
    "fig3bcd",
    "fig4a",
    "fig4b",
    "fig4c",
    "figI6",
    "appG_laplace",
    "impl_diffs",
)


def load(name: str) -> ModuleType:
    """Import the check module ``paper_checks.<name>``."""
    if name not in CHECKS:
        raise ValueError(f"unknown check {name!r}; available: {', '.join(CHECKS)}")
    return importlib.import_module(f"paper_checks.{name}")


__all__ = ["CHECKS", "load"]
