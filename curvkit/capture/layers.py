"""Which adapter captures each selected parameter: a layer rule or the generic route.

:func:`find_rules` (used by ``curvkit.fisher``) walks the model in module order. A module whose
type has a registered rule (:mod:`curvkit.capture.rules`) is captured by it, for the parameter
names the rule handles, **if its forward is the standard one** (:func:`check_fast_rule`: a
subclass that overrides ``forward``/``_conv_forward``, or an instance with its own ``forward``,
computes something else). Everything else goes to the generic ``torch.func`` route
(:mod:`curvkit.capture.generic`), one adapter per module: modules without a rule, such
subclasses, parameters the rule does not handle, children of modules that read their parameters
without calling them (:data:`BYPASSING`: ``nn.MultiheadAttention``), and parameters tied between
modules of different types (an Embedding and a Linear head).

**Batch dimension.** ``a`` and ``e`` are indexed by the sample ``n`` first. A Linear layer input
whose dimension 0 is not the batch size ``N`` but exactly one other (non-feature) dimension is
(sequence-first ``(T, N, d)``), has that dimension moved to the front; with no such dimension the
capture refuses (:class:`BatchLayoutError`). When dimension 0 and another both have size ``N``
dimension 0 is taken; the capture guard (:mod:`curvkit.capture.guard`) detects a wrong choice.

**Tied modules.** Modules of the same ruled type holding the same parameters (``lin2.weight =
lin1.weight``, biases shared too) form one layer whose calls are extra locations (per-sample
gradient = sum over uses); other ties take the generic route.

:func:`find_layers` (used by the optimizers, which precondition ``[W | b]`` matrices) accepts
only rules whose block is the whole module in the layout ``[W.reshape(d_out, -1) | b]``:
``nn.Linear`` and ``nn.Conv1d/2d/3d`` with ``groups=1`` (any stride, padding, dilation, mode).
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from curvkit.capture.generic import GenericAdapter
from curvkit.capture.rules import LayerAdapter, UnsupportedLayerError, resolve_rule
from curvkit.capture.rules.base import BatchLayoutError

#: Module types the optimizers (KFAC, FOOF, NaturalGradient) precondition.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Modules that read their children's parameters without calling the children's ``forward``
#: (``MultiheadAttention`` uses ``out_proj.weight`` directly): the children go generic.
BYPASSING: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

__all__ = ["SUPPORTED_LAYERS", "LayerAdapter", "UnsupportedLayerError", "BatchLayoutError",
           "find_layers", "find_rules", "check_fast_rule", "BYPASSING"]

#: Methods that define the forward of each fast-rule type.
_FORWARD_METHODS = ("forward", "_conv_forward")


def fast_rule_problem(module: nn.Module) -> str | None:
    """Why ``module``'s rule does not apply (an own ``forward``), or ``None`` if it does."""
    if "forward" in module.__dict__:
        return "an instance that overrides forward"
    rule, reason = resolve_rule(module)
    return None if rule is not None else reason


def check_fast_rule(name: str, module: nn.Module) -> None:
    """Refuse a module whose forward is not the one its type's rule assumes.

    Used where only fast rules apply (the optimizers); ``curvkit.fisher`` sends such modules to
    the generic route instead.

    Raises:
        UnsupportedLayerError: the module's class overrides ``forward`` (or ``_conv_forward``), or
            the instance has its own ``forward``.
    """
    problem = fast_rule_problem(module)
    if problem is not None and ("overrid" in problem):
        raise UnsupportedLayerError(
            f"Layer '{name or '<model>'}' ({type(module).__name__}) is "
            f"{problem.replace('subclass of ', 'a subclass of nn.')}; curvkit's fast rule assumes "
            "the standard forward and would give wrong curvature. "
            "Freeze its parameters (requires_grad_(False)), pass params=[...] without them, or "
            "use curvkit.fisher (generic route) instead of an optimizer's fast rule."
        )


def _supported_names() -> str:
    return ", ".join(t.__name__ for t in SUPPORTED_LAYERS)


def _tie_groups(model: nn.Module, wanted: set[int]) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(first module) -> [(name, module), …]`` for tied modules of one ruled type.

    Tied: sharing all their selected parameters (ties the hooks capture as extra uses).
    """
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            if id(p) in wanted:
                owners.setdefault(id(p), []).append((name, m))
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for uses in owners.values():
        if len(uses) < 2:
            continue
        m0 = uses[0][1]
        same = all(type(m) is type(m0) for _, m in uses)
        shared = all(getattr(m0, pn, None) is getattr(m, pn, None) for _, m in uses
                     for pn in ("weight", "bias"))
        if same and shared and resolve_rule(m0)[0] is not None \
                and all(fast_rule_problem(m) is None for _, m in uses):
            groups[id(m0)] = uses
    return groups


def find_rules(model: nn.Module, params: list[nn.Parameter],
               standard_only: bool = False) -> list[LayerAdapter]:
    """Adapters (rules, then the generic route) for ``params``, in module order.

    Args:
        model: the network.
        params: the selected parameters.
        standard_only: refuse every parameter whose block would not be a standard ``[W | b]``
            matrix (the optimizers' set, :data:`SUPPORTED_LAYERS` with ``groups=1``).

    Raises:
        ValueError: a parameter is listed twice or is not a parameter of the model.
        UnsupportedLayerError: a rule refuses its layer's configuration (the message says why).
    """
    ids = [id(p) for p in params]
    if len(set(ids)) != len(ids):
        raise ValueError("params lists the same parameter twice")
    wanted = set(ids)
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    qual: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        qual.setdefault(id(p), name)
    bypassed = {id(c) for m in model.modules() if isinstance(m, BYPASSING) for c in m.modules()
                if c is not m}
    ties = _tie_groups(model, wanted)
    tied_members = {id(m) for uses in ties.values() for _, m in uses[1:]}
    found: set[int] = set()
    adapters: list[LayerAdapter] = []
    for name, module in model.named_modules():
        own = [(pn, p) for pn, p in module.named_parameters(recurse=False)
               if id(p) in wanted and id(p) not in found]
        if not own or id(module) in tied_members:
            continue
        rule, reason = resolve_rule(module)
        if "forward" in module.__dict__:
            rule, reason = None, "an instance that overrides forward"
        if id(module) in bypassed:
            rule, reason = None, "read by its parent without calling its forward"
        group = ties.get(id(module))
        if standard_only:
            _check_standard(name, module, rule, reason, own, owners, group)
        ok = {pn for pn, p in own if owners[id(p)] == 1 or group is not None}
        ruled = {pn for pn in ok if rule is not None and pn in rule.handles}
        if ruled and rule is not None:  # ruled is empty without a rule
            new = rule.from_module(name, module, ruled)
            if group is not None:
                for ad in new:
                    ad.tied = tuple(m for _, m in group[1:])
                    ad.tied_names = tuple(n for n, _ in group[1:])
                    ad.check()
            adapters.extend(new)
        rest = [(pn, p) for pn, p in own if pn not in ruled]
        if rest:
            if rule is not None:
                reason = "parameter not covered by its rule"
            if any(owners[id(p)] > 1 for _, p in rest):
                reason = "tied to another module"
            adapters.append(GenericAdapter(
                name, module, False, False, param_names=[qual[id(p)] for _, p in rest],
                params=[p for _, p in rest], reason=reason))
        found.update(id(p) for _, p in own)
    missing = wanted - found
    if missing:
        raise ValueError(f"{len(missing)} of the given params are not parameters of the model")
    return adapters


def _check_standard(name, module, rule, reason, own, owners, group) -> None:
    ok = rule is not None and (getattr(rule, "standard", False) is True
                               or rule.family == "conv" and module.groups == 1)
    if rule is None and "overrid" in reason:
        check_fast_rule(name, module)
    bad = [pn for pn, p in own
           if not ok or pn not in rule.handles or (owners[id(p)] > 1 and group is None)]
    if bad:
        full = f"{name}.{bad[0]}" if name else bad[0]
        raise UnsupportedLayerError(
            f"Unsupported layer '{name or '<model>'}' ({type(module).__name__}) holds the "
            f"trainable parameter '{full}'; supported layers: {_supported_names()} (groups=1). "
            "Freeze its parameters (requires_grad_(False)) or pass params=[...] without them; "
            "curvkit.fisher with structure='full', 'block_diag' or 'diag' captures it."
        )


def find_layers(model: nn.Module, params: list[nn.Parameter]) -> list[LayerAdapter]:
    """Group ``params`` by their owning layer for the optimizers (see the module docstring).

    Raises:
        UnsupportedLayerError: a parameter belongs to a module whose block is not a standard
            ``[W | b]`` matrix, or whose forward is not standard (the message names the layer,
            the supported set and the fix).
    """
    return find_rules(model, params, standard_only=True)
