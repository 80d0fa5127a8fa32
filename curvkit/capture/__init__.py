"""Capture: the only package that registers hooks.

One forward (and the needed backward passes) on a batch stores, per layer with a rule
(:mod:`curvkit.capture.rules`), the layer inputs ``a`` and back-propagated errors ``e`` -- never
per-sample gradients of size P×N of those layers; every other parameter gets explicit per-sample
gradients from the generic ``torch.func`` route (:mod:`curvkit.capture.generic`).
"""

from curvkit.capture.batch import Captured, capture, capture_inputs
from curvkit.capture.eager import eager_module
from curvkit.capture.generic import GenericAdapter
from curvkit.capture.guard import CaptureMismatchError, CheckSchedule, verify_capture
from curvkit.capture.hooks import (
    CheckpointError,
    Recorder,
    Records,
    WeightSharingError,
    layer_errors,
    record,
)
from curvkit.capture.inputs import (
    LABEL_KEY,
    Batch,
    as_logits,
    batch_size,
    check_model,
    forward,
    input_tensors,
    parse_batch,
    slice_inputs,
)
from curvkit.capture.layers import (
    SUPPORTED_LAYERS,
    BatchLayoutError,
    LayerAdapter,
    UnsupportedLayerError,
    check_fast_rule,
    find_layers,
    find_rules,
)
from curvkit.capture.rules import ExplicitAdapter, register_rule, rules, unregister_rule
from curvkit.capture.targets import (
    KINDS,
    LIKELIHOODS,
    exact_factor,
    loss_gradient,
    output_seeds,
    sample_targets,
)

__all__ = [
    "capture", "capture_inputs", "Captured", "record", "Records", "Recorder", "layer_errors",
    "WeightSharingError", "CheckpointError", "eager_module",
    "CaptureMismatchError", "CheckSchedule", "verify_capture",
    "LayerAdapter", "find_layers", "SUPPORTED_LAYERS", "UnsupportedLayerError", "BatchLayoutError",
    "check_fast_rule", "ExplicitAdapter", "GenericAdapter", "find_rules", "register_rule",
    "unregister_rule", "rules",
    "Batch", "LABEL_KEY", "parse_batch", "batch_size", "forward", "as_logits", "check_model",
    "input_tensors", "slice_inputs",
    "KINDS", "LIKELIHOODS", "output_seeds", "sample_targets", "loss_gradient", "exact_factor",
]
