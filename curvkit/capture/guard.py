"""The capture guard: check that what was captured reproduces autograd on the same batch.

A fast layer rule is an optimisation of autograd: per layer it gives inputs ``a_{nt}`` and errors
``e_{mt}`` (column ``m = n·R + r`` of ``G``) with ``g_m = vec_r(Σ_t e_{mt} a_{nt}ᵀ)``, where
``e_m`` back-propagates the output seed ``σ_m = σ_{nr}``. For any weights ``w`` over the columns
this implies, by linearity of back-propagation,

    U w = Σ_m w_m g_m  =  ∇_θ Σ_{n,r} w_{nr} ⟨σ_{nr}, f(x_n)⟩            (one extra backward)

with the right-hand side from autograd on the same forward graph. :func:`verify_capture` draws
``w ∼ N(0, I)`` (from its own generator, so the user's randomness is untouched), computes both
sides per layer and raises :class:`CaptureMismatchError` naming the layer when they differ by
more than rounding: with ``ε`` the unit roundoff of the computation (float32 matmuls in TF32 or
bfloat16 count as such), a layer fails when

    ‖Pᵀ(U w − ∇)Q‖_F  >  √ε ‖Pᵀ∇Q‖_F + 64 ε K Σ_m |w_m| Σ_t ‖e_{mt}‖ ‖a_{nt}‖

with random Gaussian ``P`` (``d_out × K``), ``Q`` (``d_in × K``), ``K = 8`` (a nonzero difference
survives the projection with probability one; ``E‖PᵀXQ‖_F = O(K‖X‖_F)``, so the reported ratio
estimates ``‖U w − ∇‖/‖∇‖``); the second term bounds the rounding of the sums. Anything a
rule does not see breaks the identity: a subclass with its own forward, a forward hook changing
the layer's input or output, an in-place change of a recorded tensor, a parameter also used
outside the layer, a wrong batch dimension. Its cost is one backward to the parameters plus
``O(N T (d_in + d_out) K)`` per layer; no ``P × M`` matrix is formed.

:class:`CheckSchedule` tells optimizers when to check: at the first factor update and whenever
the model's module structure (:func:`structure_signature`) has changed since the last check.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvkit.capture.layers import LayerAdapter

__all__ = ["CaptureMismatchError", "verify_capture", "guard_tolerance", "structure_signature",
           "CheckSchedule", "layer_params"]

_SEED = 0x5EED
_PROBES = 8  # random projections per layer


class CaptureMismatchError(RuntimeError):
    """The captured factors of a layer do not reproduce autograd's gradient."""


def guard_tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    """``(relative, rounding)`` tolerances ``(√ε, 64 ε)`` for computations in ``dtype``.

    ``ε`` is the unit roundoff of ``dtype``; for float32 it is that of TF32 when CUDA matmuls or
    cuDNN may use TF32, and of bfloat16 under ``torch.set_float32_matmul_precision("medium")``.
    """
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            eps = torch.finfo(torch.bfloat16).eps
        elif torch.device(device).type == "cuda" and (
                precision == "high" or torch.backends.cuda.matmul.allow_tf32
                or torch.backends.cudnn.allow_tf32):
            eps = 2.0**-10
    return math.sqrt(eps), 64 * eps


def layer_params(layers: Sequence[LayerAdapter]) -> list[Tensor]:
    """The selected parameters of ``layers`` (weight, then bias), each once."""
    out: dict[int, Tensor] = {}
    for layer in layers:
        for p in layer.parameters():
            out.setdefault(id(p), p)
    return list(out.values())


def _layer_grad(layer: LayerAdapter, grads: dict[int, Tensor]) -> Tensor:
    return layer.block_gradient(grads)  # the layer's (d_out, d_in) block, in its rule's layout


def _hint(layer: LayerAdapter) -> str:
    return (f"The fast {type(layer.module).__name__} rule does not fit how the model uses this "
            "layer (e.g. a custom forward, a forward hook that changes its input or output, its "
            "parameter also used outside the layer, or a batch dimension that is not dimension 0 "
            "-- feed layers batch-first inputs). Freeze its parameters (requires_grad_(False)) or "
            "pass params=[...] without them; check=False skips this check and risks wrong "
            "curvature.")


def verify_capture(
    layers: Sequence[LayerAdapter],
    a: Sequence[Tensor],
    e: Sequence[Tensor],
    outputs: Tensor,
    seeds: Tensor,
    *,
    retain_graph: bool = True,
    tolerance: tuple[float, float] | None = None,
    per_sample: bool = True,
    backward=None,
) -> dict[str, float]:
    """Check ``U w = ∇_θ Σ_m w_m ⟨σ_m, f⟩`` per layer for random ``w`` (see the module doc).

    Args:
        layers: the captured layers.
        a: per layer inputs ``(N, T, d_in)``.
        e: per layer errors ``(N·R, T, d_out)``, column ``m = n·R + r`` from seed ``σ_{nr}``.
        outputs: the model outputs ``f`` ``(N, C)`` whose graph produced ``e`` (still alive).
        seeds: ``(N, R, C)`` the output seeds behind ``e`` (any scaling folded in).
        retain_graph: keep the forward graph after the extra backward.
        tolerance: ``(relative, rounding)``; default :func:`guard_tolerance` of the outputs.
        per_sample: draw ``w_{nr}`` independently per sample (checks the assignment of
            locations to samples too). ``False`` uses ``w_{nr} = w_r``, for batch-coupled models
            (train-mode BatchNorm), whose errors are not per-sample.
        backward: ``backward(v) -> {id(param): grad}`` replacing ``torch.autograd.grad`` (for
            graphs that only ``.backward()`` can traverse, e.g. reentrant checkpointing).

    Returns:
        ``{layer name: relative error ‖Pᵀ(U w − ∇)Q‖ / ‖Pᵀ∇Q‖}`` (``0`` where both are zero).

    Raises:
        CaptureMismatchError: a layer's captured factors do not reproduce autograd; the message
            names the layer, its type, the relative error and what to do.
    """
    N, R = seeds.shape[:2]
    rel_tol, abs_tol = tolerance or guard_tolerance(outputs.dtype, outputs.device)
    gen = torch.Generator(device=outputs.device).manual_seed(_SEED)
    w = torch.randn(N if per_sample else 1, R, generator=gen, device=outputs.device,
                    dtype=outputs.dtype).expand(N, R)
    params = layer_params(layers)
    v = torch.einsum("nr,nr...->n...", w, seeds.to(outputs.dtype))
    grads_list: Sequence[Tensor | None]
    if backward is None:
        grads_list = torch.autograd.grad(outputs, params, grad_outputs=v,
                                         retain_graph=retain_graph, allow_unused=True)
    else:
        got = backward(v)
        grads_list = [got.get(id(p)) for p in params]
    grads = {id(p): torch.zeros_like(p) if g is None else g for p, g in zip(params, grads_list)}
    report: dict[str, float] = {}
    for layer, al, el in zip(layers, a, e):
        if al.dim() != 3 or el.dim() != 3 or al.shape[0] != N or el.shape[0] != N * R \
                or al.shape[1] != el.shape[1]:
            raise CaptureMismatchError(
                f"Capture check failed for layer {layer.describe()}: its inputs have shape "
                f"{tuple(al.shape)} and errors {tuple(el.shape)}, not (N={N}, T, d_in) and "
                f"(N·R={N * R}, T, d_out). " + _hint(layer))
        T = al.shape[1]
        ew = (el.reshape(N, R, T, -1) * w[:, :, None, None].to(el.dtype)).sum(1)  # (N, T, o)
        g = _layer_grad(layer, grads).to(ew.dtype)
        # compare both sides through K random projections Pᵀ(·)Q (o×K, d×K): Pᵀ U w Q costs
        # O(N T (o + d) K) instead of the d_out × d_in product; any difference survives a.s.
        P = torch.randn(g.shape[0], _PROBES, generator=gen, device=g.device, dtype=g.dtype)
        Q = torch.randn(g.shape[1], _PROBES, generator=gen, device=g.device, dtype=g.dtype)
        UwP = (ew.reshape(N * T, -1) @ P).T @ layer.project_inputs(al, Q)  # Pᵀ (U w) Q
        gP = P.T @ g @ Q
        bound = _PROBES * (w.abs().to(el.dtype)[:, :, None] * torch.linalg.vector_norm(
            el, dim=-1).reshape(N, R, T) * layer.input_norms(al, el.dtype)[:, None, :]).sum()
        err = float(torch.linalg.vector_norm(UwP - gP))
        ref = float(torch.linalg.vector_norm(gP))
        rel = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
        report[layer.name] = rel
        if not math.isfinite(err) or err > rel_tol * ref + abs_tol * float(bound):
            raise CaptureMismatchError(
                f"Capture check failed for layer {layer.describe()}: the captured per-sample "
                f"gradients do not reproduce autograd's gradient on this batch (relative error "
                f"{rel:.3g}, tolerance {rel_tol:.1g}). " + _hint(layer))
    return report


def structure_signature(model: nn.Module) -> int:
    """A hash of the module tree: names, module identities and types, instance forwards."""
    return hash(tuple((name, id(m), type(m), id(m.__dict__.get("forward")))
                      for name, m in model.named_modules()))


class CheckSchedule:
    """When an optimizer checks its capture: first time, and after the module structure changed.

    Args:
        model: the network.
        enabled: ``False`` never checks.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self._model = weakref.ref(model)
        self.enabled = enabled
        self._checked: int | None = None

    def due(self) -> bool:
        """Whether the next capture should be verified."""
        model = self._model()
        return self.enabled and model is not None and self._checked != structure_signature(model)

    def passed(self) -> None:
        """Record a successful check of the current structure."""
        model = self._model()
        if model is not None:
            self._checked = structure_signature(model)
