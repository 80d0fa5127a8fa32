"""The factorised damped inverse of a Kronecker block ``B ⊗ A``, as the optimizers hold it.

Row-major vectorisation: the inverse acts on ``V ∈ R^{d_out×d_in}`` (module
:mod:`curvkit.linalg.kronecker` states both damping modes, Benzing 2022 eqs 2–4).

**One damped side** ``(S + λI)⁻¹`` (:func:`damped_side`) is held either as the explicit inverse
(``cholesky_inverse`` of one Cholesky factor, never a solve against the identity) or as the
lower Cholesky factor ``L`` itself (``S + λI = L Lᵀ``), applied by two triangular solves. The
cost rule (:func:`holds_factor`): forming the inverse costs one ``cholesky_inverse`` (about one
``n³`` pass) and then one GEMM per use; the factor costs two triangular solves per use, which
on CPU BLAS run 1.4–2.5× slower than that GEMM (measured at ``n = 1000``). So the factor is held
when the side is applied once (``uses == 1``: KFAC/FOOF with ``T = 1``) or when
``4·uses·k ≤ n`` (``k`` right-hand-side rows per use, e.g. a 10-class output layer's ``d_out``
against its ``A``); otherwise the inverse.

**The dtype rule.** ``S + λI`` is factorised in float32 only when the factor is float32, the
caller allows it (the optimizers), *and* the condition bound ``κ ≤ 1 + tr(S)/λ``
(``λ_max(S) ≤ tr S`` for PSD ``S``) is at most :data:`FLOAT32_MAX_COND` (``10³``: float32
round-off then costs at most ``~κ·ε₃₂ ≈ 10⁻⁴`` relative); otherwise, and whenever float32
Cholesky fails, in float64 (:func:`~curvkit.linalg.damped_cholesky`, eigh fallback, which holds
the inverse). A held float64 Cholesky factor is applied in float64 (the right-hand side is cast
up and the result back), so the rule also holds for the solves.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvkit.linalg.cholesky import damped_cholesky
from curvkit.linalg.finite import all_finite
from curvkit.linalg.operator import SingularError

__all__ = ["FLOAT32_MAX_COND", "DAMPING_MODES", "KroneckerInverse", "damped_inverse",
           "damped_side", "factorisation_dtype", "holds_factor"]

#: Largest condition bound ``1 + tr(S)/λ`` at which a float32 ``S + λI`` is factorised in float32.
FLOAT32_MAX_COND = 1e3
#: The damping modes of a Kronecker block (see :mod:`curvkit.linalg.kronecker`).
DAMPING_MODES = ("exact", "heuristic")


def factorisation_dtype(S: Tensor, damping: float) -> torch.dtype:
    """The dtype ``S + λI`` is factorised in: float32 or float64.

    float32 iff ``S`` is float32 and ``1 + tr(S)/λ ≤`` :data:`FLOAT32_MAX_COND` (a bound on its
    condition number), else float64.
    """
    if S.dtype != torch.float32 or not damping > 0:
        return torch.float64
    tr = float(S.diagonal().sum())
    return torch.float32 if math.isfinite(tr) and 1.0 + max(tr, 0.0) / damping <= FLOAT32_MAX_COND \
        else torch.float64


def holds_factor(n: int, k: int, uses: int | None) -> bool:
    """Whether an ``n × n`` damped side applied ``uses`` times to ``k`` rows keeps its Cholesky factor.

    The module doc's cost rule: ``uses == 1`` or ``4·uses·k ≤ n``; ``uses=None`` (unknown, e.g.
    curvature solves) always forms the inverse.
    """
    return uses is not None and (uses == 1 or 4 * uses * k <= n)


def damped_side(S: Tensor, damping: float, *, k: int = 0, uses: int | None = None,
                name: str = "factor", dtype: torch.dtype | None = None,
                allow_float32: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """``(S + λI)⁻¹`` of a symmetric PSD ``S``, as ``(inverse, None)`` or ``(None, L)``.

    ``L`` is the lower Cholesky factor of ``S + λI`` in its factorisation dtype, chosen by
    :func:`holds_factor`; the dtype by the module doc's rule. Cholesky reads the lower triangle
    of ``S`` only.

    Args:
        S: ``(n, n)`` symmetric PSD factor.
        damping: ``λ > 0``.
        k: rows of the right-hand side per use.
        uses: how often the result will be applied (``None``: unknown; the inverse is formed).
        name: the factor's name for warnings and errors.
        dtype: dtype of a returned inverse (default ``S.dtype``).
        allow_float32: apply the float32 rule (the optimizers; curvature solves stay float64).

    Returns:
        ``(inverse, None)`` or ``(None, L)``.

    Raises:
        SingularError: ``S + λI`` is singular.
    """
    out = S.dtype if dtype is None else dtype
    hold = holds_factor(S.shape[0], k, uses)
    if allow_float32 and all_finite(S):  # the optimizers: Cholesky of the lower triangle as is
        dts = [torch.float32, torch.float64] if factorisation_dtype(S, damping) == torch.float32 \
            else [torch.float64]
        for dt in dts:
            A = S.to(dt, copy=True)
            A.diagonal().add_(damping)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                return (None, L) if hold else (torch.cholesky_inverse(L).to(out), None)
    # curvature solves, and the fallbacks and errors of a failed Cholesky
    f = damped_cholesky(S, damping, name=name, symmetrize=not allow_float32)
    if hold and f.L is not None:
        return None, f.L
    return f.inverse().to(out), None


def damped_inverse(S: Tensor, damping: float, *, name: str = "factor",
                   dtype: torch.dtype | None = None, allow_float32: bool = False) -> Tensor:
    """``(S + λI)⁻¹`` for a symmetric PSD ``S``: ``cholesky_inverse`` of one Cholesky factor.

    In float64 (eigh fallback), or, with ``allow_float32``, in :func:`factorisation_dtype`
    (float32 when that is safe and succeeds; see the module doc).

    Args:
        S: ``(n, n)`` symmetric PSD factor.
        damping: ``λ > 0``.
        name: the factor's name for warnings and errors.
        dtype: dtype of the result (default ``S.dtype``).
        allow_float32: apply the float32 rule (the optimizers; curvature solves stay float64).

    Returns:
        The ``(n, n)`` inverse.

    Raises:
        SingularError: ``S + λI`` is singular.
    """
    inv, _ = damped_side(S, damping, name=name, dtype=dtype, allow_float32=allow_float32)
    if inv is None:  # uses=None always forms the inverse
        raise RuntimeError(f"{name}: no inverse formed")
    return inv


def _apply_right(V: Tensor, inv: Tensor | None, L: Tensor | None) -> Tensor:
    """``V (S + λI)⁻¹`` from the inverse (in ``V``'s dtype) or from ``L`` (in ``L``'s dtype)."""
    if inv is not None:
        return V @ inv.to(V)
    if L is None:
        raise ValueError("a damped side needs its inverse or its Cholesky factor")
    L = L.to(device=V.device)
    W = torch.linalg.solve_triangular(L.mT, V.to(L.dtype), upper=True, left=False)  # V L⁻ᵀ
    return torch.linalg.solve_triangular(L, W, upper=False, left=False).to(V.dtype)  # · L⁻¹


def _apply_left(V: Tensor, inv: Tensor | None, L: Tensor | None) -> Tensor:
    """``(S + λI)⁻¹ V = (Vᵀ (S + λI)⁻¹)ᵀ`` (symmetric ``S``)."""
    if inv is not None:
        return inv.to(V) @ V
    return _apply_right(V.mT, None, L).mT


class KroneckerInverse:
    """The factorised damped inverse of ``B ⊗ A``, applied as ``V ↦ inverse(vec_r V)``.

    In matrix form (see :mod:`curvkit.linalg.kronecker` for both damping modes).

    ``mode="heuristic"`` holds each damped side ``(A + λ_A I)⁻¹``, ``(B + λ_B I)⁻¹`` (``B``'s is
    absent for ``B = I``) as its inverse (``A_inv``, ``B_inv``) or its lower Cholesky factor
    (``A_chol``, ``B_chol``; module doc's cost rule), with the damping fixed; ``mode="exact"``
    holds the eigendecompositions ``s_A, U_A, s_B, U_B`` and takes ``λ`` at :meth:`solve_matrix`,
    except for ``B = I``, where it holds the damped side ``(A + λI)⁻¹`` (``λ`` fixed). Its
    :meth:`state_dict` is plain tensors and floats (``torch.load(weights_only=True)`` reads it).

    Attributes:
        mode: ``"heuristic"`` or ``"exact"``.
        damping: the damping ``λ`` it was factorised for.
        lambda_A, lambda_B: the π-rule split of ``λ`` (heuristic damping, also reported in exact
            mode).
    """

    _TENSORS = ("A_inv", "B_inv", "s_A", "U_A", "s_B", "U_B", "A_chol", "B_chol")

    def __init__(self, mode: str, damping: float, lambda_A: float, lambda_B: float,
                 **tensors: Tensor | None) -> None:
        if mode not in DAMPING_MODES:
            raise ValueError(f"unknown damping_mode {mode!r}; valid: {list(DAMPING_MODES)}")
        self.mode, self.damping = mode, float(damping)
        self.lambda_A, self.lambda_B = float(lambda_A), float(lambda_B)
        self.tensors = {k: tensors.get(k) for k in self._TENSORS}

    @property
    def fixed_damping(self) -> bool:
        """Whether the damping was fixed at factorisation time."""
        return self.tensors["A_inv"] is not None or self.tensors["A_chol"] is not None

    def _held(self, key: str) -> Tensor:
        """The held tensor ``key`` (one of :attr:`_TENSORS` present in this mode)."""
        if (t := self.tensors[key]) is None:
            raise ValueError(f"this {self.mode} KroneckerInverse holds no {key}")
        return t

    def solve_matrix(self, V: Tensor, damping: float | None = None) -> Tensor:
        """The damped inverse applied to ``V`` of shape ``(..., d_out, d_in)``.

        Computed in ``V``'s dtype and device (held tensors are cast to them; a held Cholesky
        factor is applied in its own dtype, see the module doc).

        Args:
            V: the matrices.
            damping: ``λ`` for the eigendecomposition form (default: the factorisation's); must
                equal it when the damping was fixed.

        Returns:
            Tensor shaped like ``V``.
        """
        lam = self.damping if damping is None else float(damping)
        t = self.tensors
        if self.fixed_damping:
            if lam != self.damping:
                raise ValueError(f"this inverse was factorised for damping {self.damping}, not {lam}; "
                                 "factorize again")
            out = self.solve_input(V)
            if t["B_inv"] is None and t["B_chol"] is None:
                return out
            return _apply_left(out, t["B_inv"], t["B_chol"])
        UA, UB = self._held("U_A").to(V), self._held("U_B").to(V)
        denom = self._held("s_B").to(V)[:, None] * self._held("s_A").to(V)[None, :] + lam
        if (denom <= 0).any():
            raise SingularError(f"B ⊗ A + {lam}·I is singular; pass damping > 0")
        return UB @ ((UB.T @ V @ UA) / denom) @ UA.T

    def solve_input(self, V: Tensor) -> Tensor:
        """``V (A + λ_A I)⁻¹`` (heuristic; ``V (A + λI)⁻¹`` for exact mode with ``B = I``).

        In exact mode with a ``B``: ``V`` times :meth:`input_inverse`.
        """
        t = self.tensors
        if t["A_inv"] is None and t["A_chol"] is None:
            return V @ self.input_inverse().to(V)
        return _apply_right(V, t["A_inv"], t["A_chol"])

    def input_inverse(self) -> Tensor:
        """``(A + λ_A I)⁻¹`` with the π-rule ``λ_A`` (App. D.9: KFAC without its second factor)."""
        t = self.tensors
        if self.mode == "heuristic":
            if t["A_inv"] is None and t["A_chol"] is not None:
                return torch.cholesky_inverse(t["A_chol"])
            return self._held("A_inv")
        if t["U_A"] is None:
            raise ValueError("input_inverse needs the eigendecomposition or the heuristic mode")
        UA = self._held("U_A")
        return (UA / (self._held("s_A") + self.lambda_A)) @ UA.T

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
           ) -> KroneckerInverse:
        """A copy with the tensors cast (``None``: unchanged)."""
        cast = {k: None if v is None else v.to(dtype=dtype or v.dtype, device=device or v.device)
                for k, v in self.tensors.items()}
        return KroneckerInverse(self.mode, self.damping, self.lambda_A, self.lambda_B, **cast)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and a bool (no strings: ``torch.optim`` loading iterates them)."""
        return {"heuristic": self.mode == "heuristic", "damping": self.damping,
                "lambda_A": self.lambda_A, "lambda_B": self.lambda_B, **self.tensors}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> KroneckerInverse:
        """Inverse of :meth:`state_dict` (no computation; absent tensors are ``None``)."""
        return cls("heuristic" if state["heuristic"] else "exact", state["damping"],
                   state["lambda_A"], state["lambda_B"], **{k: state.get(k) for k in cls._TENSORS})
