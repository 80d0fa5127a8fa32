"""Which errors are back-propagated: output-space seeds for each Fisher kind and likelihood.

Notation: ``f = f(x_n) ∈ R^C`` the model output, ``g(y) = ∇_θ(−log p(y|x_n, θ)) = J_nᵀ ∇_f(−log
p(y|f))``. The seeds ``σ_{n r} ∈ R^C`` are chosen so that back-propagating them gives the columns
of ``G`` with ``F = G Gᵀ``:

================  =======================================================  ==================
kind              Fisher                                                   seeds (``R`` each)
================  =======================================================  ==================
``"exact"``       ``F = (1/N) Σ_n E_{y∼p(·|x_n)}[g gᵀ] = (1/N) Σ J Λ Jᵀ``  ``S`` with ``SSᵀ=Λ``, ÷√N
``"mc"``          ``F = (1/(N S)) Σ_n Σ_s g(ŷ_{ns}) g(ŷ_{ns})ᵀ``           ``∇_f(−log p(ŷ))``, ÷√(NS)
``"empirical"``   ``F = (1/N) Σ_n g(y_n) g(y_n)ᵀ``                         ``∇_f(−log p(y))``, ÷√N
================  =======================================================  ==================

Likelihoods (``Λ`` is the output-space Fisher):

* ``"classification"``: softmax categorical on logits, ``−log p(y|f) = −log softmax(f)_y``;
  ``∇_f = p − 1_y``, ``Λ = diag(p) − ppᵀ``, ``S = [√p_c (p − 1_c)]_c`` (``R = C``).
* ``"regression"``: Gaussian with unit variance, ``−log p(y|f) = ½‖f − y‖² + const``;
  ``∇_f = f − y``, ``Λ = I``, ``S = I`` (``R = C``); MC labels ``ŷ = f + ε``, ``ε ∼ N(0, I)``.
  (PyTorch's ``MSELoss(reduction="mean")`` corresponds to variance ``C/2``: rescale accordingly.)
* ``"binary"``: independent Bernoulli per output on logits, ``−log p = BCEWithLogits(f, y)``;
  ``∇_f = σ(f) − y``, ``Λ = diag(σ(1−σ))``, ``S = diag(√(σ(1−σ)))`` (``R = C``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LIKELIHOODS = ("classification", "regression", "binary")
KINDS = ("exact", "mc", "empirical")


def check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    """Raise ``ValueError`` naming ``what``, the bad ``value`` and the ``valid`` choices."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(repr, valid))}")


def check_outputs(outputs: Tensor, likelihood: str) -> None:
    """Validate model outputs ``(N, C)``: 2-D and finite."""
    if outputs.dim() != 2:
        raise ValueError(
            f"the model output must be 2-D (N, C) for likelihood {likelihood!r}, got shape "
            f"{tuple(outputs.shape)}; flatten extra dimensions in the model"
        )
    if not torch.isfinite(outputs).all():
        raise FloatingPointError("the model output has non-finite values (nan/inf)")


def check_targets(outputs: Tensor, targets: Tensor, likelihood: str) -> None:
    """Validate data targets against the outputs for a likelihood."""
    N, C = outputs.shape
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
    if targets.device != outputs.device:
        raise ValueError(f"targets are on {targets.device} but the outputs on {outputs.device}")
    if likelihood == "classification":
        if targets.shape != (N,) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"classification targets must be integer class indices of shape ({N},), got "
                f"{targets.dtype} of shape {tuple(targets.shape)}"
            )
        if N and (targets.min() < 0 or targets.max() >= C):
            raise ValueError(f"classification targets must lie in [0, {C}), got "
                             f"[{int(targets.min())}, {int(targets.max())}]")
    else:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"{likelihood} targets must have the output shape {tuple(outputs.shape)}, got "
                f"{tuple(targets.shape)}"
            )
        if not torch.isfinite(targets).all():
            raise FloatingPointError("targets have non-finite values")


def loss_gradient(outputs: Tensor, targets: Tensor, likelihood: str) -> Tensor:
    """``∇_f(−log p(y|f))`` per input, shape ``(N, C)`` (no batch normalisation)."""
    f = outputs.detach()
    if likelihood == "classification":
        p = torch.softmax(f, dim=1)
        return p - torch.nn.functional.one_hot(targets.long(), f.shape[1]).to(f.dtype)
    if likelihood == "regression":
        return f - targets.to(f.dtype)
    return torch.sigmoid(f) - targets.to(f.dtype)


def sample_targets(
    outputs: Tensor, likelihood: str, mc_samples: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``ŷ ∼ p(·|f)``: shape ``(S, N)`` (classification) or ``(S, N, C)``.

    All randomness comes from ``generator`` (on the outputs' device).
    """
    f = outputs.detach()
    S = int(mc_samples)
    if likelihood == "classification":
        p = torch.softmax(f.to(torch.float64), dim=1)
        return torch.multinomial(p, S, replacement=True, generator=generator).T.contiguous()
    if likelihood == "regression":
        eps = torch.randn((S, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
        return f.unsqueeze(0) + eps
    p = torch.sigmoid(f).unsqueeze(0).expand(S, *f.shape)
    return torch.bernoulli(p, generator=generator)


def exact_factor(outputs: Tensor, likelihood: str) -> Tensor:
    """Symmetric factor ``S_n`` with ``S_n S_nᵀ = Λ_n``: shape ``(N, R, C)``, rows = columns of S."""
    f = outputs.detach()
    N, C = f.shape
    if likelihood == "classification":
        p = torch.softmax(f, dim=1)
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        # S[n, c, :] = √p_c (p − 1_c)
        return p.sqrt().unsqueeze(2) * (p.unsqueeze(1) - eye.unsqueeze(0))
    eye = torch.eye(C, dtype=f.dtype, device=f.device).expand(N, C, C)
    if likelihood == "regression":
        return eye.clone()
    s = torch.sigmoid(f)
    return (s * (1 - s)).sqrt().unsqueeze(2) * eye


def output_seeds(
    outputs: Tensor,
    targets: Tensor | None,
    likelihood: str,
    kind: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Seeds ``(N, R, C)`` to back-propagate, with the Fisher scaling folded in.

    Returns:
        ``(seeds, sampled)`` where ``sampled`` are the MC labels ``(S, N[, C])`` for
        ``kind="mc"`` (else ``None``), so a reference can rebuild the same Fisher.
    """
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(kind, KINDS, "kind")
    check_outputs(outputs, likelihood)
    N = outputs.shape[0]
    if kind == "exact":
        return exact_factor(outputs, likelihood) / math.sqrt(N), None
    if kind == "empirical":
        if targets is None:
            raise ValueError("kind='empirical' needs the data targets: pass targets=...")
        check_targets(outputs, targets, likelihood)
        return loss_gradient(outputs, targets, likelihood).unsqueeze(1) / math.sqrt(N), None
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    sampled = sample_targets(outputs, likelihood, mc_samples, generator)
    seeds = torch.stack([loss_gradient(outputs, y, likelihood) for y in sampled], dim=1)
    return seeds / math.sqrt(N * mc_samples), sampled
