"""Batches and outputs as users hold them: tensors, tuples, dicts, Hugging Face objects.

One *batch* is what a ``DataLoader`` yields or what a user passes to :func:`curvkit.fisher`:

* a ``Tensor`` ``x``: the model is called as ``model(x)``;
* a ``dict`` (any ``Mapping``, e.g. a Hugging Face ``BatchEncoding``): ``model(**batch)``. When
  ``targets`` are not given separately and the dict has the label key (``"labels"``), that entry
  is taken as the targets and not passed to the model;
* a ``tuple`` or ``list``: when ``targets`` are given separately it holds the model's positional
  inputs, ``model(*batch)``; otherwise it is a data-loader batch ``(inputs, targets)`` or
  ``(inputs,)``, where ``inputs`` is itself a tensor, a tuple (positional) or a dict (keywords).

**Batch size.** ``N`` is the leading dimension of the first tensor in the inputs (tensor; tuple
order; dict insertion order). Every input tensor whose leading dimension is ``N`` is treated as
batched (sliced when curvkit processes a batch in chunks); other tensors (a shared mask) are passed
unchanged. The model output must have ``N`` rows.

**Outputs.** A tensor is taken as the logits; an object with a ``.logits`` attribute (a Hugging Face
``ModelOutput``) is taken as its ``.logits``; anything else needs ``output_fn``, a function from
the model's output to the logits tensor (e.g. ``output_fn=lambda out: out[0]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["Batch", "LABEL_KEY", "check_model", "input_tensors", "batch_size", "forward",
           "as_logits", "parse_batch", "slice_inputs"]

#: Dict key holding the labels in a dict batch (the Hugging Face convention).
LABEL_KEY = "labels"

OutputFn = Callable[[Any], Tensor]


@dataclass(frozen=True)
class Batch:
    """A parsed batch: the model inputs, the targets (or ``None``) and the batch size ``N``."""

    inputs: Any
    targets: Tensor | None
    size: int


def check_model(model: Any) -> None:
    """Raise a clear error unless ``model`` is an ``nn.Module`` (curvkit reads its parameters)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; curvkit finds the "
            "parameters and layers through the module tree, so wrap a function-based model in an "
            "nn.Module that owns its parameters as attributes"
        )


def input_tensors(inputs: Any) -> list[Tensor]:
    """The tensors among the model inputs, in order (tensor; tuple order; dict order)."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, Tensor)]
    if isinstance(inputs, (tuple, list)):
        return [v for v in inputs if isinstance(v, Tensor)]
    return []


def _describe(inputs: Any) -> str:
    return type(inputs).__name__


def batch_size(inputs: Any) -> int:
    """``N``: the leading dimension of the first input tensor (see the module docstring).

    Raises:
        TypeError: the inputs are not a tensor, tuple/list or dict, or hold no tensor.
        ValueError: the first tensor is a scalar, or the batch is empty.
    """
    if not isinstance(inputs, (Tensor, Mapping, tuple, list)):
        raise TypeError(f"the model inputs must be a Tensor, a tuple/list of tensors or a dict "
                        f"(model(**batch)), got {_describe(inputs)}")
    tensors = input_tensors(inputs)
    if not tensors:
        raise TypeError(f"the model inputs ({_describe(inputs)}) hold no tensor, so the batch size "
                        "cannot be inferred; pass the batch as tensors")
    first = tensors[0]
    if first.dim() == 0:
        raise ValueError("the first input tensor is a scalar; the batch size is its leading "
                         "dimension, so it must have shape (N, ...)")
    if first.shape[0] == 0:
        raise ValueError("the batch is empty (inputs.shape[0] == 0)")
    return int(first.shape[0])


def forward(model: nn.Module, inputs: Any, output_fn: OutputFn | None = None) -> Tensor:
    """Call the model on the inputs as the module docstring says and return the logits."""
    if isinstance(inputs, Tensor):
        out = model(inputs)
    elif isinstance(inputs, Mapping):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        raise TypeError(f"the model inputs must be a Tensor, a tuple/list of tensors or a dict "
                        f"(model(**batch)), got {_describe(inputs)}")
    return as_logits(out, output_fn)


def as_logits(out: Any, output_fn: OutputFn | None = None) -> Tensor:
    """The logits tensor from a model output (tensor, ``.logits``, or ``output_fn(out)``)."""
    if output_fn is not None:
        out = output_fn(out)
        if not isinstance(out, Tensor):
            raise TypeError(f"output_fn must return the logits Tensor, got {type(out).__name__}")
        return out
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model returned {type(out).__name__}, not a Tensor or an object with a .logits "
        "tensor; pass output_fn=... mapping the output to the logits (e.g. "
        "output_fn=lambda out: out[0])"
    )


def _check_targets_type(targets: Any) -> Tensor | None:
    if targets is not None and not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
    return targets


def parse_batch(batch: Any, targets: Any = None, label_key: str = LABEL_KEY) -> Batch:
    """Split a user batch into model inputs and targets (rules in the module docstring).

    Raises:
        TypeError: the batch has an unsupported type, or targets are not a tensor.
        ValueError: a tuple batch of the wrong length, an empty batch, or targets whose number
            of rows differs from the batch size.
    """
    inputs: Any  # the model inputs: a tensor, a tuple or a mapping
    if isinstance(batch, Tensor):
        inputs = batch
    elif isinstance(batch, Mapping):
        if targets is None and label_key in batch:
            targets = batch[label_key]
            inputs = {k: v for k, v in batch.items() if k != label_key}
        else:
            inputs = batch
    elif isinstance(batch, (tuple, list)):
        if targets is not None:
            inputs = tuple(batch)
        elif len(batch) == 1:
            inputs = batch[0]
        elif len(batch) == 2:
            inputs, targets = batch
        else:
            raise ValueError(
                f"a {type(batch).__name__} batch without separate targets is (inputs, targets) or "
                f"(inputs,), got {len(batch)} elements; for several model inputs nest them, "
                "((x1, x2), y), or pass targets=... so the tuple is the model's positional inputs"
            )
        if isinstance(inputs, Mapping) and targets is None and label_key in inputs:
            return parse_batch(inputs, None, label_key)
    else:
        raise TypeError(
            f"a batch must be a Tensor, a tuple/list or a dict, got {_describe(batch)}; pass an "
            "iterable of batches (e.g. a DataLoader) where several batches are meant"
        )
    targets = _check_targets_type(targets)
    N = batch_size(inputs)
    if targets is not None and (targets.dim() == 0 or targets.shape[0] != N):
        got = "a scalar" if targets.dim() == 0 else f"{targets.shape[0]} rows"
        raise ValueError(f"targets must have one row per input ({N}), got {got}")
    return Batch(inputs, targets, N)


def slice_inputs(inputs: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every batched input tensor (leading dimension ``N``)."""
    N = batch_size(inputs)

    def cut(v: Any) -> Any:
        return v[start:stop] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == N else v

    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {k: cut(v) for k, v in inputs.items()}
    return tuple(cut(v) for v in inputs)
