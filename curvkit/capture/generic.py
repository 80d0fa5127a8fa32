"""The generic route: per-sample gradients with ``torch.func`` for parameters without a rule.

For the parameters ``θ_g`` of modules without a layer rule (PReLU, RNN/LSTM/GRU,
MultiheadAttention, parametrizations such as weight_norm, subclasses of Linear/Conv that
override ``forward``, a weight tied between modules, …) the columns of ``G`` are formed
explicitly::

    G_g[:, m] = ∂⟨σ_m, f(x_n; θ)⟩/∂θ_g        m = n·R + r

with the same output seeds ``σ_m`` (Fisher scaling folded in) the hooks back-propagate, by
``torch.func``: ``functional_call`` on one input at a time, ``vjp`` from the ``R`` seeds
(``vmap`` over them), ``vmap`` over the inputs of a chunk. A model ``torch.func`` cannot vmap
(data-dependent control flow, unsupported in-place ops) is handled by a loop over inputs with
``torch.autograd.grad`` (``route="loop"``; ``"auto"`` falls back to it). The result is
``e`` of shape ``(M, 1, P_g)`` with ``a = 1`` (explicit form), so ``full``, ``block_diag``,
``diag`` and KFAC's exact-block fallback are exact for every ``torch.func``-traceable model.

Memory: ``M·P_g`` numbers are kept; beyond the available memory (or ``budget_gb``) the capture
is refused with the estimate before anything is computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten
from typing_extensions import override

from curvkit.capture.inputs import OutputFn, as_logits, forward, slice_inputs
from curvkit.capture.rules.base import ExplicitAdapter
from curvkit.linalg.memory import available_memory_bytes

#: Bytes of intermediate per-sample gradients materialised at once.
CHUNK_BYTES = 2**27
ROUTES = ("auto", "vmap", "loop")


@dataclass(eq=False)
class GenericAdapter(ExplicitAdapter):
    """Selected own parameters of one module, captured by ``torch.func`` (module docstring).

    Attributes:
        param_names: qualified names of the parameters in the model (``named_parameters``).
        params: the parameters, in that order.
        reason: why the generic route is used (shown in messages).
    """

    param_names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    reason: str = "no layer rule"

    hooked: ClassVar[bool] = False
    family: ClassVar[str] = "generic"

    @override
    def parameters(self) -> list[nn.Parameter]:
        return list(self.params)

    @override
    def describe(self) -> str:
        return f"'{self.name or '<model>'}' ({type(self.module).__name__}, generic: {self.reason})"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def check_generic_memory(adapters: Sequence[GenericAdapter], columns: int, element_size: int,
                         device: torch.device, budget_gb: float | None = None) -> None:
    """Refuse (``MemoryError`` with a GB estimate) if ``columns × P_g`` numbers do not fit."""
    P = sum(ad.d_out for ad in adapters)
    need = 2 * columns * P * element_size
    limit = budget_gb * 1e9 if budget_gb is not None else 0.9 * available_memory_bytes(device)
    if need > limit:
        names = ", ".join(ad.describe() for ad in adapters[:5])
        more = f" and {len(adapters) - 5} more" if len(adapters) > 5 else ""
        raise MemoryError(
            f"the generic route needs {_gb(need)} GB for {columns} per-sample gradient columns of "
            f"{P} parameters without a layer rule ({names}{more}), but the limit is "
            f"{_gb(limit)} GB; use a smaller batch or kind='mc'/'empirical' (fewer columns), "
            "freeze these parameters, or register a layer rule (curvkit.capture.register_rule)"
        )


def generic_columns(
    model: nn.Module,
    inputs: Any,
    adapters: Sequence[GenericAdapter],
    seeds: Tensor,
    route: str = "auto",
    budget_gb: float | None = None,
    output_fn: OutputFn | None = None,
) -> list[Tensor]:
    """Per adapter ``e`` of shape ``(N·R, 1, P_l)``: the explicit columns of ``G``.

    Args:
        model: the network.
        inputs: the batch: a tensor ``(N, …)``, a tuple or a dict (:mod:`curvkit.capture.inputs`).
        adapters: the generic adapters.
        seeds: ``(N, R, *output_shape[1:])`` output seeds (scaling folded in).
        route: ``"auto"`` (vmap, falling back to the loop), ``"vmap"`` or ``"loop"``.
        budget_gb: memory limit for the columns (default: 90 % of the available memory).
        output_fn: maps the model output to the logits (default: tensor or ``.logits``).

    Raises:
        MemoryError: the columns would not fit (the message has the estimate).
    """
    if route not in ROUTES:
        raise ValueError(f"generic route must be one of {ROUTES}, got {route!r}")
    if not adapters:
        return []
    N, R = seeds.shape[:2]
    dtype = seeds.dtype
    check_generic_memory(adapters, N * R, dtype.itemsize if hasattr(dtype, "itemsize")
                         else seeds.element_size(), seeds.device, budget_gb)
    names = [n for ad in adapters for n in ad.param_names]
    params = [p for ad in adapters for p in ad.params]
    if route in ("auto", "vmap"):
        try:
            flat = _vmap_columns(model, inputs, names, params, seeds, output_fn)
        except Exception:
            if route == "vmap":
                raise
            flat = _loop_columns(model, inputs, params, seeds, output_fn)
    else:
        flat = _loop_columns(model, inputs, params, seeds, output_fn)
    out, start = [], 0
    for ad in adapters:
        stop = start + ad.d_out
        out.append(flat[:, start:stop].unsqueeze(1))
        start = stop
    return out


def _chunk(N: int, R: int, P: int, element_size: int) -> int:
    return max(1, min(N, CHUNK_BYTES // max(1, 4 * R * P * element_size)))


def _call(model: nn.Module, theta: dict[str, Tensor], inputs: Any) -> Any:
    """``model`` on ``inputs`` (tensor / tuple / dict) with the parameters ``theta`` swapped in."""
    if isinstance(inputs, Tensor):
        return functional_call(model, theta, (inputs,))
    if isinstance(inputs, Mapping):
        return functional_call(model, theta, (), dict(inputs))
    return functional_call(model, theta, tuple(inputs))


def _vmap_columns(model: nn.Module, inputs: Any, names: list[str], params: Sequence[Tensor],
                  seeds: Tensor, output_fn: OutputFn | None) -> Tensor:
    """``(N·R, P_g)`` by ``vmap`` over inputs of ``vjp`` from ``vmap``-ed seeds."""
    N, R = seeds.shape[:2]
    theta = {n: p.detach() for n, p in zip(names, params)}
    leaves, spec = tree_flatten(inputs)
    batched = [isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == N for v in leaves]

    def one(th: dict[str, Tensor], xs: list, s: Tensor) -> Tensor:
        args = [v.unsqueeze(0) if b else v for v, b in zip(xs, batched)]
        x1 = tree_unflatten(args, spec)

        def f(t):
            return as_logits(_call(model, t, x1), output_fn)[0]

        pull = vjp(f, th)[1]
        g = vmap(pull)(s)[0]  # name -> (R, *shape)
        return torch.cat([g[n].reshape(s.shape[0], -1) for n in names], dim=1)

    P = sum(p.numel() for p in params)
    c = _chunk(N, R, P, seeds.element_size())
    dims = [0 if b else None for b in batched]
    parts = []
    with torch.enable_grad():
        for i in range(0, N, c):
            xs = [v[i:i + c] if b else v for v, b in zip(leaves, batched)]
            parts.append(vmap(one, in_dims=(None, dims, 0))(theta, xs, seeds[i:i + c]))
    return torch.cat(parts).reshape(N * R, P).detach()


def _loop_columns(model: nn.Module, inputs: Any, params: Sequence[Tensor], seeds: Tensor,
                  output_fn: OutputFn | None) -> Tensor:
    """``(N·R, P_g)`` by one forward per input and ``R`` backward passes (``autograd.grad``)."""
    N, R = seeds.shape[:2]
    rows = []
    with torch.enable_grad():
        for n in range(N):
            out = forward(model, slice_inputs(inputs, n, n + 1), output_fn)
            for r in range(R):
                gs = torch.autograd.grad(out, params, grad_outputs=seeds[n:n + 1, r].to(out.dtype),
                                         retain_graph=r + 1 < R, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for g, p in zip(gs, params)]))
    return torch.stack(rows).detach()
