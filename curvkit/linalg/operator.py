"""The one operator contract shared by every curvature structure.

A :class:`LinearOperator` represents a symmetric positive semi-definite matrix ``A`` of shape
``(P, P)``. Subclasses implement the smallest possible contract:

* ``_matmat(X)``: ``A @ X`` for ``X`` of shape ``(P, k)``;
* ``_solve(X, damping)``: ``(A + D)⁻¹ X`` (optional; default raises);
* ``_logdet(damping)``: ``log det(A + D)`` (optional; default from ``to_dense``);
* the Gaussian methods ``_sample``, ``_inverse_diagonal``, ``_inverse_quad_blocks`` and
  ``_eigenvalues`` (optional; defaults factorise ``to_dense() + D`` for small ``P``).

``damping`` is everywhere a number ``λ ≥ 0`` (``D = λ I``) or a ``(P,)`` tensor ``d ≥ 0``
(``D = diag(d)``, one value per parameter: the Laplace precision ``Λ = n F + diag(δ)`` of
Benzing 2022, App. C.1, is ``n F`` with a diagonal damping). A structure for which a per-parameter
damping is not exact raises :class:`DampingError` naming the structure and the alternative.

Everything else -- ``@`` on ``(P,)``, ``(P, k)`` or a list of tensors shaped like ``block_shapes``,
``solve``, ``inverse``, ``logdet``, ``sample``, ``inverse_diagonal``, ``inverse_quad_blocks``,
``eigenvalues``, ``logdet_function``, ``to_dense``, ``to_scipy``, ``+`` and scalar ``*`` -- is
derived here, with the input checks (shape, dtype, device, finiteness of right-hand sides,
damping sign and shape, memory) done once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import overload

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from curvkit.linalg.memory import check_memory
from curvkit.linalg.vectors import Vector, VectorFormats
from curvkit.typing import DampingMode

Damping = float | Tensor

#: largest operator factorised explicitly by the dense defaults of the Gaussian methods.
MAX_DENSE = 8192


class SingularError(ValueError):
    """Raised when ``A + damping·I`` is singular (e.g. damping 0 on a rank-deficient Fisher)."""


class DampingError(TypeError, ValueError):
    """A per-parameter damping that a structure cannot apply exactly (names the alternative)."""


def damping_str(damping: Damping) -> str:
    """``"λ·I"`` or ``"diag(d)"`` for messages."""
    return "diag(d)" if isinstance(damping, Tensor) else f"{damping}·I"


class LinearOperator(VectorFormats):
    """Symmetric PSD linear operator ``A`` of shape ``(P, P)`` acting on flat or list vectors.

    Args:
        size: ``P``.
        dtype: dtype of vectors the operator accepts and returns.
        device: device of those vectors.
        block_shapes: shapes of the tensors in the list format (e.g. the parameters); their
            numels must sum to ``P``. Vectors in list format are flattened row-major and
            concatenated in this order.
        name: the structure's name, used in error messages.
    """

    #: damping modes accepted by :meth:`solve`; structures extend this.
    damping_modes: tuple[str, ...] = ("exact",)

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block_shapes: Sequence[torch.Size] | None = None,
        name: str | None = None,
    ) -> None:
        self.shape = (int(size), int(size))
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_shapes = [torch.Size(s) for s in block_shapes] if block_shapes else None
        if self.block_shapes is not None:
            total = sum(math.prod(s) for s in self.block_shapes)
            if total != size:
                raise ValueError(f"block_shapes hold {total} entries but the operator is {size}×{size}")
        self.name = name or type(self).__name__

    # ------------------------------------------------------------------ contract for subclasses
    def _matmat(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def _solve(self, X: Tensor, damping: Damping, damping_mode: str) -> Tensor:
        raise NotImplementedError(
            f"{self.name} has no solve; use to_dense() and torch.linalg.solve, or a structure "
            "with a factorised inverse"
        )

    def _logdet(self, damping: Damping) -> Tensor:
        A = self.to_dense().to(torch.float64)
        A.diagonal().add_(damping.to(A.device) if isinstance(damping, Tensor) else damping)
        sign, logabs = torch.linalg.slogdet(A)
        if sign <= 0:
            raise SingularError(f"{self.name} + {damping_str(damping)} is singular or indefinite")
        return logabs

    def _dense_factor(self, damping: Damping):
        """``damped_cholesky(A + D)`` of the explicit matrix (``P ≤`` :data:`MAX_DENSE`)."""
        from curvkit.linalg.cholesky import damped_cholesky

        P = self.shape[0]
        if P > MAX_DENSE:
            raise NotImplementedError(
                f"{self.name} ({P} parameters) has no factorised form for this method and is too "
                f"large (> {MAX_DENSE}) to form explicitly; use structure='full', 'kfac', 'foof' "
                "or 'diag'")
        return damped_cholesky(self.to_dense(), damping, name=self.name)

    def _sample(self, k: int, damping: Damping, generator: torch.Generator | None) -> Tensor:
        Z = torch.randn(self.shape[0], k, dtype=torch.float64, device=self.device, generator=generator)
        return self._dense_factor(damping).inv_sqrt(Z).to(self.dtype)

    def _inverse_diagonal(self, damping: Damping) -> Tensor:
        return self._dense_factor(damping).inverse_diagonal()

    def _inverse_quad_blocks(self, J, R: int, damping: Damping) -> Tensor:
        from curvkit.linalg.lowrank import column_group_grams

        return column_group_grams(self._dense_factor(damping).half_solve(J.dense(torch.float64)), R)

    def _eigenvalues(self) -> Tensor:
        A = self.to_dense().to(torch.float64)
        return torch.linalg.eigvalsh(0.5 * (A + A.T)).clamp_min(0.0)

    def _logdet_function(self, group_sizes: list[int] | None) -> Callable[[Tensor], Tensor]:
        if group_sizes is not None and len(group_sizes) > 1:
            raise NotImplementedError(
                f"{self.name}: log det(A + diag(e^t_g)) for {len(group_sizes)} damping groups is not "
                "available for this structure; use one scalar damping")
        ev, P = self.eigenvalues(), self.shape[0]

        def fn(t: Tensor) -> Tensor:
            t = t.reshape(-1)[0] if t.dim() else t
            return P * t + torch.log1p(ev * torch.exp(-t)).sum()

        return fn

    def _scalar_damping(self, damping: Damping, what: str, alternative: str) -> float:
        """``damping`` as a float; a constant tensor is accepted, any other raises DampingError."""
        if not isinstance(damping, Tensor):
            return damping
        if bool((damping == damping[0]).all()):
            return float(damping[0])
        raise DampingError(
            f"{self.name}: {what} with a per-parameter damping (values in "
            f"[{float(damping.min()):.4g}, {float(damping.max()):.4g}]) is not exact for this "
            f"structure; {alternative}")

    #: True when the operator is known to be rank-deficient (damping 0 then has no inverse).
    def _is_singular(self) -> bool:
        return False

    # ------------------------------------------------------------------ public API
    @overload
    def __matmul__(self, v: Tensor) -> Tensor: ...
    @overload
    def __matmul__(self, v: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]: ...
    @overload
    def __matmul__(self, v: LinearOperator) -> LinearOperator: ...

    def __matmul__(self, v: Vector | LinearOperator) -> Vector | LinearOperator:
        if isinstance(v, LinearOperator):
            from curvkit.linalg.compose import _Product

            return _Product(self, v)
        if isinstance(v, (list, tuple)):
            out = self._matmat_list(v)
            if out is not None:
                return out
        X, fmt = self._to_matrix(v)
        return self._from_matrix(self._matmat(X), fmt)

    # list-format fast paths: an operator whose internal layout differs from the flat vector
    # (a Curvature in layer space) may take a list straight to its layout; None = the flat route
    def _matmat_list(self, v: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor] | None:
        return None

    def _solve_list(self, v: list[Tensor] | tuple[Tensor, ...], damping: Damping,
                    damping_mode: str) -> list[Tensor] | None:
        return None

    @overload
    def matvec(self, v: Tensor) -> Tensor: ...
    @overload
    def matvec(self, v: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]: ...

    def matvec(self, v: Vector) -> Vector:
        """``A @ v`` (alias of ``@``): a tensor for a tensor, a list for a list or tuple."""
        return self @ v

    def _check_damping(self, damping: Damping) -> Damping:
        P = self.shape[0]
        if isinstance(damping, Tensor) and damping.numel() != 1:
            if damping.dim() != 1 or damping.shape[0] != P or not damping.is_floating_point():
                raise DampingError(
                    f"damping has shape {tuple(damping.shape)} ({damping.dtype}); {self.name} accepts "
                    f"a number or a float tensor of shape ({P},) (one value per parameter)")
            d = damping.detach().to(device=self.device, dtype=torch.float64)
            if not bool(torch.isfinite(d).all()):
                raise ValueError("damping has NaN or Inf entries; pass finite values ≥ 0")
            if bool((d < 0).any()):
                raise ValueError(f"damping must be ≥ 0, got a minimum of {float(d.min()):.4g}")
            if bool((d == 0).all()):
                return self._check_damping(0.0)
            return d
        if isinstance(damping, Tensor):
            damping = float(damping)
        if not isinstance(damping, (int, float)) or not math.isfinite(damping):
            raise ValueError(f"damping must be a finite number, got {damping!r}")
        if damping < 0:
            raise ValueError(f"damping must be ≥ 0, got {damping}")
        if damping == 0 and self._is_singular():
            raise SingularError(
                f"{self.name} is rank-deficient (rank ≤ {self._rank_bound()} < P = "
                f"{self.shape[0]}), so damping = 0 leaves A + 0·I singular; pass damping > 0"
            )
        return float(damping)

    def _rank_bound(self) -> int:
        return self.shape[0]

    def _check_mode(self, damping_mode: str) -> None:
        if damping_mode not in self.damping_modes:
            raise ValueError(f"damping_mode={damping_mode!r} is not available for {self.name}; it "
                             f"supports {list(self.damping_modes)}")

    @overload
    def solve(self, v: Tensor, damping: Damping = ..., damping_mode: DampingMode = ...) -> Tensor: ...
    @overload
    def solve(self, v: list[Tensor] | tuple[Tensor, ...], damping: Damping = ...,
              damping_mode: DampingMode = ...) -> list[Tensor]: ...

    def solve(self, v: Vector, damping: Damping = 0.0, damping_mode: DampingMode = "exact") -> Vector:
        """``(A + D)⁻¹ v`` for ``v`` in any vector format; same format back.

        Args:
            v: ``(P,)``, ``(P, k)`` or a list of tensors shaped like ``block_shapes``.
            damping: ``λ ≥ 0`` (``D = λ I``) or a ``(P,)`` tensor (``D = diag(d)``); must be > 0
                where ``A`` is singular.
            damping_mode: ``"exact"`` (always) or a structure-specific mode (KFAC: ``"heuristic"``).

        Returns:
            ``(A + D)⁻¹ v`` in the format of ``v``.

        Raises:
            ValueError: ``v`` has the wrong shape or NaN/Inf entries; bad damping or mode.
            TypeError: ``v`` has the wrong dtype.
            DampingError: a per-parameter damping this structure cannot apply exactly.
            SingularError: ``A + D`` is singular.
        """
        self._check_mode(damping_mode)
        damping = self._check_damping(damping)
        if isinstance(v, (list, tuple)):
            out = self._solve_list(v, damping, damping_mode)
            if out is not None:
                return out
        X, fmt = self._to_matrix(v)
        self._check_rhs(X)
        return self._from_matrix(self._solve(X, damping, damping_mode), fmt)

    def sample(self, k: int, damping: Damping = 0.0,
               generator: torch.Generator | None = None) -> Tensor:
        """``k`` exact draws from ``N(0, (A + D)⁻¹)`` as a ``(P, k)`` tensor (operator dtype).

        Args:
            k: number of draws (≥ 1).
            damping: see :meth:`solve`.
            generator: the only source of randomness.

        Returns:
            ``(P, k)`` samples.

        Raises:
            ValueError: ``k`` is not a positive int; bad damping.
            MemoryError: the samples would not fit (GB stated).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        damping = self._check_damping(damping)
        item = torch.finfo(self.dtype).bits // 8
        check_memory(int(k) * self.shape[0] * item, f"{k} samples of {self.shape[0]} parameters",
                     self.device)
        return self._sample(int(k), damping, generator)

    def inverse_diagonal(self, damping: Damping = 0.0) -> Tensor:
        """``diag((A + D)⁻¹)`` as a float64 ``(P,)`` tensor (e.g. Laplace marginal variances).

        Args:
            damping: see :meth:`solve`.

        Returns:
            The ``(P,)`` diagonal.
        """
        return self._inverse_diagonal(self._check_damping(damping))

    def inverse_quad_blocks(self, J, R: int, damping: Damping = 0.0) -> Tensor:
        """Diagonal ``R × R`` blocks of ``Jᵀ (A + D)⁻¹ J`` (float64, ``(M/R, R, R)``).

        ``J`` (``P × M``) holds ``M/R`` consecutive groups of ``R`` columns, e.g. the ``C`` output
        Jacobian columns of each test input: the blocks are the GLM functional covariances
        ``J(x) Λ⁻¹ J(x)ᵀ`` (Immer et al. 2021; Benzing 2022, App. C.1).

        Args:
            J: a :class:`~curvkit.linalg.LowRankFactor` or an explicit ``(P, M)`` tensor.
            R: the group size (must divide ``M``).
            damping: see :meth:`solve`.

        Returns:
            ``(M/R, R, R)`` float64.

        Raises:
            ValueError: ``J`` has the wrong number of rows or ``R`` does not divide ``M``.
        """
        from curvkit.linalg.lowrank import DenseFactor

        if isinstance(J, Tensor):
            J = DenseFactor(J)
        if J.size != self.shape[0]:
            raise ValueError(f"J has {J.size} rows but {self.name} is {self.shape[0]}×{self.shape[0]}")
        if R < 1 or J.rank % R:
            raise ValueError(f"R = {R} must divide the number of columns M = {J.rank}")
        return self._inverse_quad_blocks(J, R, self._check_damping(damping))

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``A`` (float64, ≥ 0): at most ``P`` of them; missing ones are 0.

        One decomposition serves ``log det(A + δ I) = (P − n) log δ + Σ_i log(λ_i + δ)`` for every
        scalar ``δ`` (``n`` = the number returned). Cached.

        Returns:
            The ``(n,)`` eigenvalues, ``n ≤ P``.
        """
        if getattr(self, "_eigenvalue_cache", None) is None:
            self._eigenvalue_cache = self._eigenvalues()
        return self._eigenvalue_cache

    def logdet_function(self, group_sizes: Sequence[int] | None = None) -> Callable[[Tensor], Tensor]:
        """``t ↦ log det(A + diag(e^{t_g} on group g))``, differentiable in ``t``.

        Args:
            group_sizes: consecutive groups of the ``P`` entries sharing one damping (e.g. layers);
                ``None``: one scalar ``t`` (from :meth:`eigenvalues`, one decomposition for all).

        Returns:
            The function of a float64 tensor ``t`` (scalar, or one entry per group).

        Raises:
            NotImplementedError: several groups on a structure without a per-group form.
        """
        sizes = None if group_sizes is None else [int(g) for g in group_sizes]
        if sizes is not None and sum(sizes) != self.shape[0]:
            raise ValueError(f"group sizes sum to {sum(sizes)}, expected {self.shape[0]}")
        return self._logdet_function(sizes)

    def inverse(self, damping: Damping = 0.0, damping_mode: DampingMode = "exact") -> LinearOperator:
        """The operator ``(A + D)⁻¹`` (applied through :meth:`solve`)."""
        self._check_mode(damping_mode)
        from curvkit.linalg.compose import InverseOperator

        return InverseOperator(self, self._check_damping(damping), damping_mode)

    def factorize(self, damping: Damping = 0.0, damping_mode: DampingMode = "exact") -> LinearOperator:
        """Precompute what ``solve(·, damping, damping_mode)`` needs (else done at the first solve).

        Returns ``self``, so ``F.factorize(λ).solve(v, λ)`` chains.
        """
        self._check_mode(damping_mode)
        damping = self._check_damping(damping)
        if not isinstance(damping, Tensor):
            self._prepare(damping, damping_mode)
        return self

    def _prepare(self, damping: float, damping_mode: str) -> None:
        """Hook for :meth:`factorize`; structures with a cached factorisation override it."""

    def logdet(self, damping: Damping = 0.0) -> Tensor:
        """``log det(A + D)`` as a float64 scalar tensor (``damping`` as for :meth:`solve`)."""
        return self._logdet(self._check_damping(damping))

    def _check_dense_memory(self, copies: int = 1) -> None:
        P = self.shape[0]
        check_memory(copies * P * P * torch.finfo(self.dtype).bits // 8, f"{self.name}.to_dense()",
                     self.device)

    def to_dense(self) -> Tensor:
        """The explicit ``(P, P)`` matrix (only for small ``P``; memory checked, GB stated)."""
        P = self.shape[0]
        self._check_dense_memory(2)
        eye = torch.eye(P, dtype=self.dtype, device=self.device)
        return self._matmat(eye)

    def diagonal(self) -> Tensor:
        """``diag(A)``; default from ``to_dense`` (structures override when cheaper)."""
        return self.to_dense().diagonal().clone()

    def to_scipy(self) -> spla.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy float64 in and out).

        The products are computed in the operator's own dtype, reported as the attribute
        ``compute_dtype`` of the result (and its ``eps``): for a float32 operator an iterative
        solver cannot reach a true residual much below ``~1e-7·‖A‖‖x‖`` whatever its ``rtol``;
        build the curvature in float64 (``model.double()``) to solve to float64 accuracy.

        Returns:
            The scipy operator, with ``compute_dtype`` (``torch.dtype``) and ``eps`` (float).
        """

        def mm(x: np.ndarray) -> np.ndarray:
            X = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            X = X.reshape(self.shape[0], -1)
            return self._matmat(X).detach().cpu().to(torch.float64).numpy()

        op = spla.LinearOperator(
            self.shape, matvec=lambda x: mm(x).ravel(), matmat=mm, rmatvec=lambda x: mm(x).ravel(),
            dtype=np.float64,
        )
        op.compute_dtype = self.dtype
        op.eps = float(torch.finfo(self.dtype).eps)
        return op

    def __add__(self, other: LinearOperator) -> LinearOperator:
        from curvkit.linalg.compose import _Sum

        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum(self, other)

    def __mul__(self, c: float) -> LinearOperator:
        from curvkit.linalg.compose import _Scaled

        return _Scaled(self, float(c))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{self.name}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
