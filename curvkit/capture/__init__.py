"""Capture: the only package that registers hooks.

One forward (and the needed backward passes) on a batch stores, per supported layer, the layer
inputs ``a`` and back-propagated errors ``e`` -- never per-sample gradients of size P×N.
"""

from curvkit.capture.batch import Captured, capture
from curvkit.capture.hooks import Recorder, Records, WeightSharingError, layer_errors, record
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
    LayerAdapter,
    UnsupportedLayerError,
    find_layers,
)
from curvkit.capture.targets import (
    KINDS,
    LIKELIHOODS,
    exact_factor,
    loss_gradient,
    output_seeds,
    sample_targets,
)

__all__ = [
    "capture", "Captured", "record", "Records", "Recorder", "layer_errors", "WeightSharingError",
    "LayerAdapter", "find_layers", "SUPPORTED_LAYERS", "UnsupportedLayerError",
    "Batch", "LABEL_KEY", "parse_batch", "batch_size", "forward", "as_logits", "check_model",
    "input_tensors", "slice_inputs",
    "KINDS", "LIKELIHOODS", "output_seeds", "sample_targets", "loss_gradient", "exact_factor",
]
