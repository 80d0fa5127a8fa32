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

**Outputs with extra dimensions** ``(N, …, C)``: the class (or output) dimension is the *last*
one, and every position ``t`` of the middle dimensions is one loss term ``ℓ_{nt}`` (language
modelling ``(N, T, V)``; for a segmentation output ``(N, C, H, W)`` return
``logits.movedim(1, -1)``). With classification targets ``(N, …)``, positions whose target is
``ignore_index`` (default ``-100``, as ``torch.nn.functional.cross_entropy``) are no loss terms.
The Fisher is the mean **per loss term**: with ``N_ℓ`` the number of loss terms of the batch,

* ``"exact"``: ``F = (1/N_ℓ) Σ_{n,t} J_{nt}ᵀ Λ_{nt} J_{nt}`` -- one seed per position and class,
  ``R = T·C`` backward passes (refused above :data:`MAX_EXACT_SEEDS` with the cost; use ``mc``);
* ``"mc"``: ``F = (1/(N_ℓ S)) Σ_n Σ_s g_n(ŷ_{ns}) g_n(ŷ_{ns})ᵀ`` with ``g_n = Σ_t ∇ℓ_{nt}`` and
  labels drawn independently per position -- an unbiased estimate of the exact one (the cross
  terms have mean zero), ``R = S``;
* ``"empirical"``: ``F = (1/N_ℓ) Σ_n g_n(y_n) g_n(y_n)ᵀ``, ``g_n = Σ_t ∇ℓ_{nt}(y_{nt})``, the
  gradient of the datum's summed loss (``R = 1``).

For ``(N, C)`` outputs ``N_ℓ = N`` and everything is as above. Map to curvlinops (which flattens
positions into the batch, class dim 1 for ``CrossEntropyLoss``, ``reduction="mean"`` dividing by
the number of positions ``N·T``): curvkit ``exact`` = curvlinops ``GGNLinearOperator`` on
``logits.movedim(-1, 1)`` (no ignored targets); curvkit ``mc`` has the same expectation as
``FisherMCLinearOperator``; curvlinops' ``EFLinearOperator`` uses per-position gradients
(``Σ_t g_{nt} g_{nt}ᵀ``), curvkit's ``empirical`` the per-datum gradient ``g_n`` -- they agree for
``T = 1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvkit.linalg.finite import all_finite

LIKELIHOODS = ("classification", "regression", "binary")
KINDS = ("exact", "mc", "empirical")

#: Largest number of backward seeds per input ``kind="exact"`` accepts (``T·C``).
MAX_EXACT_SEEDS = 4096


def check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    """Raise ``ValueError`` naming ``what``, the bad ``value`` and the ``valid`` choices."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(repr, valid))}")


def check_outputs(outputs: Tensor, likelihood: str) -> None:
    """Validate model outputs ``(N, …, C)``: at least 2-D and finite."""
    if outputs.dim() < 2:
        raise ValueError(
            f"the model output must be at least 2-D (N, C) or (N, ..., C) for likelihood "
            f"{likelihood!r}, got shape {tuple(outputs.shape)}"
        )
    if not all_finite(outputs):
        raise FloatingPointError("the model output has non-finite values (nan/inf)")


def check_targets(outputs: Tensor, targets: Tensor, likelihood: str,
                  ignore_index: int = -100) -> None:
    """Validate data targets against the outputs for a likelihood."""
    C = outputs.shape[-1]
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
    if targets.device != outputs.device:
        raise ValueError(f"targets are on {targets.device} but the outputs on {outputs.device}")
    if likelihood == "classification":
        shape = tuple(outputs.shape[:-1])
        if tuple(targets.shape) != shape or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"classification targets must be integer class indices of shape {shape}, got "
                f"{targets.dtype} of shape {tuple(targets.shape)}"
            )
        valid = targets[targets != ignore_index]
        if valid.numel() and (valid.min() < 0 or valid.max() >= C):
            raise ValueError(f"classification targets must lie in [0, {C}) (or be ignore_index="
                             f"{ignore_index}), got [{int(valid.min())}, {int(valid.max())}]")
    else:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"{likelihood} targets must have the output shape {tuple(outputs.shape)}, got "
                f"{tuple(targets.shape)}"
            )
        if not all_finite(targets):
            raise FloatingPointError("targets have non-finite values")


def term_mask(outputs: Tensor, targets: Tensor | None, likelihood: str,
              ignore_index: int = -100) -> Tensor:
    """``(N, …)`` bool: which positions are loss terms (classification targets ≠ ignore_index)."""
    shape = outputs.shape[:-1]
    if likelihood == "classification" and targets is not None and tuple(targets.shape) == shape:
        return targets != ignore_index
    return torch.ones(shape, dtype=torch.bool, device=outputs.device)


def loss_gradient(outputs: Tensor, targets: Tensor, likelihood: str,
                  ignore_index: int = -100) -> Tensor:
    """``∇_f(−log p(y|f))`` per position, shape of the outputs.

    No normalisation; ignored positions get zero.
    """
    f = outputs.detach()
    if likelihood == "classification":
        p = torch.softmax(f, dim=-1)
        keep = targets != ignore_index
        y = torch.where(keep, targets, torch.zeros_like(targets)).long()
        g = p - torch.nn.functional.one_hot(y, f.shape[-1]).to(f.dtype)
        return g * keep.unsqueeze(-1).to(f.dtype)
    if likelihood == "regression":
        return f - targets.to(f.dtype)
    return torch.sigmoid(f) - targets.to(f.dtype)


def sample_targets(
    outputs: Tensor, likelihood: str, mc_samples: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``ŷ ∼ p(·|f)``: shape ``(S, N, …)`` (classification) or ``(S, N, …, C)``.

    Labels are drawn independently per input and position; all randomness comes from
    ``generator`` (on the outputs' device).
    """
    f = outputs.detach()
    S = int(mc_samples)
    if likelihood == "classification":
        p = torch.softmax(f.to(torch.float64), dim=-1).reshape(-1, f.shape[-1])
        y = torch.multinomial(p, S, replacement=True, generator=generator).T
        return y.reshape(S, *f.shape[:-1]).contiguous()
    if likelihood == "regression":
        eps = torch.randn((S, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
        return f.unsqueeze(0) + eps
    p = torch.sigmoid(f).unsqueeze(0).expand(S, *f.shape)
    return torch.bernoulli(p, generator=generator)


def exact_factor(outputs: Tensor, likelihood: str) -> Tensor:
    """Symmetric factor ``S`` with ``S Sᵀ = Λ`` per position: shape ``(*outputs.shape, C)``.

    ``(N, R=C, C)`` for 2-D outputs; rows = columns of ``S``.
    """
    f = outputs.detach()
    C = f.shape[-1]
    eye = torch.eye(C, dtype=f.dtype, device=f.device)
    if likelihood == "classification":
        p = torch.softmax(f, dim=-1)
        # S[..., c, :] = √p_c (p − 1_c)
        return p.sqrt().unsqueeze(-1) * (p.unsqueeze(-2) - eye)
    if likelihood == "regression":
        return eye.expand(*f.shape, C).clone()
    s = torch.sigmoid(f)
    return (s * (1 - s)).sqrt().unsqueeze(-1) * eye


def per_position_seeds(S: Tensor) -> Tensor:
    """``(N, *pos, C, C)`` factors -> seeds ``(N, T·C, *pos, C)`` each at one position."""
    N, C = S.shape[0], S.shape[-1]
    pos = S.shape[1:-2]
    T = math.prod(pos)
    eye = torch.eye(T, dtype=S.dtype, device=S.device)
    seeds = torch.einsum("ntcd,tu->ntcud", S.reshape(N, T, C, C), eye)
    return seeds.reshape(N, T * C, *pos, C)


def output_seeds(
    outputs: Tensor,
    targets: Tensor | None,
    likelihood: str,
    kind: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor | None]:
    """Seeds ``(N, R, …, C)`` to back-propagate, with the Fisher scaling ``1/√N_ℓ`` folded in.

    Args:
        outputs: ``(N, C)`` or ``(N, …, C)`` (module docstring).
        targets: data labels (needed for ``"empirical"``; with classification they mark
            ignored positions for every kind).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"`` (module docstring).
        kind: ``"exact"`` (``R = C`` per position), ``"mc"`` (``R = mc_samples``) or
            ``"empirical"`` (``R = 1``).
        mc_samples: ``S``, labels drawn per input for ``"mc"``.
        generator: the randomness of the MC labels.
        ignore_index: target value of positions that are no loss term.

    Returns:
        ``(seeds, sampled)`` where ``sampled`` are the MC labels ``(S, N, …[, C])`` for
        ``kind="mc"`` (else ``None``), so a reference can rebuild the same Fisher.

    Raises:
        ValueError: ``kind="exact"`` would need more than :data:`MAX_EXACT_SEEDS` seeds per input.
    """
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(kind, KINDS, "kind")
    check_outputs(outputs, likelihood)
    if targets is not None and (kind == "empirical" or likelihood == "classification"):
        check_targets(outputs, targets, likelihood, ignore_index)
    mask = term_mask(outputs, targets, likelihood, ignore_index)
    terms = int(mask.sum())
    if terms == 0:
        raise ValueError(f"every target equals ignore_index={ignore_index}: no loss terms")
    m = mask.unsqueeze(-1).to(outputs.dtype)
    C = outputs.shape[-1]
    T = math.prod(outputs.shape[1:-1])
    if kind == "exact":
        R = T * C
        if R > MAX_EXACT_SEEDS:
            raise ValueError(
                f"kind='exact' on outputs of shape {tuple(outputs.shape)} needs {R} backward "
                f"passes per batch (positions × classes = {T} × {C}) and a factor of "
                f"{outputs.shape[0] * R} columns; use kind='mc' (mc_samples backward passes, "
                "unbiased for the same Fisher) or kind='empirical'"
            )
        S = exact_factor(outputs, likelihood) * m.unsqueeze(-1)
        seeds = S if outputs.dim() == 2 else per_position_seeds(S)
        return seeds / math.sqrt(terms), None
    if kind == "empirical":
        if targets is None:
            raise ValueError("kind='empirical' needs the data targets: pass targets=...")
        g = loss_gradient(outputs, targets, likelihood, ignore_index) * m
        return g.unsqueeze(1) / math.sqrt(terms), None
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    sampled = sample_targets(outputs, likelihood, mc_samples, generator)
    seeds = torch.stack([loss_gradient(outputs, y, likelihood) * m for y in sampled], dim=1)
    return seeds / math.sqrt(terms * mc_samples), sampled


def log_likelihood_terms(outputs: Tensor, targets: Tensor, likelihood: str,
                         ignore_index: int = -100) -> Tensor:
    """``log p(y_{nt} | f_{nt})`` per loss term, float64, with all normalising constants.

    The same convention as the Fisher (module docstring): the class (output) dimension is the
    last one, every position of the middle dimensions is one loss term, and classification
    positions whose target is ``ignore_index`` are none (they get ``0``; count the terms with
    :func:`num_loss_terms`). So ``−terms.sum() / N_ℓ`` is
    ``F.cross_entropy(f.reshape(-1, C), y.reshape(-1), ignore_index=ignore_index)``.

    Args:
        outputs: ``(N, C)`` or ``(N, …, C)`` logits (or regression outputs).
        targets: classification indices ``(N, …)``; regression / binary targets of the outputs'
            shape.
        likelihood: ``"classification"`` (softmax), ``"regression"`` (Gaussian, unit variance:
            ``−½‖f − y‖² − (C/2) log 2π`` per position) or ``"binary"`` (Bernoulli on logits,
            summed over the last dimension per position).
        ignore_index: classification target value of positions that are no loss term.

    Returns:
        ``(N, …)`` float64 (the outputs' shape without the last dimension).
    """
    f = outputs.detach().to(torch.float64)
    if likelihood == "classification":
        keep = targets != ignore_index
        y = torch.where(keep, targets, torch.zeros_like(targets)).long()
        lp = torch.log_softmax(f, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return torch.where(keep, lp, torch.zeros_like(lp))
    y = targets.to(torch.float64)
    if likelihood == "regression":
        return -0.5 * ((f - y) ** 2).sum(-1) - 0.5 * f.shape[-1] * math.log(2 * math.pi)
    return -torch.nn.functional.binary_cross_entropy_with_logits(f, y, reduction="none").sum(-1)


def num_loss_terms(outputs: Tensor, targets: Tensor | None, likelihood: str,
                   ignore_index: int = -100) -> int:
    """``N_ℓ``: positions of the outputs that are loss terms (module docstring)."""
    return int(term_mask(outputs, targets, likelihood, ignore_index).sum())
