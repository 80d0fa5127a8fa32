"""Dense float64 ground truth for Fisher matrices, by an independent route (``torch.func``).

Nothing here uses curvkit's hooks or capture code: Jacobians and per-sample gradients come from
``torch.func.functional_call`` + ``vmap`` + ``jacrev`` / ``grad`` over single inputs, and every
matrix is formed explicitly. Only for tiny models (``P`` up to a few thousand).

Notation (Benzing 2022, Sec. 2.2 and App. I.1; eq 1 defines the Fisher):

* ``N`` inputs ``x_n``, model outputs ``f_n = f(x_n; θ) ∈ R^C``;
* ``θ ∈ R^P`` -- the chosen parameters, each flattened row-major (``.reshape(-1)``) and
  concatenated in the given order (the same order as curvkit's list format);
* ``J_n = ∂f_n/∂θ ∈ R^{C×P}``;
* ``ℓ_n(y) = −log p(y | f_n)`` and ``g_n(y) = ∇_θ ℓ_n(y) = J_nᵀ ∇_f ℓ_n(y) ∈ R^P``;
* ``Λ_n = E_{y∼p(·|f_n)}[∇_f ℓ ∇_f ℓᵀ] ∈ R^{C×C}`` -- the output-space Fisher.

Likelihoods (``likelihood=``):

* ``"classification"``: categorical on logits, ``ℓ = logsumexp(f) − f_y``; ``y`` int64 class
  index; ``Λ = diag(p) − p pᵀ`` with ``p = softmax(f)``.
* ``"regression"``: Gaussian with unit variance, ``ℓ = ½‖f − y‖²`` (constants dropped); ``y``
  float shaped like ``f``; ``Λ = I_C``.
* ``"binary"``: independent Bernoulli per output on logits,
  ``ℓ = Σ_c [log(1 + e^{f_c}) − y_c f_c]``; ``y`` float in ``{0, 1}`` shaped like ``f``;
  ``Λ = diag(σ(f) ⊙ (1 − σ(f)))``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from curvkit.typing import Kind, Likelihood

LIKELIHOODS = ("classification", "regression", "binary")
KINDS = ("exact", "empirical", "mc")

__all__ = [
    "LIKELIHOODS",
    "KINDS",
    "per_sample_jacobians",
    "output_fisher",
    "per_sample_loss_gradients",
    "dense_fisher",
    "dense_block_diagonal",
]


# ---------------------------------------------------------------------- helpers
def _check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; supported: {list(LIKELIHOODS)}")


def _param_names(model: nn.Module, params: Sequence[Tensor] | None) -> list[str]:
    """Names (in ``model.named_parameters()``) of ``params``, in the order given."""
    named = list(model.named_parameters())
    if params is None:
        return [n for n, p in named if p.requires_grad]
    by_id = {id(p): n for n, p in named}
    names = []
    for i, p in enumerate(params):
        if id(p) not in by_id:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of "
                f"{type(model).__name__}; pass tensors from model.parameters()"
            )
        names.append(by_id[id(p)])
    if len(set(names)) != len(names):
        raise ValueError("params contains the same parameter twice")
    return names


def _fixed_state(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """Detached parameters not in ``names`` and all buffers (held fixed)."""
    state = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    return state


def _single_output(model: nn.Module, fixed: dict[str, Tensor]) -> Callable:
    """``f(θ_dict, x) -> f(x; θ)`` flattened to ``(C,)`` for one input ``x`` (no batch dim)."""

    def f(theta: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **theta}, (x.unsqueeze(0),))
        return out.reshape(-1)

    return f


def _nll(likelihood: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``ℓ(f, y) = −log p(y | f)`` for one input (``f`` of shape ``(C,)``)."""
    if likelihood == "classification":
        return lambda f, y: torch.logsumexp(f, 0) - torch.gather(f, 0, y.reshape(1)).squeeze(0)
    if likelihood == "regression":
        return lambda f, y: 0.5 * ((f - y.reshape(-1)) ** 2).sum()
    return lambda f, y: (nn.functional.softplus(f) - y.reshape(-1) * f).sum()


def _flatten(per_name: dict[str, Tensor], names: Sequence[str], lead: int) -> Tensor:
    """Concatenate ``per_name[n]`` (``lead`` leading dims, then the parameter shape) row-major."""
    parts = [per_name[n].reshape(*per_name[n].shape[:lead], -1) for n in names]
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------- public
def per_sample_jacobians(
    model: nn.Module, inputs: Tensor, params: Sequence[Tensor] | None = None
) -> Tensor:
    """Per-input Jacobians ``J_n = ∂f(x_n)/∂θ`` of the model output.

    Each input is pushed through the model on its own (a batch dimension of 1 is added inside),
    vectorised with ``vmap(jacrev(·))``. Parameters not in ``params`` and buffers are held fixed.

    Args:
        model: the network; its output for a batch of ``N`` inputs is ``(N, C)`` (or ``(N, …)``,
            flattened to ``C`` per input). Use eval mode for dropout / batch-norm models.
        inputs: ``(N, …)``.
        params: the parameters ``θ`` (tensors of ``model``); default: every parameter with
            ``requires_grad``. Their order fixes the column order.

    Returns:
        ``(N, C, P)`` tensor in the model's dtype, ``J[n, c, :] = ∂f_c(x_n)/∂θ`` with each
        parameter flattened row-major and concatenated in ``params`` order.
    """
    names = _param_names(model, params)
    theta = {n: p.detach() for n, p in model.named_parameters() if n in names}
    f = _single_output(model, _fixed_state(model, names))
    with torch.no_grad():
        J = vmap(jacrev(f), in_dims=(None, 0))(theta, inputs)
    return _flatten(J, names, lead=2)


def output_fisher(outputs: Tensor, likelihood: str = "classification") -> Tensor:
    """Output-space Fisher ``Λ_n = E_{y∼p(·|f_n)}[∇_f ℓ ∇_f ℓᵀ]`` per input, in float64.

    * classification (softmax categorical): ``Λ_n = diag(p_n) − p_n p_nᵀ``, ``p_n = softmax(f_n)``;
    * regression (Gaussian, unit variance): ``Λ_n = I_C``;
    * binary (Bernoulli per output): ``Λ_n = diag(σ(f_n) ⊙ (1 − σ(f_n)))``.

    Args:
        outputs: model outputs ``(N, C)`` (logits for classification / binary).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.

    Returns:
        ``(N, C, C)`` float64.
    """
    _check_likelihood(likelihood)
    if outputs.dim() != 2:
        raise ValueError(f"outputs must be (N, C), got shape {tuple(outputs.shape)}")
    f = outputs.detach().to(torch.float64)
    N, C = f.shape
    if likelihood == "classification":
        p = torch.softmax(f, dim=1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if likelihood == "regression":
        return torch.eye(C, dtype=f.dtype, device=f.device).expand(N, C, C).clone()
    s = torch.sigmoid(f)
    return torch.diag_embed(s * (1 - s))


def per_sample_loss_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    likelihood: str = "classification",
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """Per-sample gradients ``g_n = ∇_θ [−log p(y_n | f(x_n; θ))]`` (not divided by ``N``).

    Args:
        model: as in :func:`per_sample_jacobians`.
        inputs: as in :func:`per_sample_jacobians`.
        targets: ``(N,)`` int64 class indices (classification); ``(N, C)`` float (regression);
            float in ``{0, 1}`` shaped like the outputs (binary).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"`` (see module doc).
        params: as in :func:`per_sample_jacobians`.

    Returns:
        ``(N, P)`` in the model's dtype, flattened and ordered like :func:`per_sample_jacobians`.
    """
    _check_likelihood(likelihood)
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"targets has {targets.shape[0]} rows but inputs has {inputs.shape[0]}"
        )
    if likelihood == "classification" and targets.dtype != torch.int64:
        raise TypeError(f"classification targets must be int64 class indices, got {targets.dtype}")
    names = _param_names(model, params)
    theta = {n: p.detach() for n, p in model.named_parameters() if n in names}
    f = _single_output(model, _fixed_state(model, names))
    nll = _nll(likelihood)

    def loss(th: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nll(f(th, x), y)

    with torch.no_grad():
        g = vmap(grad(loss), in_dims=(None, 0, 0))(theta, inputs, targets)
    return _flatten(g, names, lead=1)


def dense_fisher(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    likelihood: Likelihood = "classification",
    kind: Kind = "exact",
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """The explicit ``(P, P)`` Fisher, in float64, normalised by the number of inputs ``N``.

    * ``kind="exact"``: ``F = (1/N) Σ_n J_nᵀ Λ_n J_n`` (:func:`output_fisher`), which equals
      ``(1/N) Σ_n E_{y∼p(·|f_n)}[g_n(y) g_n(y)ᵀ]``. ``targets`` is ignored.
    * ``kind="empirical"``: ``F = (1/N) Σ_n g_n(y_n) g_n(y_n)ᵀ`` with the data labels ``targets``.
    * ``kind="mc"``: ``targets`` of shape ``(S, N, …)`` holds ``S`` sampled labels ``ŷ_{ns}`` per
      input; ``F = (1/(N S)) Σ_{n,s} g_n(ŷ_{ns}) g_n(ŷ_{ns})ᵀ``.

    The model is deep-copied and cast to float64 (``copy.deepcopy(model).double()``), ``params``
    are mapped to the copy by name, and ``inputs`` / float ``targets`` are cast to float64; the
    caller's model is not changed.

    Args:
        model: the network (eval mode if it has dropout / batch-norm).
        inputs: ``(N, …)``.
        targets: see ``kind``; required for ``"empirical"`` and ``"mc"``.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        kind: ``"exact"``, ``"empirical"`` or ``"mc"``.
        params: parameters of ``model`` defining ``θ`` (default: all with ``requires_grad``).

    Returns:
        ``(P, P)`` float64 symmetric PSD matrix.
    """
    _check_likelihood(likelihood)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; supported: {list(KINDS)}")
    names = _param_names(model, params)
    model64 = copy.deepcopy(model).double()
    named64 = dict(model64.named_parameters())
    params64 = [named64[n] for n in names]
    x = inputs.to(torch.float64) if inputs.is_floating_point() else inputs
    N = x.shape[0]

    def cast(y: Tensor) -> Tensor:
        return y.to(torch.float64) if y.is_floating_point() else y

    if kind == "exact":
        J = per_sample_jacobians(model64, x, params64)  # (N, C, P)
        with torch.no_grad():
            out = model64(x).reshape(N, -1)
        Lam = output_fisher(out, likelihood)  # (N, C, C)
        F = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J) / N
    elif targets is None:
        raise ValueError(f"kind={kind!r} needs targets (data labels or sampled labels)")
    elif kind == "empirical":
        G = per_sample_loss_gradients(model64, x, cast(targets), likelihood, params64)
        F = G.T @ G / N
    else:
        if targets.dim() < 2 or targets.shape[1] != N:
            raise ValueError(
                f"kind='mc' needs sampled targets of shape (S, N, ...) with N = {N}, got "
                f"{tuple(targets.shape)}"
            )
        S = targets.shape[0]
        xs = x.repeat(S, *([1] * (x.dim() - 1)))  # s-major, matching targets.reshape below
        ys = cast(targets).reshape(S * N, *targets.shape[2:])
        G = per_sample_loss_gradients(model64, xs, ys, likelihood, params64)
        F = G.T @ G / (N * S)
    return 0.5 * (F + F.T)


def dense_block_diagonal(F: Tensor, block_sizes: Sequence[int]) -> Tensor:
    """``F`` with everything outside the diagonal blocks set to zero.

    Args:
        F: ``(P, P)``.
        block_sizes: sizes ``P_1, …, P_L`` with ``Σ P_l = P`` (e.g. the numels of the
            parameters, or of each layer's parameters).

    Returns:
        ``blockdiag(F_11, …, F_LL)`` as a ``(P, P)`` tensor (same dtype as ``F``).
    """
    sizes = [int(s) for s in block_sizes]
    if F.dim() != 2 or F.shape[0] != F.shape[1]:
        raise ValueError(f"F must be square, got shape {tuple(F.shape)}")
    if sum(sizes) != F.shape[0] or any(s < 0 for s in sizes):
        raise ValueError(f"block_sizes {sizes} do not sum to P = {F.shape[0]}")
    ids = torch.repeat_interleave(
        torch.arange(len(sizes), device=F.device), torch.tensor(sizes, device=F.device)
    )
    return torch.where(ids[:, None] == ids[None, :], F, torch.zeros((), dtype=F.dtype,
                                                                    device=F.device))

