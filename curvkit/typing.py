"""Literal types of curvkit's string options, one place for type checkers and editors.

``mypy`` and ``pyright`` reject a misspelt option (``structure="block-diag"``) at check time;
at run time every function still validates its options and names the supported set.
Structures added with :func:`curvkit.register_structure` are plain ``str`` names; pass them
through ``typing.cast(Structure, name)`` to satisfy a type checker.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Kind", "Likelihood", "Structure", "DampingMode"]

#: Fisher kind: ``"exact"`` (expectation over the model's predictive), ``"mc"`` (sampled
#: labels), ``"empirical"`` (the data labels).
Kind = Literal["exact", "mc", "empirical"]

#: Likelihood of the outputs: softmax categorical, unit-variance Gaussian, independent Bernoulli.
Likelihood = Literal["classification", "regression", "binary"]

#: The built-in curvature structures.
Structure = Literal["full", "block_diag", "kfac", "foof", "diag"]

#: How damping enters a solve: ``"exact"`` adds ``λI`` to the matrix (``(F̃ + λI)⁻¹``);
#: ``"heuristic"`` damps each Kronecker factor separately (KFAC only).
DampingMode = Literal["exact", "heuristic"]
