"""The one operator contract shared by every curvature structure.

A :class:`LinearOperator` represents a symmetric positive semi-definite matrix ``A`` of shape
``(P, P)``. Subclasses implement the smallest possible contract:

* ``_matmat(X)``: ``A @ X`` for ``X`` of shape ``(P, k)``;
* ``_solve(X, damping)``: ``(A + damping·I)⁻¹ X`` (optional; default raises);
* ``_logdet(damping)``: ``log det(A + damping·I)`` (optional; default from ``to_dense``).

Everything else -- ``@`` on ``(P,)``, ``(P, k)`` or a list of tensors shaped like ``block_shapes``,
``solve``, ``inverse``, ``logdet``, ``to_dense``, ``to_scipy``, ``+`` and scalar ``*`` -- is
derived here, with the input checks (shape, dtype, device, finiteness, damping sign) done once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from curvkit.typing import DampingMode

Vector = Tensor | list[Tensor] | tuple[Tensor, ...]


class SingularError(ValueError):
    """Raised when ``A + damping·I`` is singular (e.g. damping 0 on a rank-deficient Fisher)."""


class LinearOperator:
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

    def _solve(self, X: Tensor, damping: float, damping_mode: str) -> Tensor:
        raise NotImplementedError(
            f"{self.name} has no solve; use to_dense() and torch.linalg.solve, or a structure "
            "with a factorised inverse"
        )

    def _logdet(self, damping: float) -> Tensor:
        A = self.to_dense().to(torch.float64)
        A = A + damping * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        sign, logabs = torch.linalg.slogdet(A)
        if sign <= 0:
            raise SingularError(f"{self.name} + {damping}·I is singular or indefinite")
        return logabs

    #: True when the operator is known to be rank-deficient (damping 0 then has no inverse).
    def _is_singular(self) -> bool:
        return False

    # ------------------------------------------------------------------ vector formats
    def _to_matrix(self, v: Vector, what: str = "v") -> tuple[Tensor, str]:
        """Convert ``v`` to a ``(P, k)`` tensor; return it with a tag describing the format."""
        P = self.shape[0]
        if isinstance(v, (list, tuple)):
            if self.block_shapes is None:
                raise TypeError(f"{self.name} has no block shapes; pass a flat tensor of shape ({P},)")
            if len(v) != len(self.block_shapes):
                raise ValueError(
                    f"{what} has {len(v)} tensors but {self.name} expects {len(self.block_shapes)} "
                    f"shaped {[tuple(s) for s in self.block_shapes]}"
                )
            cols = []
            for i, (t, s) in enumerate(zip(v, self.block_shapes)):
                if not isinstance(t, Tensor):
                    raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected a torch.Tensor")
                if t.shape != s:
                    raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(s)}")
                self._check_tensor(t, f"{what}[{i}]")
                cols.append(t.reshape(-1))
            return torch.cat(cols).unsqueeze(1), "list"
        if not isinstance(v, Tensor):
            raise TypeError(f"{what} must be a Tensor or a list of Tensors, got {type(v).__name__}")
        self._check_tensor(v, what)
        if v.dim() == 1 and v.shape[0] == P:
            return v.unsqueeze(1), "vector"
        if v.dim() == 2 and v.shape[0] == P:
            return v, "matrix"
        raise ValueError(
            f"{what} has shape {tuple(v.shape)}; {self.name} of shape {self.shape} accepts ({P},), "
            f"({P}, k) or a list of tensors shaped like its parameters"
        )

    def _check_tensor(self, t: Tensor, what: str) -> None:
        if t.dtype != self.dtype:
            raise TypeError(f"{what} has dtype {t.dtype} but {self.name} works in {self.dtype}")
        if t.device.type != self.device.type or (
            self.device.index is not None and t.device.index not in (None, self.device.index)
        ):
            raise ValueError(f"{what} is on {t.device} but {self.name} lives on {self.device}")

    def _from_matrix(self, X: Tensor, fmt: str) -> Vector:
        if fmt == "vector":
            return X.squeeze(1)
        if fmt == "matrix":
            return X
        assert self.block_shapes is not None
        out, i = [], 0
        for s in self.block_shapes:
            n = math.prod(s)
            out.append(X[i : i + n, 0].reshape(s))
            i += n
        return out

    # ------------------------------------------------------------------ public API
    def __matmul__(self, v: Vector) -> Vector:
        if isinstance(v, LinearOperator):
            return _Product(self, v)
        X, fmt = self._to_matrix(v)
        return self._from_matrix(self._matmat(X), fmt)

    def matvec(self, v: Vector) -> Vector:
        """``A @ v`` (alias of ``@``)."""
        return self @ v

    def _check_damping(self, damping: float) -> float:
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

    def solve(self, v: Vector, damping: float = 0.0, damping_mode: DampingMode = "exact") -> Vector:
        """``(A + damping·I)⁻¹ v`` for ``v`` in any vector format; same format back.

        Args:
            v: ``(P,)``, ``(P, k)`` or a list of tensors shaped like ``block_shapes``.
            damping: ``λ ≥ 0`` added to the diagonal; must be > 0 if ``A`` is singular.
            damping_mode: ``"exact"`` (always) or a structure-specific mode (KFAC: ``"heuristic"``).
        """
        if damping_mode not in self.damping_modes:
            raise ValueError(
                f"damping_mode={damping_mode!r} is not available for {self.name}; it supports "
                f"{list(self.damping_modes)}"
            )
        damping = self._check_damping(damping)
        X, fmt = self._to_matrix(v)
        return self._from_matrix(self._solve(X, damping, damping_mode), fmt)

    def inverse(self, damping: float = 0.0, damping_mode: DampingMode = "exact") -> LinearOperator:
        """The operator ``(A + damping·I)⁻¹`` (applied through :meth:`solve`)."""
        if damping_mode not in self.damping_modes:
            raise ValueError(
                f"damping_mode={damping_mode!r} is not available for {self.name}; it supports "
                f"{list(self.damping_modes)}"
            )
        return InverseOperator(self, self._check_damping(damping), damping_mode)

    def factorize(self, damping: float = 0.0, damping_mode: DampingMode = "exact") -> LinearOperator:
        """Precompute what ``solve(·, damping, damping_mode)`` needs (else done at the first solve).

        Returns ``self``, so ``F.factorize(λ).solve(v, λ)`` chains.
        """
        if damping_mode not in self.damping_modes:
            raise ValueError(
                f"damping_mode={damping_mode!r} is not available for {self.name}; it supports "
                f"{list(self.damping_modes)}"
            )
        self._prepare(self._check_damping(damping), damping_mode)
        return self

    def _prepare(self, damping: float, damping_mode: str) -> None:
        """Hook for :meth:`factorize`; structures with a cached factorisation override it."""

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(A + damping·I)`` as a float64 scalar tensor."""
        return self._logdet(self._check_damping(damping))

    def to_dense(self) -> Tensor:
        """The explicit ``(P, P)`` matrix (only for small ``P``)."""
        P = self.shape[0]
        check_memory(P * P * torch.finfo(self.dtype).bits // 8, f"{self.name}.to_dense()", self.device)
        eye = torch.eye(P, dtype=self.dtype, device=self.device)
        return self._matmat(eye)

    def diagonal(self) -> Tensor:
        """``diag(A)``; default from ``to_dense`` (structures override when cheaper)."""
        return self.to_dense().diagonal().clone()

    def to_scipy(self) -> spla.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy float64 in and out)."""

        def mm(x: np.ndarray) -> np.ndarray:
            X = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            X = X.reshape(self.shape[0], -1)
            return self._matmat(X).detach().cpu().to(torch.float64).numpy()

        return spla.LinearOperator(
            self.shape, matvec=lambda x: mm(x).ravel(), matmat=mm, rmatvec=lambda x: mm(x).ravel(),
            dtype=np.float64,
        )

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _Sum(self, other)

    def __mul__(self, c: float) -> LinearOperator:
        return _Scaled(self, float(c))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{self.name}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class InverseOperator(LinearOperator):
    """``(A + λI)⁻¹`` for a base operator ``A``; ``@`` calls ``A.solve``."""

    def __init__(self, base: LinearOperator, damping: float, damping_mode: str = "exact") -> None:
        super().__init__(base.shape[0], base.dtype, base.device, base.block_shapes,
                         name=f"({base.name} + {damping}·I)⁻¹")
        self.base, self.damping, self.damping_mode = base, damping, damping_mode

    def _matmat(self, X: Tensor) -> Tensor:
        return self.base._solve(X, self.damping, self.damping_mode)

    def _solve(self, X: Tensor, damping: float, damping_mode: str) -> Tensor:
        if damping != 0:
            raise NotImplementedError(f"{self.name}: solve with extra damping is not supported")
        return self.base._matmat(X) + self.damping * X

    def _logdet(self, damping: float) -> Tensor:
        if damping != 0:
            return super()._logdet(damping)
        if self.damping_mode != "exact":
            return super()._logdet(0.0)
        return -self.base._logdet(self.damping)


class _Sum(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape != b.shape:
            raise ValueError(f"cannot add operators of shapes {a.shape} and {b.shape}")
        super().__init__(a.shape[0], a.dtype, a.device, a.block_shapes, name=f"{a.name}+{b.name}")
        self.a, self.b = a, b

    def _matmat(self, X: Tensor) -> Tensor:
        return self.a._matmat(X) + self.b._matmat(X)

    def _rank_bound(self) -> int:
        return min(self.shape[0], self.a._rank_bound() + self.b._rank_bound())

    def _is_singular(self) -> bool:  # rank(A + B) ≤ rank A + rank B
        return self._rank_bound() < self.shape[0]

    def diagonal(self) -> Tensor:
        return self.a.diagonal() + self.b.diagonal()


class _Scaled(LinearOperator):
    def __init__(self, a: LinearOperator, c: float) -> None:
        if c < 0:
            raise ValueError(f"scaling must be ≥ 0 to keep the operator PSD, got {c}")
        super().__init__(a.shape[0], a.dtype, a.device, a.block_shapes, name=f"{c}·{a.name}")
        self.a, self.c = a, c

    def _matmat(self, X: Tensor) -> Tensor:
        return self.c * self.a._matmat(X)

    def _is_singular(self) -> bool:
        return self.c == 0 or self.a._is_singular()

    def _rank_bound(self) -> int:
        return 0 if self.c == 0 else self.a._rank_bound()

    def _solve(self, X: Tensor, damping: float, damping_mode: str) -> Tensor:
        if self.c == 0:
            return X / damping
        return self.a._solve(X, damping / self.c, damping_mode) / self.c

    def _logdet(self, damping: float) -> Tensor:
        if self.c == 0:
            return torch.tensor(self.shape[0] * math.log(damping), dtype=torch.float64)
        return self.shape[0] * math.log(self.c) + self.a._logdet(damping / self.c)

    def diagonal(self) -> Tensor:
        return self.c * self.a.diagonal()


class _Product(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        super().__init__(a.shape[0], a.dtype, a.device, a.block_shapes, name=f"{a.name}@{b.name}")
        self.a, self.b = a, b

    def _matmat(self, X: Tensor) -> Tensor:
        return self.a._matmat(self.b._matmat(X))


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device`` in bytes.

    CUDA: ``torch.cuda.mem_get_info``. CPU: ``psutil.virtual_memory().available`` when psutil is
    installed (it is in every extra), else the free physical pages from
    ``os.sysconf`` (which leave out reclaimable caches, so memory checks err on the safe side).

    Raises:
        RuntimeError: If neither psutil nor ``os.sysconf`` can tell (``pip install psutil``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError) as err:
        raise RuntimeError("cannot determine the available memory on this system; "
                           "pip install psutil") from err


def _gb(nbytes: float) -> str:
    gb = nbytes / 1e9
    return f"{gb:.2f}" if gb >= 0.01 else f"{gb:.2g}"


def check_memory(nbytes: int, what: str, device: torch.device | str = "cpu") -> None:
    """Raise ``MemoryError`` (saying how many GB) if ``nbytes`` would not fit on ``device``."""
    free = available_memory_bytes(device)
    if nbytes > 0.9 * free:
        raise MemoryError(
            f"{what} needs {_gb(nbytes)} GB but only {_gb(free)} GB is available on "
            f"{torch.device(device)}; use a smaller batch, fewer MC samples or a structured "
            "approximation (structure='kfac', 'foof' or 'diag')"
        )
