"""Independent float64 references for the real-model tests (``tests/test_models_real.py``).

Nothing here uses curvkit: the Fisher factor ``G`` (``F = G Gᵀ``) of a model with logits
``(N, C)`` or ``(N, T, V)`` comes from ``torch.func`` (``functional_call`` + ``vmap`` over the
data, ``jacrev`` / ``grad`` per datum). Scaling: the mean per loss term (``N_ℓ`` positions whose
target is not ``-100``), as ``curvkit.fisher`` documents it:

* exact: ``F = (1/N_ℓ) Σ_{n,t} J_{nt}ᵀ Λ_{nt} J_{nt}``, ``Λ = diag(p) − ppᵀ``; columns
  ``J_{nt}ᵀ Λ_{nt}^{1/2}`` with the symmetric square root from ``eigh`` (curvkit uses a different
  factor of ``Λ``);
* mc / empirical: ``F = (1/(N_ℓ S)) Σ_{n,s} g_n g_nᵀ`` with ``g_n = ∇_θ Σ_t ℓ_{nt}(y_{nst})``.

The data are looped over one datum at a time (Hugging Face attention masks use data-dependent
control flow, which ``vmap`` refuses).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev

IGNORE = -100


def param_names(model: nn.Module, params) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _logits_fn(model, names, output_fn):
    def f(theta, x1):
        xb = {k: v.unsqueeze(0) for k, v in x1.items()} if isinstance(x1, dict) else x1.unsqueeze(0)
        out = functional_call(model, theta, (), xb) if isinstance(xb, dict) \
            else functional_call(model, theta, (xb,))
        out = output_fn(out) if output_fn is not None else getattr(out, "logits", out)
        out = out[0]
        return out.reshape(-1, out.shape[-1])  # (T, V); T = 1 for (N, C) outputs

    return f


def _each(inputs):
    N = next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]
    for n in range(N):
        yield n, ({k: v[n] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[n])


def _stack(fn, inputs, *per_datum):
    return torch.stack([fn(x1, *(a[n] for a in per_datum)) for n, x1 in _each(inputs)])


def _flat(d: dict[str, Tensor], names: list[str], lead: int) -> Tensor:
    return torch.cat([d[n].reshape(*d[n].shape[:lead], -1) for n in names], dim=-1)


def reference_columns(model: nn.Module, inputs, params, kind: str, labels: Tensor | None = None,
                      output_fn=None) -> Tensor:
    """``G`` of shape ``(P, M)`` with ``F = G Gᵀ`` (module docstring).

    Args:
        inputs: a tensor ``(N, …)`` or a dict of ``(N, …)`` tensors (``model(**inputs)``).
        kind: ``"exact"`` or ``"empirical"`` (``"mc"``: :func:`reference_columns_mc`).
        labels: exact: optional data labels marking ignored positions ``(N[, T])``; empirical:
            the data labels.
    """
    names = param_names(model, params)
    theta = {n: p.detach() for n, p in zip(names, params)}
    f = _logits_fn(model, names, output_fn)
    with torch.no_grad():
        out = _stack(lambda x1: f(theta, x1), inputs)  # (N, T, V)
    N, T, V = out.shape
    if kind == "exact":
        mask = torch.ones(N, T, dtype=torch.bool) if labels is None \
            else (labels.reshape(N, T) != IGNORE)
        J = _stack(lambda x1: _flat(jacrev(f)(theta, x1), names, 2), inputs)  # (N, T, V, P)
        p = torch.softmax(out, -1)
        lam = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
        w, Q = torch.linalg.eigh(lam)
        root = Q @ torch.diag_embed(w.clamp_min(0).sqrt()) @ Q.transpose(-1, -2)
        cols = torch.einsum("ntvp,ntvc->ntcp", J, root) * mask[..., None, None]
        return cols.reshape(-1, J.shape[-1]).T / math.sqrt(int(mask.sum()))
    if kind != "empirical":
        raise ValueError("kind='mc' needs curvkit's sampled labels: use reference_columns_mc")
    mask = labels.reshape(N, T) != IGNORE
    return _loss_grads(f, theta, names, inputs, labels.unsqueeze(0), mask) / math.sqrt(
        int(mask.sum()))


def reference_columns_mc(model, inputs, params, sampled: Tensor, data_labels: Tensor | None,
                         output_fn=None) -> Tensor:
    """``G`` for ``kind="mc"`` with curvkit's sampled labels ``(S, N[, T])``."""
    names = param_names(model, params)
    theta = {n: p.detach() for n, p in zip(names, params)}
    f = _logits_fn(model, names, output_fn)
    S, N = sampled.shape[:2]
    T = sampled[0].reshape(N, -1).shape[1]
    mask = torch.ones(N, T, dtype=torch.bool) if data_labels is None \
        else data_labels.reshape(N, T) != IGNORE
    return _loss_grads(f, theta, names, inputs, sampled, mask) / math.sqrt(int(mask.sum()) * S)


def _loss_grads(f, theta, names, inputs, ys: Tensor, mask: Tensor) -> Tensor:
    def loss(th, x1, y1, m1):
        logits = f(th, x1)
        y1 = y1.reshape(-1)
        nll = torch.logsumexp(logits, -1) - logits.gather(1, y1.clamp_min(0)[:, None])[:, 0]
        return (nll * m1).sum()

    cols = []
    for y in ys:  # s-major
        cols.append(_stack(lambda x1, y1, m1: _flat(grad(loss)(theta, x1, y1, m1), names, 0),
                           inputs, y, mask.to(torch.float64)))
    G = torch.stack(cols, 1)  # (N, S, P): column m = n·S + s
    return G.reshape(-1, G.shape[-1]).T


def blocks_by_module(model: nn.Module, params) -> list[Tensor]:
    """Flat positions of each module's selected own parameters (block-diagonal reference)."""
    names = param_names(model, params)
    groups: dict[str, list[int]] = {}
    off = 0
    for n, p in zip(names, params):
        groups.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).extend(
            range(off, off + p.numel()))
        off += p.numel()
    return [torch.tensor(v) for v in groups.values()]
