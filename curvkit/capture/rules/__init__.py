"""The registry of layer rules: which module types have a fast capture, and how.

A rule is a :class:`~curvkit.capture.rules.base.LayerAdapter` subclass (the contract is in
:mod:`curvkit.capture.rules.base`); :func:`register_rule` binds it to a module type. A module is
captured by the rule of its *exact* type (a subclass that overrides ``forward`` computes
something else, so it goes to the generic route of :mod:`curvkit.capture.generic`), and only for
the parameter names the rule :attr:`~LayerAdapter.handles`; every other selected parameter is
captured by the generic route. Every capture is exact: a rule is an optimisation.

Example -- a user layer ``y = x Wᵀ·scale`` (``W`` of shape ``(d_out, d_in)``)::

    class ScaledLinear(nn.Module):
        def __init__(self, d_in, d_out, scale):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_out, d_in))
            self.scale = scale

        def forward(self, x):
            return x @ self.weight.T * self.scale

    class ScaledLinearRule(curvkit.capture.LayerAdapter):
        handles = ("weight",)

        def inputs(self, x, **kw):  # a_{nt} = scale · x_{nt}
            return super().inputs(x * self.module.scale, **kw)

    curvkit.capture.register_rule(ScaledLinear, ScaledLinearRule)
"""

from __future__ import annotations

from torch import nn

from curvkit.capture.rules.base import ExplicitAdapter, LayerAdapter, UnsupportedLayerError
from curvkit.capture.rules.conv import CONVS, TRANSPOSED, ConvAdapter, ConvTransposeAdapter
from curvkit.capture.rules.conv1d_hf import QUALNAME as _HF_CONV1D
from curvkit.capture.rules.conv1d_hf import HFConv1DAdapter
from curvkit.capture.rules.embedding import EmbeddingAdapter
from curvkit.capture.rules.linear import LinearAdapter
from curvkit.capture.rules.norm import (
    BatchNormAdapter,
    GroupNormAdapter,
    LayerNormAdapter,
    RMSNormAdapter,
)

_RULES: dict[type[nn.Module], type[LayerAdapter]] = {}
#: Rules bound by qualified class name (``module.qualname``), for optional packages curvkit does
#: not import (Hugging Face ``transformers``); consulted after :data:`_RULES`.
_NAMED_RULES: dict[str, type[LayerAdapter]] = {_HF_CONV1D: HFConv1DAdapter}


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _lookup(t: type) -> type[LayerAdapter] | None:
    rule = _RULES.get(t)
    return rule if rule is not None else _NAMED_RULES.get(_qualname(t))


def register_rule(module_type: type[nn.Module], rule: type[LayerAdapter]) -> None:
    """Capture modules of exactly ``module_type`` with ``rule`` (replaces an earlier rule).

    Args:
        module_type: the ``nn.Module`` subclass.
        rule: a :class:`LayerAdapter` subclass; its ``handles`` names the parameters it covers.

    Raises:
        TypeError: ``rule`` is not a LayerAdapter subclass or ``module_type`` not a Module type.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (isinstance(rule, type) and issubclass(rule, LayerAdapter)):
        raise TypeError(f"rule must be a LayerAdapter subclass, got {rule!r}")
    _RULES[module_type] = rule


def unregister_rule(module_type: type[nn.Module]) -> None:
    """Remove the rule of ``module_type`` (its parameters then take the generic route)."""
    _RULES.pop(module_type, None)
    _NAMED_RULES.pop(_qualname(module_type), None)


def rule_for(module: nn.Module) -> type[LayerAdapter] | None:
    """The rule registered for the exact type of ``module``, or ``None``."""
    return _lookup(type(module))


def resolve_rule(module: nn.Module) -> tuple[type[LayerAdapter] | None, str]:
    """``(rule, "")`` for ``module``, or ``(None, reason)`` when it takes the generic route.

    The rule of the exact type is used; a subclass of a ruled type uses its base's rule only if it
    keeps the base's ``forward`` (and ``_conv_forward``); one that overrides them is generic.
    """
    rule = _lookup(type(module))
    if rule is not None:
        return rule, ""
    for base in type(module).__mro__[1:]:
        rule = _lookup(base)
        if rule is not None:
            same = all(getattr(type(module), f, None) is getattr(base, f, None)
                       for f in ("forward", "_conv_forward"))
            if same:
                return rule, ""
            return None, f"subclass of {base.__name__} that overrides forward"
    return None, "no layer rule"


def rules() -> dict[type[nn.Module], type[LayerAdapter]]:
    """A copy of the registry ``{module type: rule}``."""
    return dict(_RULES)


register_rule(nn.Linear, LinearAdapter)
_t: type[nn.Module]
for _t in CONVS:
    register_rule(_t, ConvAdapter)
for _t in TRANSPOSED:
    register_rule(_t, ConvTransposeAdapter)
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_t, BatchNormAdapter)
register_rule(nn.LayerNorm, LayerNormAdapter)
register_rule(nn.GroupNorm, GroupNormAdapter)
register_rule(nn.RMSNorm, RMSNormAdapter)
register_rule(nn.Embedding, EmbeddingAdapter)

__all__ = ["LayerAdapter", "ExplicitAdapter", "UnsupportedLayerError", "register_rule",
           "unregister_rule", "rule_for", "resolve_rule", "rules"]
