"""Shared machinery of curvkit's optimizers.

Parameter groups, layers, momentum, weight decay, input checks, randomness and ``state_dict``.

Every curvkit optimizer is a :class:`torch.optim.Optimizer` built from the *model* (it needs the
model's layers) and used in the plain loop::

    opt.zero_grad(); loss = criterion(model(x), y); loss.backward(); opt.step()

The update of a parameter ``θ`` in a group with learning rate ``η``, momentum ``μ`` and weight
decay ``ω`` is, with ``g = θ.grad`` (the gradient of the user's loss, usually a batch mean)::

    m ← μ m + g                    (heavy-ball on the raw gradient, no dampening; m = g if μ = 0)
    θ ← θ − η ω θ − η P(m)         (decoupled weight decay, applied outside the preconditioner)

where ``P`` is the optimizer's preconditioner applied layer by layer to ``M = [∇W | ∇b]``
(``d_out × d_in``, a convolution's weight reshaped to ``d_out × C_in·k_h·k_w``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvkit.curvature.layout import BlockLayout
from curvkit.curvature.streaming import LayerAdapter, check_eager, find_layers

#: Per-group hyperparameters every curvkit optimizer accepts.
GROUP_KEYS = ("lr", "damping", "momentum", "weight_decay")


def check_positive(name: str, value: Any, owner: str) -> float:
    """``value`` as a float, or ``ValueError`` unless it is a finite number > 0."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: Any, owner: str) -> float:
    """``value`` as a float in ``[0, 1)``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_int(name: str, value: Any, owner: str, minimum: int = 1) -> int:
    """``value`` as an int ``≥ minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int ≥ {minimum}, got {value!r}")
    return int(value)


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group with more than one rank."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


class CurvatureOptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` over the supported layers of a model.

    Args:
        model: the network (``nn.Linear`` / ``nn.Conv2d`` layers hold all trained parameters).
        params: the parameters to train, as for any ``torch.optim`` optimizer (an iterable of
            tensors or of dicts defining parameter groups with their own ``lr``, ``damping``,
            ``momentum``, ``weight_decay``). Default: every parameter of ``model`` with
            ``requires_grad``. A layer's weight and bias must lie in the same group (they share
            one curvature block).
        defaults: default group hyperparameters.
        generator: ``torch.Generator`` for the optimizer's randomness (on the parameters'
            device); ``None`` creates one seeded from torch's global RNG. Its state is part of
            :meth:`state_dict`.
        needs_generator: whether the optimizer draws random numbers at all.

    Subclasses implement :meth:`_plan`, which computes one step *without changing any state*,
    and :meth:`_commit`, which stores the plan; :meth:`step` and :meth:`direction` are built
    from them.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable | None,
        defaults: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        needs_generator: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs the model (an nn.Module) as its first "
                            f"argument, got {type(model).__name__}")
        self._constructed = False
        check_eager(model, type(self).__name__)  # issue 10: compiled models are refused
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        flat = [p for g in self.param_groups for p in g["params"]]
        dtypes, devices = {p.dtype for p in flat}, {p.device for p in flat}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(f"{type(self).__name__}: all parameters must share one dtype and device, "
                            f"got {sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        if not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"{type(self).__name__}: parameters must be floating point")
        self.model = model
        self.layers: list[LayerAdapter] = find_layers(model, flat)
        self._first = flat[0]
        self._names = {id(p): n for n, p in model.named_parameters()}
        group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        self.layer_groups: list[int] = []
        for layer in self.layers:
            gs = {group_of[id(p)] for p in self.layer_params(layer)}
            if len(gs) > 1:
                raise ValueError(f"{type(self).__name__}: the weight and bias of layer {layer.describe()} "
                                 f"are in different parameter groups {sorted(gs)}; they share one "
                                 "curvature block, so put them in the same group")
            self.layer_groups.append(gs.pop())
        self.generator: torch.Generator | None = None
        if needs_generator:
            if generator is None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
            elif not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            elif torch.device(generator.device).type != self.device.type:
                raise ValueError(f"the generator is on {generator.device} but the parameters on "
                                 f"{self.device}; pass torch.Generator(device={str(self.device)!r})")
            self.generator = generator
        self._step = 0
        self._hooks: list[Any] = []
        self._constructed = True

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype now (follows ``model.to(dtype)`` after construction)."""
        return self._first.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device now (follows ``model.to(device)`` after construction)."""
        return self._first.device

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group at construction; afterwards the layer structure is fixed."""
        if getattr(self, "_constructed", False):
            raise NotImplementedError(
                f"{type(self).__name__}.add_param_group after construction is not supported: the "
                "tracked layers and hooks are fixed when the optimizer is built. Construct a new "
                "optimizer with params=[...] listing all groups."
            )
        owner = type(self).__name__
        for key in GROUP_KEYS:
            if key in param_group or key in self.defaults:
                v = param_group.get(key, self.defaults.get(key))
                if key in ("lr", "damping"):
                    check_positive(key, v, owner)
                elif key == "momentum":
                    check_unit_interval(key, v, owner)
                elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 \
                        or not math.isfinite(v):
                    raise ValueError(f"{owner}: weight_decay must be a finite number ≥ 0, got {v!r}")
        super().add_param_group(param_group)

    @staticmethod
    def layer_params(layer: LayerAdapter) -> list[nn.Parameter]:
        """The selected parameters of ``layer``: weight first, then bias."""
        return layer.parameters()

    def param_name(self, p: Tensor) -> str:
        """The model's name of parameter ``p`` (``"<unnamed>"`` if it is not one of the model's)."""
        return self._names.get(id(p), "<unnamed>")

    # ------------------------------------------------------------------ layer matrices
    @staticmethod
    def to_matrix(layer: LayerAdapter, tensors: list[Tensor]) -> Tensor:
        """``[W | b]`` as a ``(d_out, d_in)`` matrix from tensors shaped like the layer params.

        One conversion for every application: :meth:`curvkit.curvature.layout.BlockLayout.block`.
        """
        return BlockLayout.of(layer).block(tensors)

    @staticmethod
    def from_matrix(layer: LayerAdapter, M: Tensor) -> list[Tensor]:
        """Inverse of :meth:`to_matrix` (:meth:`curvkit.curvature.layout.BlockLayout.split`)."""
        return BlockLayout.of(layer).split(M)

    # ------------------------------------------------------------------ gradients and momentum
    def _gradients(self) -> dict[int, Tensor | None]:
        """``id(p) -> grad`` (``None`` if unused); raises on non-finite values, changes nothing."""
        grads: dict[int, Tensor | None] = {}
        present = []
        for g in self.param_groups:
            for p in g["params"]:
                grads[id(p)] = p.grad
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                                        f"('{self.param_name(p)}')")
                    present.append(p)
        present = [p for p in present if p.grad.numel()]
        if present:  # one pass per tensor (min and max are non-finite iff an entry is) and one sync
            ok = torch.isfinite(torch.stack([torch.stack(torch.aminmax(p.grad.detach()))
                                             for p in present])).all(1)
            if not bool(ok.all()):
                bad = present[int((~ok).nonzero()[0, 0])]
                raise FloatingPointError(
                    f"{type(self).__name__}: the gradient of '{self.param_name(bad)}' has non-finite "
                    f"values (nan/inf) at step {self._step}; the step was refused and the optimizer "
                    "state is unchanged. Check the loss (e.g. lower the learning rate or raise the "
                    "damping)."
                )
        return grads

    def _momentum_buffers(self, grads: dict[int, Tensor | None]) -> dict[int, Tensor]:
        """Tentative ``m ← μ m + g`` per parameter (``m = g`` when ``μ = 0``); no state change."""
        out: dict[int, Tensor] = {}
        for group in self.param_groups:
            mu = group["momentum"]
            old, new, ids = [], [], []
            for p in group["params"]:
                g = grads[id(p)]
                if g is None:
                    continue
                buf = self.state.get(p, {}).get("momentum_buffer") if mu != 0 else None
                if mu == 0:
                    out[id(p)] = g
                elif buf is None:
                    out[id(p)] = g.detach().clone()
                else:  # (a buffer from before model.to(dtype/device) follows the gradient)
                    old.append(buf.to(g))
                    new.append(g.detach())
                    ids.append(id(p))
            if ids:  # out of place (new tensors), so saved states stay snapshots
                for i, b in zip(ids, torch._foreach_add(torch._foreach_mul(old, mu), new)):
                    out[i] = b
        return out

    def _layer_vectors(self, bufs: dict[int, Tensor]) -> list[Tensor | None]:
        """Per layer, the ``(d_out, d_in)`` matrix of the vectors to precondition (``None``: skip)."""
        mats: list[Tensor | None] = []
        for layer in self.layers:
            ps = self.layer_params(layer)
            if all(id(p) not in bufs for p in ps):
                mats.append(None)
                continue
            ts = [bufs[id(p)] if id(p) in bufs else torch.zeros_like(p) for p in ps]
            mats.append(self.to_matrix(layer, ts))
        return mats

    def layer_directions_to_params(self, directions: list[Tensor | None],
                                   present: dict[int, Tensor] | None = None) -> dict[int, Tensor]:
        """Per-layer ``(d_out, d_in)`` directions -> ``id(p) -> direction`` shaped like ``p``.

        With ``present`` (``id(p) -> vector``), parameters missing from it get no direction: as in
        ``torch.optim``, a parameter whose ``.grad`` is ``None`` is not updated, even when its
        layer-mate is (its zero block still enters the layer's preconditioned matrix).
        """
        out: dict[int, Tensor] = {}
        for layer, D in zip(self.layers, directions):
            if D is not None:
                for p, d in zip(self.layer_params(layer), self.from_matrix(layer, D)):
                    if present is None or id(p) in present:
                        out[id(p)] = d
        return out

    def _apply(self, directions: dict[int, Tensor], bufs: dict[int, Tensor]) -> None:
        """``θ ← θ − η ω θ − η D`` for every parameter with a direction; store momentum buffers."""
        with torch.no_grad():
            for group in self.param_groups:
                lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
                for p in group["params"]:
                    if mu != 0 and id(p) in bufs:
                        self.state[p]["momentum_buffer"] = bufs[id(p)]
                    d = directions.get(id(p))
                    if d is None:
                        continue
                    if wd != 0:
                        p.mul_(1 - lr * wd)
                    p.add_(d.to(p.dtype), alpha=-lr)

    def _as_update(self, directions: dict[int, Tensor]) -> list[Tensor]:
        """The change ``Δθ = −η ω θ − η D`` that :meth:`_apply` would make.

        Tensors shaped like the parameters, in ``param_groups`` order (zeros where there is no
        direction).
        """
        out = []
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                d = directions.get(id(p))
                if d is None:
                    out.append(torch.zeros_like(p).detach())
                    continue
                delta = -lr * d.to(p.dtype)
                out.append((delta - lr * wd * p.detach() if wd != 0 else delta).detach())
        return out

    @staticmethod
    def _evaluate_closure(closure: Callable[[], Any] | None, owner: str, step: int) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            loss = closure()
        if loss is not None:
            value = loss.detach() if isinstance(loss, Tensor) else torch.as_tensor(loss)
            if not bool(torch.isfinite(value).all()):
                raise FloatingPointError(f"{owner}: the loss is non-finite ({value}) at step {step}; "
                                         "the step was refused and the optimizer state is unchanged")
        return loss

    # ------------------------------------------------------------------ hooks
    def remove_hooks(self) -> None:
        """Remove every hook this optimizer registered on the model (idempotent).

        Hooks are also removed when the optimizer is garbage-collected. After removal,
        :meth:`step` raises.
        """
        for h in self._hooks:
            h.remove()

    @property
    def hooks_active(self) -> bool:
        """Whether the capture hooks are still registered (``False`` after ``remove_hooks()``)."""
        return any(h.active for h in self._hooks)

    def _check_hooks(self) -> None:
        if self._hooks and not self.hooks_active:
            raise RuntimeError(f"{type(self).__name__}: the hooks were removed (remove_hooks()); "
                               "construct a new optimizer to keep training")

    # ------------------------------------------------------------------ state
    @property
    def step_count(self) -> int:
        """Number of completed steps ``t`` (the next step is step ``t``, 0-based)."""
        return self._step

    def _extra_state(self) -> dict[str, Any]:
        """Global (non-parameter) state; subclasses extend."""
        return {
            "class": type(self).__name__,
            "step": self._step,
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._step = int(extra["step"])
        if self.generator is not None and extra.get("generator") is not None:
            self.generator.set_state(extra["generator"])

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state (per-parameter buffers, groups) plus ``"curvkit"``.

        ``"curvkit"`` holds the counters, the generator state and any global state (EMA weight,
        Fisher batch, ...).

        Returns:
            A dict that loads with ``torch.load(weights_only=True)``.
        """
        sd = super().state_dict()
        # own dicts per parameter: later steps replace state tensors (never update them in
        # place), so the returned state stays a snapshot
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        sd["curvkit"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; continuing gives the same trajectory as not stopping."""
        if "curvkit" not in state_dict:
            raise KeyError(f"{type(self).__name__}.load_state_dict: the state has no 'curvkit' entry; "
                           "pass a state saved by the same curvkit optimizer class")
        state_dict = deepcopy(dict(state_dict))  # never share tensors with the caller's dict
        extra = state_dict.pop("curvkit")
        if extra.get("class", type(self).__name__) != type(self).__name__:
            raise ValueError(f"the state was saved by {extra['class']}, not {type(self).__name__}")
        super().load_state_dict(state_dict)
        self._load_extra_state(extra)

