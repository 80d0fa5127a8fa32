"""The diagonal Gaussian prior ``p(θ) = N(0, Λ_p⁻¹)``, ``Λ_p = diag(δ)``, and its validation.

Three formats are accepted for ``prior_precision`` (``P`` parameters in ``params`` order, each
tensor flattened row-major):

* a scalar ``δ`` (``float``, ``int``, 0-d or one-element tensor): ``Λ_p = δ I_P``;
* one scalar per parameter tensor (a sequence of numbers or a 1-D tensor of length
  ``len(params)``): ``δ`` constant on each tensor;
* a full diagonal (a 1-D tensor of length ``P``, or a list of tensors shaped like ``params``).

Every entry must be finite and > 0 (a zero precision is an improper prior, whose evidence is
``−∞``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

KINDS = ("scalar", "per_tensor", "diagonal")


class PriorPrecision:
    """Validated prior precision ``δ`` for a list of parameters.

    Attributes:
        kind: ``"scalar"``, ``"per_tensor"`` or ``"diagonal"``.
        diag: ``(P,)`` float64 diagonal of ``Λ_p`` in ``params`` order.
        value: the float (scalar), a list of floats (per tensor) or ``diag`` (diagonal).
    """

    def __init__(self, spec, params: Sequence[nn.Parameter], names: Sequence[str] | None = None,
                 what: str = "prior_precision") -> None:
        self.value: float | list[float] | Tensor
        self.numels = [p.numel() for p in params]
        self.shapes = [tuple(p.shape) for p in params]
        self.names = list(names) if names is not None else [f"params[{i}]" for i in range(len(params))]
        device = params[0].device
        P, n_t = sum(self.numels), len(params)
        accepted = (f"a positive scalar, {n_t} positive numbers (one per parameter tensor), a 1-D "
                    f"tensor of length {n_t} or {P}, or a list of {n_t} tensors shaped like the "
                    f"parameters {self.shapes}")
        if isinstance(spec, bool) or spec is None:
            raise TypeError(f"{what} must be {accepted}; got {spec!r}")
        # a one-element tensor is a scalar (length-1 per-tensor or diagonal forms coincide with it)
        if isinstance(spec, numbers.Real) or (isinstance(spec, Tensor) and spec.dim() <= 1
                                              and spec.numel() == 1):
            v = float(spec)
            self._check_values(torch.tensor([v], dtype=torch.float64), what, lambda i: "all")
            self.kind, self.value = "scalar", v
            self.diag = torch.full((P,), v, dtype=torch.float64, device=device)
            return
        if isinstance(spec, Tensor):
            if spec.dim() != 1 or spec.shape[0] not in (n_t, P):
                raise ValueError(f"{what} has shape {tuple(spec.shape)}; expected {accepted}")
            t = spec.detach().to(device=device, dtype=torch.float64)
            if t.shape[0] == n_t and n_t != P:
                self._set_per_tensor(t, what, device)
            else:
                self._check_values(t, what, self._param_of)
                self.kind, self.diag = "diagonal", t.clone()
                self.value = self.diag
            return
        if isinstance(spec, (list, tuple)):
            if len(spec) != n_t:
                raise ValueError(f"{what} is a sequence of length {len(spec)}; expected {accepted}")
            if all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in spec) or all(
                    isinstance(x, Tensor) and x.numel() == 1 and tuple(x.shape) != s
                    for x, s in zip(spec, self.shapes)):
                self._set_per_tensor(torch.tensor([float(x) for x in spec], dtype=torch.float64),
                                     what, device)
                return
            parts = []
            for i, (x, s) in enumerate(zip(spec, self.shapes)):
                if not isinstance(x, Tensor) or tuple(x.shape) != s:
                    got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                    raise ValueError(f"{what}[{i}] ({self.names[i]}) is {got}; expected {accepted}")
                parts.append(x.detach().reshape(-1).to(device=device, dtype=torch.float64))
            t = torch.cat(parts)
            self._check_values(t, what, self._param_of)
            self.kind, self.diag, self.value = "diagonal", t, t
            return
        raise TypeError(f"{what} must be {accepted}; got {type(spec).__name__}")

    @property
    def scalar(self) -> float:
        """``δ`` of a scalar prior.

        Raises:
            TypeError: the prior is not scalar (``kind`` is ``"per_tensor"`` or ``"diagonal"``).
        """
        if self.kind != "scalar" or not isinstance(self.value, float):
            raise TypeError(f"the prior precision is {self.kind}, not a scalar")
        return self.value

    # ------------------------------------------------------------------ construction helpers
    def _set_per_tensor(self, t: Tensor, what: str, device) -> None:
        self._check_values(t, what, lambda i: self.names[i])
        self.kind, self.value = "per_tensor", [float(x) for x in t]
        self.diag = torch.repeat_interleave(t, torch.tensor(self.numels)).to(device)

    def _param_of(self, flat_index: int) -> str:
        off = 0
        for name, n in zip(self.names, self.numels):
            if flat_index < off + n:
                return f"{name}[{flat_index - off}]"
            off += n
        return f"[{flat_index}]"

    @staticmethod
    def _check_values(t: Tensor, what: str, where) -> None:
        bad = ~(torch.isfinite(t) & (t > 0))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{what} must be finite and > 0 (a Gaussian prior precision); got {float(t[i])!r} "
                f"at {where(i)}. Pass a positive value, e.g. prior_precision=1.0"
            )

    # ------------------------------------------------------------------ quantities
    @property
    def size(self) -> int:
        """``P``, the number of parameters the prior covers."""
        return int(self.diag.shape[0])

    def logdet(self) -> Tensor:
        """``log det Λ_p = Σ_p log δ_p`` (float64)."""
        return self.diag.log().sum()

    def scatter(self, theta: Tensor) -> Tensor:
        """``θᵀ Λ_p θ`` for the flat ``θ`` (float64)."""
        return (self.diag * theta.to(torch.float64) ** 2).sum()

    def log_density(self, theta: Tensor) -> Tensor:
        """``log N(θ; 0, Λ_p⁻¹) = −½θᵀΛ_pθ + ½ log det Λ_p − (P/2) log 2π``."""
        return -0.5 * self.scatter(theta) + 0.5 * self.logdet() - 0.5 * self.size * math.log(2 * math.pi)

    def describe(self) -> str:
        """A one-line description of ``δ`` for messages and ``repr``."""
        if self.kind == "scalar":
            return f"scalar δ = {self.value:.4g}"
        if self.kind == "per_tensor":
            return "per tensor δ = [" + ", ".join(f"{v:.4g}" for v in cast(list, self.value)) + "]"
        return f"diagonal δ in [{float(self.diag.min()):.4g}, {float(self.diag.max()):.4g}]"

    def __repr__(self) -> str:
        return f"PriorPrecision({self.describe()}, P={self.size})"
