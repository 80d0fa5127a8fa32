"""Forward hooks that record layer inputs and outputs: the only place curvkit registers hooks.

:func:`record` is a context manager: inside it, each forward call of a tracked layer stores its
input (detached) and its output tensor (attached, so back-propagated errors ``∂ℓ/∂s`` can be taken
with ``torch.autograd.grad`` w.r.t. it without touching ``.grad`` of any parameter). The handles
are removed in ``finally``, also when the forward raises.

:class:`Recorder` is the persistent variant used by optimizers: hooks stay registered until
:meth:`Recorder.remove` (or garbage collection) and can be switched on and off.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvkit.capture.layers import LayerAdapter


class WeightSharingError(RuntimeError):
    """A tracked layer was called more than once in one forward pass."""


@dataclass
class Records:
    """What one forward pass left behind, per tracked layer (same order as the layers)."""

    inputs: list[Tensor | None] = field(default_factory=list)
    outputs: list[Tensor | None] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def check_complete(self, layers: Sequence[LayerAdapter]) -> None:
        for layer, n in zip(layers, self.calls):
            if n == 0:
                raise RuntimeError(
                    f"Layer {layer.describe()} holds selected parameters but was not called in "
                    "the forward pass; exclude its parameters with params=[...]"
                )


def _make_hook(records: Records, i: int, layer: LayerAdapter, keep_output: bool):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        records.calls[i] += 1
        if records.calls[i] > 1:
            raise WeightSharingError(
                f"Layer {layer.describe()} was called {records.calls[i]} times in one forward "
                "pass (weight sharing); curvkit captures each layer once per forward. Use a "
                "separate module per call, or freeze its parameters."
            )
        if not isinstance(output, Tensor):
            raise TypeError(f"Layer {layer.describe()} returned {type(output).__name__}")
        records.inputs[i] = layer.inputs(args[0])
        records.outputs[i] = output if keep_output else None

    return hook


@contextmanager
def record(layers: Sequence[LayerAdapter], keep_outputs: bool = True) -> Iterator[Records]:
    """Record inputs (as ``a``, see :class:`LayerAdapter`) and outputs of ``layers``.

    Args:
        layers: the tracked layers.
        keep_outputs: keep the (attached) output tensors for ``autograd.grad``.

    Yields:
        A :class:`Records` filled during the forward passes made inside the ``with`` block.
    """
    n = len(layers)
    records = Records([None] * n, [None] * n, [0] * n)
    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(
                layer.module.register_forward_hook(_make_hook(records, i, layer, keep_outputs))
            )
        yield records
    finally:
        for h in handles:
            h.remove()


def layer_errors(
    outputs: Tensor, records: Records, layers: Sequence[LayerAdapter], seeds: Tensor
) -> list[Tensor]:
    """Back-propagate output seeds to every layer: ``e = (∂s_l/∂f)ᵀ seed`` per seed.

    Args:
        outputs: model outputs ``f`` of shape ``(N, C)`` (graph retained).
        records: from :func:`record` (with outputs kept).
        layers: the tracked layers.
        seeds: ``(N, R, C)``; seed ``r`` of input ``n`` is back-propagated on its own.

    Returns:
        Per layer ``e`` of shape ``(N·R, T, d_out)`` ordered input-major (``m = n·R + r``).
    """
    N, R = seeds.shape[:2]
    targets = [o for o in records.outputs]
    per_seed: list[list[Tensor]] = []
    for r in range(R):
        grads = torch.autograd.grad(
            outputs, targets, grad_outputs=seeds[:, r], retain_graph=True, allow_unused=True
        )
        per_seed.append(
            [
                layer.errors(g) if g is not None else layer.errors(torch.zeros_like(o))
                for layer, g, o in zip(layers, grads, targets)
            ]
        )
    errs = []
    for li in range(len(layers)):
        e = torch.stack([per_seed[r][li] for r in range(R)], dim=1)  # (N, R, T, d_out)
        errs.append(e.reshape(N * R, *e.shape[2:]))
    return errs


class Recorder:
    """Persistent forward hooks for optimizers: record ``a`` (and outputs) while enabled.

    Args:
        layers: the tracked layers.
        keep_outputs: also keep output tensors (for an extra backward pass, e.g. KFAC).

    Hooks are removed by :meth:`remove`, and automatically when the recorder is collected.
    Only forwards with gradients enabled are recorded; the latest call of a layer wins.
    """

    def __init__(self, layers: Sequence[LayerAdapter], keep_outputs: bool = False) -> None:
        self.layers = list(layers)
        self.keep_outputs = keep_outputs
        self.enabled = True
        self.records = Records([None] * len(layers), [None] * len(layers), [0] * len(layers))
        self._handles = []
        ref = weakref.ref(self)
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(_persistent_hook(ref, i)))
        self._finalizer = weakref.finalize(self, _remove_handles, list(self._handles))

    def reset(self) -> None:
        """Forget what was recorded (call before each forward)."""
        n = len(self.layers)
        self.records = Records([None] * n, [None] * n, [0] * n)

    def remove(self) -> None:
        """Remove all hooks (idempotent)."""
        self._finalizer()

    @property
    def active(self) -> bool:
        return self._finalizer.alive


def _persistent_hook(ref, i: int):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        self = ref()
        if self is None or not self.enabled or not torch.is_grad_enabled():
            return
        if module is not self.layers[i].module:  # a deepcopy of the model carries the hook along
            return
        self.records.calls[i] = 0  # persistent mode: the latest forward call wins
        _make_hook(self.records, i, self.layers[i], self.keep_outputs)(module, args, output)

    return hook


def _remove_handles(handles) -> None:
    for h in handles:
        h.remove()
