"""What the applications need from capture, exposed by ``curvature`` (the only layer they import).

Applications (``optim``, ``ewc``, ``hypergrad``, ``validate``) never import ``curvkit.capture``:
the optimizers' streaming recorders (persistent hooks that record layer inputs and back-propagate
Fisher seeds between steps), the layer adapters and the vocabulary of Fisher kinds and
likelihoods with their checks come from here.

* :class:`Recorder` -- persistent forward hooks recording each tracked layer's inputs ``a``;
* :class:`ErrorRecorder` -- after each recorded forward, the errors ``e`` of the Fisher seeds
  (sampled labels for ``kind="mc"``, the loss-Hessian square root for ``"exact"``);
* :class:`InputRecorder` -- the model's latest grad-enabled input (natural gradient);
* :class:`LayerAdapter`, :func:`find_layers` -- the ``[W | b]`` layer view of a model;
* :func:`forward` (run a model on a batch as users hold it), :func:`loss_gradient`,
  :func:`check_choice`, :func:`check_outputs`, :func:`check_targets`,
  :data:`KINDS`, :data:`LIKELIHOODS`;
* :func:`check_eager` (refuse compiled modules) and :class:`CheckSchedule` (when the capture guard
  checks a recorded forward against autograd).
"""

from curvkit.capture import (
    KINDS,
    LIKELIHOODS,
    LayerAdapter,
    Recorder,
    find_layers,
    forward,
    loss_gradient,
)
from curvkit.capture.eager import check_eager
from curvkit.capture.guard import CheckSchedule
from curvkit.capture.optim_hooks import ErrorRecorder, InputRecorder
from curvkit.capture.targets import check_choice, check_outputs, check_targets

__all__ = [
    "Recorder", "ErrorRecorder", "InputRecorder", "LayerAdapter", "find_layers", "loss_gradient",
    "check_choice", "check_outputs", "check_targets", "KINDS", "LIKELIHOODS", "check_eager",
    "CheckSchedule", "forward",
]
