"""Persistent hooks on the whole model for optimizers (companions of :class:`Recorder`).

* :class:`ErrorRecorder`: a forward hook on the model. Right after each grad-enabled forward
  (while enabled), it back-propagates Fisher output seeds (sampled labels for ``kind="mc"``, the
  loss-Hessian square root for ``kind="exact"``; see :mod:`curvkit.capture.targets`) from the
  model output to the layer outputs kept by a :class:`Recorder` (``keep_outputs=True``), with
  ``retain_graph=True``, so the user's own ``loss.backward()`` still works. It stores the errors
  ``e`` per layer, shape ``(N·R, T, d_out)``, with the ``1/√(N·S)`` scaling folded in. Only the
  layer outputs are differentiated: no parameter ``.grad`` is touched.
* :class:`InputRecorder`: a forward pre-hook on the model that keeps (detached) the first
  positional input of the latest grad-enabled forward, for optimizers that rebuild curvature on
  a batch (the natural gradient).

Both hold only weak references from the hooks, and remove their handles on :meth:`remove` or when
they are garbage-collected.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from curvkit.capture.hooks import Recorder, in_functorch, layer_errors
from curvkit.capture.inputs import as_logits
from curvkit.capture.targets import KINDS, LIKELIHOODS, check_choice, output_seeds
from curvkit.linalg.finite import all_finite


class ErrorRecorder:
    """Back-propagate Fisher seeds after each recorded forward of ``model`` (see module doc).

    Args:
        model: the module whose forward output is the network output ``f`` of shape ``(N, C)``
            or ``(N, …, C)`` (a tensor, or an object with ``.logits`` such as a Hugging Face
            ``ModelOutput``).
        recorder: a :class:`Recorder` with ``keep_outputs=True`` on the tracked layers.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        kind: ``"mc"`` or ``"exact"`` (``"empirical"`` needs the data labels, which the model
            never sees).
        generator: the ``torch.Generator`` for MC labels (on the outputs' device).
        mc_samples: MC labels per input.

    Attributes:
        errors: per layer ``e`` of the latest recorded forward, or ``None``.
        nonfinite: whether the latest recorded forward produced non-finite outputs (then no
            errors are computed; the optimizer raises at ``step``).
        generator_state: the generator state before the latest sampling (to undo it when the
            optimizer refuses a step), or ``None``.
        enabled: record only while ``True``.
    """

    def __init__(
        self,
        model: nn.Module,
        recorder: Recorder,
        likelihood: str,
        kind: str,
        generator: torch.Generator | None = None,
        mc_samples: int = 1,
    ) -> None:
        check_choice(likelihood, LIKELIHOODS, "likelihood")
        check_choice(kind, tuple(k for k in KINDS if k != "empirical"), "kind")
        if not recorder.keep_outputs:
            raise ValueError("ErrorRecorder needs a Recorder with keep_outputs=True")
        self.recorder = recorder
        self.likelihood, self.kind = likelihood, kind
        self.generator, self.mc_samples = generator, int(mc_samples)
        self.enabled = True
        self.errors: list[Tensor] | None = None
        self.nonfinite = False
        self.generator_state: Tensor | None = None
        self._model = weakref.ref(model)
        handle = model.register_forward_hook(_error_hook(weakref.ref(self)))
        self._finalizer = weakref.finalize(self, handle.remove)

    def reset(self) -> None:
        """Forget the latest errors."""
        self.errors, self.nonfinite, self.generator_state = None, False, None

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        self._finalizer()

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return self._finalizer.alive

    def _compute(self, output: Tensor) -> None:
        rec = self.recorder
        self.reset()
        if not isinstance(output, Tensor) and not isinstance(getattr(output, "logits", None),
                                                             Tensor):
            raise TypeError(f"the model must return a Tensor or an object with a .logits tensor, "
                            f"got {type(output).__name__}")
        output = as_logits(output)
        if any(o is None for o in rec.records.outputs):
            return  # a tracked layer was not called; the optimizer reports it at step()
        if not all_finite(output.detach()):
            self.nonfinite = True
            return
        if self.generator is not None:
            self.generator_state = self.generator.get_state()
        seeds, _ = output_seeds(output, None, self.likelihood, self.kind, self.mc_samples,
                                self.generator)
        self.errors = layer_errors(output, rec.records, rec.layers, seeds.to(output.dtype))
        # drop the references into the graph: the user's backward frees it
        rec.records.outputs = [None] * len(rec.layers)


def _error_hook(ref):
    def hook(module: nn.Module, args: tuple, output) -> None:
        self = ref()
        if self is None or not self.enabled or not torch.is_grad_enabled() or in_functorch():
            return
        if not self.recorder.enabled or module is not self._model():  # (a deepcopy carries hooks)
            return
        self._compute(output)

    return hook


class InputRecorder:
    """Keep the first positional input of the latest grad-enabled forward of ``model``.

    Attributes:
        inputs: that input, detached (``None`` until a forward ran).
        enabled: record only while ``True``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.enabled = True
        self.inputs: Tensor | None = None
        self._model = weakref.ref(model)
        handle = model.register_forward_pre_hook(_input_hook(weakref.ref(self)))
        self._finalizer = weakref.finalize(self, handle.remove)

    def reset(self) -> None:
        """Forget the recorded input."""
        self.inputs = None

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        self._finalizer()

    @property
    def active(self) -> bool:
        """Whether the hook is still registered."""
        return self._finalizer.alive


def _input_hook(ref):
    def hook(module: nn.Module, args: tuple) -> None:
        self = ref()
        if self is None or not self.enabled or not torch.is_grad_enabled() or in_functorch():
            return
        if module is not self._model():  # a deepcopy of the model carries the hook along
            return
        if args and isinstance(args[0], Tensor):
            self.inputs = args[0].detach()

    return hook
