"""Compiled models: capture runs through the eager module, never through a compiled graph.

``torch.compile(model)`` returns an ``OptimizedModule`` wrapping the eager ``model`` (its
``_orig_mod``) with the same parameters; the function it computes is the eager one, so curvkit
captures through ``_orig_mod``. Compiled submodules inside an eager model (and modules compiled
in place with ``module.compile()``) run their forward through the compiled graph, which
curvkit's hooks cannot observe reliably: they are refused.
"""

from __future__ import annotations

from torch import nn

__all__ = ["eager_module", "check_eager", "is_compiled"]


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper or was compiled in place."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(module, OptimizedModule) or \
        getattr(module, "_compiled_call_impl", None) is not None


def eager_module(model: nn.Module, owner: str = "curvkit") -> nn.Module:
    """The eager module behind ``torch.compile(model)`` (or ``model`` itself).

    Raises:
        TypeError: a submodule is compiled (the message names it and says what to do).
    """
    while is_compiled(model) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
    for name, m in model.named_modules():
        if is_compiled(m):
            raise TypeError(
                f"{owner}: module '{name or '<model>'}' ({type(m).__name__}) is compiled "
                "(torch.compile / module.compile()); curvkit's layer hooks need eager forwards. "
                "Pass the eager model (compile the whole model with torch.compile(model) if you "
                "like: curvkit then uses model._orig_mod), or compile after building curvature."
            )
    return model


def check_eager(model: nn.Module, owner: str) -> None:
    """Refuse a compiled model for hook-based optimizers.

    Their hooks watch the user's own forward passes, which a compiled graph runs without them.

    Raises:
        TypeError: ``model`` or a submodule is compiled; the message says what to do.
    """
    for name, m in model.named_modules():
        if is_compiled(m):
            raise TypeError(
                f"{owner}: module '{name or '<model>'}' ({type(m).__name__}) is compiled "
                "(torch.compile / module.compile()); the optimizer records layer inputs and "
                "errors with hooks during your forward passes, which compiled graphs do not run "
                "reliably. Construct the optimizer with the eager model and train the eager "
                "model (model._orig_mod of a torch.compile wrapper)."
            )
