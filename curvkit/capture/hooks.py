"""Forward hooks that record layer inputs and outputs: the only place curvkit registers hooks.

:func:`record` is a context manager: inside it, each forward call of a tracked layer stores its
input (detached, as ``a``) and its output tensor (attached, so back-propagated errors ``∂ℓ/∂s``
can be taken with ``torch.autograd.grad`` w.r.t. it without touching ``.grad`` of any
parameter). The handles are removed in ``finally``, also when the forward raises.

Three things make the recorded tensors mean what they say:

* **In-place operations after a layer** (``ReLU(inplace=True)`` and friends) would overwrite the
  recorded output tensor and re-point its autograd history, so ``autograd.grad`` w.r.t. it would
  return the gradient w.r.t. the *activation*. While outputs are kept, the hook therefore hands
  the rest of the model a copy (``output.clone()``) and keeps the untouched original: errors are
  ``∂f/∂s`` of the layer's own output. (One copy of each tracked layer's output per forward.)
* **Several calls of a layer in one forward** (weight sharing, or modules tied to one weight, see
  :func:`~curvkit.capture.layers.find_layers`) are *uses*: their inputs and outputs are
  concatenated along the location axis ``t``, so ``Σ_t e_{mt} a_{nt}ᵀ`` is the per-sample
  gradient summed over the uses.
* **Recomputation is not a use**: forwards run by autograd during a backward pass (activation
  checkpointing recomputes segments there) are ignored.

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

from curvkit.capture.guard import CheckSchedule, verify_capture
from curvkit.capture.layers import LayerAdapter
from curvkit.linalg.finite import all_finite


class WeightSharingError(RuntimeError):
    """A tracked layer was used in a way its captured uses cannot represent."""


class CheckpointError(RuntimeError):
    """A tracked layer ran outside the autograd graph of the capture."""


def in_backward() -> bool:
    """Whether the caller runs inside an autograd backward pass (e.g. checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class Records:
    """What one forward pass left behind, per tracked layer (same order as the layers).

    Attributes:
        inputs: per layer ``a`` of shape ``(N, T, d_in)``; with several uses their locations are
            concatenated (``T = T_1 + T_2 + …``).
        outputs: per layer the (attached) output tensor of each use, or ``None``.
        calls: per layer the number of uses recorded.
        batch_size: ``N`` of the batch, used to find the batch dimension of layer inputs
            (``None``: dimension 0).
    """

    inputs: list[Tensor | None] = field(default_factory=list)
    outputs: list[tuple[Tensor, ...] | None] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    batch_size: int | None = None
    _watch: list[list[tuple[Tensor, int]]] = field(default_factory=list)
    #: per layer, indices of uses that ran with gradients disabled (reentrant checkpointing)
    ungraphed: list[list[int]] = field(default_factory=list)
    route: BackwardRoute | None = None

    @classmethod
    def empty(cls, n: int, batch_size: int | None = None) -> Records:
        """Records for ``n`` layers with nothing recorded yet."""
        return cls([None] * n, [None] * n, [0] * n, batch_size, [[] for _ in range(n)],
                   [[] for _ in range(n)])

    def check_complete(self, layers: Sequence[LayerAdapter]) -> None:
        """Raise if a layer was not called, or if its recorded input was modified in place."""
        for layer, n in zip(layers, self.calls):
            if n == 0:
                raise RuntimeError(
                    f"Layer {layer.describe()} holds selected parameters but was not called in "
                    "the forward pass; exclude its parameters with params=[...]"
                )
        for layer, watched in zip(layers, self._watch):
            for x, version in watched:
                if x._version != version:
                    raise RuntimeError(
                        f"The input of layer {layer.describe()} was modified in place after the "
                        "layer ran, so the recorded input is not the one the layer used. Avoid "
                        "in-place operations on tensors that feed a Linear/Conv2d layer (e.g. "
                        "use x = x * 2 instead of x.mul_(2))."
                    )


def _add_use(records: Records, i: int, layer: LayerAdapter, module: nn.Module, args: tuple,
             output: Tensor, keep_output: bool) -> Tensor | None:
    """Record one use of layer ``i``; returns the tensor the model continues with (or ``None``)."""
    if not isinstance(output, Tensor):
        raise TypeError(f"Layer {layer.describe()} returned {type(output).__name__}")
    x = args[0]
    output = layer.per_sample_output(x, output, records.batch_size)
    a = layer.inputs(x, module=module, batch_size=records.batch_size)
    if a.data_ptr() == x.data_ptr():  # a view of the input: it must stay unchanged
        records._watch[i].append((x, x._version))
    prev = records.inputs[i]
    records.inputs[i] = a if prev is None else _cat_uses(layer, prev, a)
    records.calls[i] += 1
    if not keep_output:
        return None
    records.outputs[i] = (records.outputs[i] or ()) + (output,)
    # the model continues with a copy: in-place ops downstream must not touch the recorded output
    return output.clone()


def _cat_uses(layer: LayerAdapter, prev: Tensor, new: Tensor) -> Tensor:
    if prev.shape[0] != new.shape[0]:
        raise WeightSharingError(
            f"Layer {layer.describe()} was used twice in one forward pass with different batch "
            f"sizes ({prev.shape[0]} and {new.shape[0]}); curvkit treats each use as extra "
            "locations of the same samples. Use a separate module per call or freeze its "
            "parameters."
        )
    return torch.cat([prev, new], dim=1)


def _make_hook(records: Records, i: int, layer: LayerAdapter, keep_output: bool):
    def hook(module: nn.Module, args: tuple, output: Tensor):
        if in_backward():  # checkpoint recomputation: not a use
            return records.route.recomputed(i, output) if records.route is not None else None
        if keep_output and not torch.is_grad_enabled():
            records.ungraphed[i].append(records.calls[i])  # (reentrant checkpoint) see capture
        return _add_use(records, i, layer, module, args, output, keep_output)

    return hook


def register(layers: Sequence[LayerAdapter], make_hook) -> list:
    """Register ``make_hook(i, layer)`` as forward hook on every module of every layer."""
    handles = []
    for i, layer in enumerate(layers):
        for module in layer.modules:
            handles.append(module.register_forward_hook(make_hook(i, layer)))
    return handles


@contextmanager
def record(layers: Sequence[LayerAdapter], keep_outputs: bool = True,
           batch_size: int | None = None) -> Iterator[Records]:
    """Record inputs (as ``a``, see :class:`LayerAdapter`) and outputs of ``layers``.

    Args:
        layers: the tracked layers.
        keep_outputs: keep the (attached) output tensors for ``autograd.grad``.
        batch_size: ``N``, to find the batch dimension of each layer input (default: dim 0).

    Yields:
        A :class:`Records` filled during the forward passes made inside the ``with`` block.
    """
    records = Records.empty(len(layers), batch_size)
    handles = []
    try:
        handles = register(layers, lambda i, layer: _make_hook(records, i, layer, keep_outputs))
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
        Per layer ``e`` of shape ``(N·R, T, d_out)`` ordered input-major (``m = n·R + r``); the
        uses of a layer are concatenated along ``T`` in call order, like its inputs.
    """
    N, R = seeds.shape[:2]
    uses = [(li, o) for li, outs in enumerate(records.outputs) for o in (outs or ())]
    targets = [o for _, o in uses]
    per_seed: list[list[Tensor]] = []
    for r in range(R):
        grads = torch.autograd.grad(
            outputs, targets, grad_outputs=seeds[:, r], retain_graph=True, allow_unused=True
        )
        per_layer: list[list[Tensor]] = [[] for _ in layers]
        for (li, o), g in zip(uses, grads):
            layer = layers[li]
            per_layer[li].append(layer.errors(g if g is not None else torch.zeros_like(o),
                                              batch_size=N))
        per_seed.append([torch.cat(es, dim=1) if len(es) > 1 else es[0] for es in per_layer])
    errs = []
    for li in range(len(layers)):
        e = torch.stack([per_seed[r][li] for r in range(R)], dim=1)  # (N, R, T, d_out)
        errs.append(e.reshape(N * R, *e.shape[2:]))
    return errs


class BackwardRoute:
    """Errors through ``.backward()`` for graphs ``autograd.grad`` cannot traverse.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` runs its segment without gradients and
    recomputes it inside ``.backward()`` only. Here each seed is back-propagated with
    ``torch.autograd.backward``; tensor hooks on the kept layer outputs, and on the outputs
    recomputed during that backward (matched to the uses in call order), collect ``∂f/∂s``. The
    ``.grad`` of every leaf is saved before and restored after (:meth:`run`), so nothing the
    user sees changes.

    Args:
        records: from :func:`record`.
        leaves: every leaf tensor a backward can reach (the model's parameters, input tensors).
    """

    def __init__(self, records: Records, leaves: Sequence[Tensor]) -> None:
        self.records = records
        self.leaves = [t for t in leaves if t.requires_grad]
        self.grads: dict[tuple[int, int], Tensor] = {}
        self._seen: list[int] = []

    def recomputed(self, i: int, output: Tensor) -> Tensor:
        """Forward hook during a backward: watch the recomputed output of a no-grad use."""
        k = self._seen[i]
        self._seen[i] += 1
        uses = self.records.ungraphed[i]
        if k < len(uses) and output.requires_grad:
            key = (i, uses[k])
            output.register_hook(lambda g, key=key: self.grads.__setitem__(key, g))
            return output.clone()
        return output

    def run(self, outputs: Tensor, v: Tensor) -> dict[tuple[int, int], Tensor]:
        """``.backward()`` of ``⟨v, outputs⟩``; returns ``{(layer, use): ∂/∂s}``.

        The leaves' ``.grad`` afterwards hold this backward's gradients (see :meth:`param_grads`).
        """
        self.grads = {}
        self._seen = [0] * len(self.records.calls)
        handles = []
        for i, outs in enumerate(self.records.outputs):
            for k, o in enumerate(outs or ()):
                if o.requires_grad:
                    handles.append(o.register_hook(
                        lambda g, key=(i, k): self.grads.__setitem__(key, g)))
        saved = [t.grad for t in self.leaves]
        for t in self.leaves:
            t.grad = None
        self.records.route = self
        try:
            torch.autograd.backward(outputs, v, retain_graph=True)
            self.leaf_grads = {id(t): t.grad for t in self.leaves}
        finally:
            self.records.route = None
            for h in handles:
                h.remove()
            for t, g in zip(self.leaves, saved):
                t.grad = g
        return self.grads


def errors_by_backward(outputs: Tensor, records: Records, layers: Sequence[LayerAdapter],
                       seeds: Tensor, route: BackwardRoute) -> list[Tensor]:
    """:func:`layer_errors` through :class:`BackwardRoute` (one ``.backward()`` per seed)."""
    N, R = seeds.shape[:2]
    per_seed = []
    for r in range(R):
        got = route.run(outputs, seeds[:, r])
        per_layer = []
        for li, (layer, outs) in enumerate(zip(layers, records.outputs)):
            es = [layer.errors(got.get((li, k), torch.zeros_like(o)), batch_size=N)
                  for k, o in enumerate(outs or ())]
            per_layer.append(torch.cat(es, dim=1) if len(es) > 1 else es[0])
        per_seed.append(per_layer)
    errs = []
    for li in range(len(layers)):
        e = torch.stack([per_seed[r][li] for r in range(R)], dim=1)
        errs.append(e.reshape(N * R, *e.shape[2:]))
    return errs


class Recorder:
    """Persistent forward hooks for optimizers: record ``a`` (and outputs) while enabled.

    Args:
        layers: the tracked layers.
        keep_outputs: also keep output tensors (for an extra backward pass, e.g. KFAC).
        model: the whole model. When given, a forward pre-hook on it starts a fresh record at
            each top-level forward, so several uses of a layer within one forward are all
            recorded (weight sharing), and a forward hook runs the capture guard
            (:func:`~curvkit.capture.guard.verify_capture` with one random output seed per
            input, one extra backward) on the first recorded forward and whenever the module
            structure changed (:class:`~curvkit.capture.guard.CheckSchedule`). Without it the
            latest call of a layer wins and nothing is checked.
        check: run the guard (with ``model``).

    Hooks are removed by :meth:`remove`, and automatically when the recorder is collected.
    Only forwards with gradients enabled are recorded (recomputations in a backward pass are
    not).

    Raises:
        CaptureMismatchError: from the model's forward, when the guard finds a layer whose
            recorded inputs/errors do not reproduce autograd.
    """

    def __init__(self, layers: Sequence[LayerAdapter], keep_outputs: bool = False,
                 model: nn.Module | None = None, check: bool = True) -> None:
        self.layers = list(layers)
        self.keep_outputs = keep_outputs
        self.enabled = True
        self.records = Records.empty(len(self.layers))
        self._per_forward = model is not None
        self.schedule = CheckSchedule(model, enabled=check) if model is not None else None
        self._checking = False
        self._in_forward = False
        ref = weakref.ref(self)
        self._handles = register(self.layers, lambda i, layer: _persistent_hook(ref, i))
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(_start_hook(ref, model)))
            self._handles.append(model.register_forward_hook(_guard_hook(ref, model)))
        self._finalizer = weakref.finalize(self, _remove_handles, list(self._handles))

    def reset(self) -> None:
        """Forget what was recorded (call before each forward)."""
        self.records = Records.empty(len(self.layers))

    def remove(self) -> None:
        """Remove all hooks (idempotent)."""
        self._finalizer()

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return self._finalizer.alive


def in_functorch() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, …) is running.

    Its forwards are the user's own analysis of the model, not training forwards to record.
    """
    return torch._C._functorch.peek_interpreter_stack() is not None


def _recording(self: Recorder | None) -> bool:
    return (self is not None and self.enabled and torch.is_grad_enabled()
            and not in_backward() and not in_functorch())


def _recording_layer(self: Recorder | None) -> bool:
    """Layer hooks also see no-grad calls inside a recorded model forward (to refuse them)."""
    return (self is not None and self.enabled and not in_backward() and not in_functorch()
            and (torch.is_grad_enabled() or self._in_forward))


def _start_hook(ref, model: nn.Module):
    model_ref = weakref.ref(model)

    def hook(module: nn.Module, args: tuple) -> None:
        self = ref()
        if _recording(self) and module is model_ref():
            self.reset()
            self._in_forward = True
            self._checking = self.schedule is not None and self.schedule.due()

    return hook


def _guard_hook(ref, model: nn.Module):
    model_ref = weakref.ref(model)

    def hook(module: nn.Module, args: tuple, output) -> None:
        self = ref()
        if self is None or module is not model_ref():
            return
        self._in_forward = False
        if not _recording(self) or not self._checking:
            return
        self._checking = False
        rec = self.records
        out = getattr(output, "logits", output)
        if not isinstance(out, Tensor) or not out.requires_grad or out.dim() == 0 \
                or any(o is None for o in rec.outputs):
            return  # nothing to check against (the optimizer reports missing layers itself)
        flat = out.reshape(out.shape[0], -1)
        if not all_finite(flat.detach()):
            return  # the optimizer refuses the step with its own message
        gen = torch.Generator(device=flat.device).manual_seed(0)
        seeds = torch.randn(flat.shape[0], 1, flat.shape[1], generator=gen, device=flat.device,
                            dtype=flat.dtype)
        errors = layer_errors(flat, rec, self.layers, seeds)
        verify_capture(self.layers, rec.inputs, errors, flat, seeds, retain_graph=True,
                       per_sample=not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                          and m.training for m in module.modules()))
        if not self.keep_outputs:
            rec.outputs = [None] * len(self.layers)
        self.schedule.passed()

    return hook


def _persistent_hook(ref, i: int):
    def hook(module: nn.Module, args: tuple, output: Tensor):
        self = ref()
        if not _recording_layer(self):
            return None
        layer = self.layers[i]
        if all(module is not m for m in layer.modules):  # a deepcopy carries the hook along
            return None
        if self.keep_outputs and not torch.is_grad_enabled():
            raise CheckpointError(
                f"Layer {layer.describe()} ran with gradients disabled inside the model's forward "
                "(torch.no_grad() in the model, or torch.utils.checkpoint with "
                "use_reentrant=True), so the optimizer cannot take its errors. Use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or freeze the "
                "layer's parameters."
            )
        if not (self._per_forward and self._in_forward):  # outside a model forward: latest wins
            self.records.inputs[i], self.records.outputs[i] = None, None
            self.records.calls[i], self.records._watch[i] = 0, []
        return _add_use(self.records, i, layer, module, args, output,
                        self.keep_outputs or self._checking)

    return hook


def _remove_handles(handles) -> None:
    for h in handles:
        h.remove()
