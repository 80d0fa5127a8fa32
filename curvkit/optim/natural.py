"""The exact subsampled (or block-diagonal) natural gradient with Woodbury solves (App. I)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.curvature import Curvature, fisher
from curvkit.curvature.build import from_captured
from curvkit.curvature.streaming import (
    KINDS,
    LIKELIHOODS,
    CheckSchedule,
    InputRecorder,
    check_choice,
)
from curvkit.optim.base import CurvatureOptimizer, check_int, is_distributed
from curvkit.typing import Kind, Likelihood, Structure

STRUCTURES = ("full", "block_diag")
FISHER_BATCHES = ("independent", "same")


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise TypeError(f"a Fisher batch must be an input tensor or a tuple (inputs, targets), got "
                    f"{type(batch).__name__}")


class NaturalGradient(CurvatureOptimizer):
    """Damped natural gradient with the exact subsampled Fisher (paper App. I, eqs 19–23).

    Symbols: ``η`` = ``lr``, ``λ`` = ``damping``, ``μ`` = ``momentum``, ``ω`` = ``weight_decay``,
    ``T`` = ``inv_period``. With the Fisher ``F̄`` of a batch of ``N_F`` inputs
    (``curvkit.fisher``: ``F̄ = (1/N_F) Σ_n E_y[g gᵀ]``, the expectation exact, by one MC label, or
    replaced by the data label, per ``kind``), rebuilt every ``T`` steps at the current
    parameters::

        m ← μ m + ∇_θ L                     (raw gradient of the user's loss)
        θ ← θ − η ω θ − η (F̄ + λ I)⁻¹ m      (Woodbury: λ⁻¹[m − G(λI + GᵀG)⁻¹Gᵀm], float64 core)

    ``structure="block_diag"`` uses ``blockdiag_l(F̄_l)`` (one Woodbury solve per layer). Large
    ``λ`` gives SGD with step ``η/λ``; ``F̄`` is batch-mean normalised, so the paper code's
    ``(η_p, λ_p)`` carry over directly (its Fisher columns are ``g_i/√N``, like curvkit's).

    **Which batch estimates the Fisher** (``fisher_batch``):

    * ``"independent"`` (default; App. I.5): the Fisher and the gradient come from different
      batches, which removes the bias of ``(λI + F̄)⁻¹ ḡ`` when both use the same data. At each
      refresh the Fisher batch is, in order of preference: the next batch of ``fisher_loader``
      (completely independent batches, as in the paper's experiments; the loader is cycled); a
      batch given by :meth:`set_fisher_batch`; the *previous step's* batch (as the official code
      does). At step 0 without any of these, the current batch is used once.
    * ``"same"``: the current step's batch (biased for small ``λ``; Fig I.6).

    **Batch inputs.** The optimizer records the first positional input of the model's latest
    grad-enabled forward pass (a forward pre-hook), so the plain loop works unchanged; pass
    ``opt.step(inputs=x)`` to give the batch explicitly. ``kind="empirical"`` also needs the data
    labels: ``opt.step(targets=y)`` (or ``(x, y)`` batches from ``fisher_loader`` /
    :meth:`set_fisher_batch`).

    Args:
        model: the network (trained parameters in ``nn.Linear``/``nn.Conv2d`` only), output
            ``(N, C)``.
        lr: ``η > 0``.
        damping: ``λ > 0`` (read every step). Per-group dampings need
            ``structure="block_diag"``; with several groups, each group gets its own
            block-diagonal Fisher (its own ``curvkit.fisher`` call and, for ``"mc"``, its own
            sampled labels).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        kind: ``"mc"``, ``"exact"`` or ``"empirical"``.
        structure: ``"full"`` or ``"block_diag"``.
        fisher_batch: ``"independent"`` or ``"same"``.
        inv_period: ``T ≥ 1``, Fisher rebuilt at steps ``t ≡ 0 (mod T)``.
        momentum: ``μ ∈ [0, 1)``, heavy ball on the raw gradient before the solve.
        weight_decay: ``ω ≥ 0`` (decoupled).
        generator: ``torch.Generator`` for MC labels (state saved in :meth:`state_dict`).
        params: parameters or parameter groups.
        fisher_loader: optional iterable of Fisher batches (inputs or ``(inputs, targets)``); its
            position is not part of :meth:`state_dict`.

    Not data-parallel aware: under ``torch.distributed`` use :class:`FOOF` or :class:`KFAC`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        likelihood: Likelihood = "classification",
        kind: Kind = "mc",
        structure: Structure = "full",
        fisher_batch: str = "independent",
        inv_period: int = 1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        params: Iterable | None = None,
        fisher_loader: Iterable[Any] | None = None,
    ) -> None:
        check_choice(likelihood, LIKELIHOODS, "likelihood")
        check_choice(kind, KINDS, "kind")
        check_choice(structure, STRUCTURES, "structure")
        check_choice(fisher_batch, FISHER_BATCHES, "fisher_batch")
        self.inv_period = check_int("inv_period", inv_period, "NaturalGradient")
        if is_distributed():
            raise NotImplementedError("NaturalGradient is not data-parallel aware (each rank would "
                                      "build its own Fisher and the replicas would diverge); use "
                                      "FOOF or KFAC under torch.distributed")
        if fisher_loader is not None and fisher_batch == "same":
            raise ValueError("fisher_loader gives independent Fisher batches; it cannot be combined "
                             "with fisher_batch='same'")
        self.likelihood, self.kind, self.structure = likelihood, kind, structure
        self.fisher_batch = fisher_batch
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, params, defaults, generator=generator, needs_generator=kind == "mc")
        if structure == "full" and len({g["damping"] for g in self.param_groups}) > 1:
            raise ValueError(self._damping_message())
        self.inputs = InputRecorder(model)
        self._hooks.append(self.inputs)
        self._check = CheckSchedule(model)  # capture guard: first build, structure changes
        self._loader = fisher_loader
        self._loader_iter: Iterator[Any] | None = None
        self._fishers: list[Curvature] | None = None
        self._fisher_state: list[dict[str, Any]] | None = None
        self._prev_batch: tuple[Tensor, Tensor | None] | None = None
        self._pending: tuple[Tensor, Tensor | None] | None = None
        self.counts = {"fisher_builds": 0}

    def _damping_message(self) -> str:
        return ("NaturalGradient with structure='full' uses one damping for the whole Fisher, but the "
                f"parameter groups have dampings {[g['damping'] for g in self.param_groups]}; use "
                "one damping, or structure='block_diag' for per-group damping")

    # ------------------------------------------------------------------ Fisher batches
    def set_fisher_batch(self, inputs: Tensor, targets: Tensor | None = None) -> None:
        """Use ``(inputs, targets)`` for the next Fisher refresh (``fisher_batch="independent"``)."""
        if self.fisher_batch != "independent":
            raise ValueError("set_fisher_batch needs fisher_batch='independent'; with 'same' the "
                             "Fisher always uses the step's own batch")
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a Tensor, got {type(inputs).__name__}")
        self._pending = (inputs.detach(), None if targets is None else targets.detach())

    def _next_from_loader(self) -> tuple[Tensor, Tensor | None]:
        assert self._loader is not None
        for _ in range(2):
            if self._loader_iter is None:
                self._loader_iter = iter(self._loader)
            try:
                return _split_batch(next(self._loader_iter))
            except StopIteration:
                self._loader_iter = None
        raise ValueError("fisher_loader is empty")

    def _fisher_batch(
        self, current: tuple[Tensor, Tensor | None]
    ) -> tuple[tuple[Tensor, Tensor | None], str]:
        if self.fisher_batch == "same":
            return current, "same"
        if self._loader is not None:
            x, y = self._next_from_loader()
            return (x.to(self.device), None if y is None else y.to(self.device)), "loader"
        if self._pending is not None:
            return self._pending, "pending"
        if self._prev_batch is not None:
            return self._prev_batch, "previous"
        return current, "same"

    # ------------------------------------------------------------------ Fisher sets
    def _fisher_sets(self) -> list[list[nn.Parameter]]:
        """Parameters of each Fisher: all of them, or one set per group for ``block_diag``."""
        if self.structure == "block_diag" and len(self.param_groups) > 1:
            return [list(g["params"]) for g in self.param_groups]
        return [[p for g in self.param_groups for p in g["params"]]]

    def _set_damping(self, k: int) -> float:
        if self.structure == "block_diag" and len(self.param_groups) > 1:
            return self.param_groups[k]["damping"]
        dampings = {g["damping"] for g in self.param_groups}
        if len(dampings) > 1:
            raise ValueError(self._damping_message())
        return dampings.pop()

    def _build(self, batch: tuple[Tensor, Tensor | None]) -> list[Curvature]:
        x, y = batch
        if self.kind == "empirical" and y is None:
            raise ValueError("NaturalGradient(kind='empirical') needs the data labels of the Fisher "
                             "batch: call opt.step(targets=y), or give (inputs, targets) batches to "
                             "fisher_loader / set_fisher_batch")
        was = self.inputs.enabled
        self.inputs.enabled = False
        try:
            check = self._check.due()
            out = [fisher(self.model, x, y, likelihood=self.likelihood, kind=self.kind,
                          structure=self.structure, generator=self.generator, params=ps,
                          check=check) for ps in self._fisher_sets()]
            self._check.passed()
            return out
        finally:
            self.inputs.enabled = was

    def _rebuild(self, state: list[dict[str, Any]]) -> list[Curvature]:
        """The Fishers from stored per-layer factors (``load_state_dict``).

        Built by the same structure builder as ``curvkit.fisher``
        (:func:`curvkit.curvature.build.from_captured`).
        """
        return [from_captured(self.model, st["a"], st["e"], num_data=st["num_data"],
                              likelihood=self.likelihood, kind=self.kind,
                              structure=self.structure, params=ps)
                for ps, st in zip(self._fisher_sets(), state)]

    # ------------------------------------------------------------------ the step
    def _plan(self, inputs: Tensor | None, targets: Tensor | None) -> dict[str, Any]:
        t = self._step
        self._check_hooks()
        grads = self._gradients()
        x = inputs if inputs is not None else self.inputs.inputs
        if x is None:
            raise RuntimeError("NaturalGradient needs the batch inputs: run the forward pass with "
                               "gradients enabled before opt.step(), or call opt.step(inputs=x)")
        current = (x.detach(), None if targets is None else targets.detach())
        fishers, fstate, source = self._fishers, self._fisher_state, None
        if fishers is None or t % self.inv_period == 0:
            batch, source = self._fisher_batch(current)
            fishers = self._build(batch)
            fstate = []
            for F in fishers:
                cap = F.captured  # a Fisher of one batch keeps its captured factors
                if cap is None:
                    raise RuntimeError("NaturalGradient's Fisher has no captured factors")
                fstate.append({"a": list(cap.a), "e": list(cap.e), "num_data": F.num_data})
        bufs = self._momentum_buffers(grads)
        directions: dict[int, Tensor] = {}
        for k, F in enumerate(fishers):
            if all(id(p) not in bufs for p in F.params):
                continue
            v = [bufs[id(p)] if id(p) in bufs else torch.zeros_like(p) for p in F.params]
            D = F.solve(v, self._set_damping(k))
            for p, d in zip(F.params, D):
                if id(p) in bufs:
                    directions[id(p)] = d
        return dict(t=t, fishers=fishers, fstate=fstate, source=source, bufs=bufs,
                    directions=directions, current=current)

    def _plan_or_undo(self, inputs: Tensor | None, targets: Tensor | None) -> dict[str, Any]:
        gen_state = None if self.generator is None else self.generator.get_state()
        try:
            return self._plan(inputs, targets)
        except Exception:
            if gen_state is not None and self.generator is not None:  # saved from the generator
                self.generator.set_state(gen_state)
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             inputs: Tensor | None = None, targets: Tensor | None = None) -> Any:
        """One natural-gradient update.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
            inputs: the batch inputs (default: recorded from the latest grad-enabled forward).
            targets: the batch labels (needed for ``kind="empirical"`` with the current or the
                previous batch as the Fisher batch).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = self._evaluate_closure(closure, "NaturalGradient", self._step)
        plan = self._plan_or_undo(inputs, targets)
        if plan["source"] is not None:
            self.counts["fisher_builds"] += 1
            if plan["source"] == "pending":
                self._pending = None
        self._fishers, self._fisher_state = plan["fishers"], plan["fstate"]
        self._apply(plan["directions"], plan["bufs"])
        if self.fisher_batch == "independent":
            self._prev_batch = plan["current"]
        self._step = plan["t"] + 1
        self.inputs.reset()
        return loss

    @torch.no_grad()
    def direction(self, *, inputs: Tensor | None = None, targets: Tensor | None = None) -> list[Tensor]:
        """The parameter change the next :meth:`step` would make, without changing any state.

        A Fisher refresh is computed but not kept; the generator is restored.

        Args:
            inputs: the batch inputs (default: recorded from the latest grad-enabled forward).
            targets: the batch labels (as for :meth:`step`).

        Returns:
            ``Δθ``, tensors shaped like the parameters in ``param_groups`` order.
        """
        gen_state = None if self.generator is None else self.generator.get_state()
        try:
            plan = self._plan(inputs, targets)
        finally:
            if gen_state is not None and self.generator is not None:  # saved from the generator
                self.generator.set_state(gen_state)
        return self._as_update(plan["directions"])

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra.update(fisher=self._fisher_state, prev_batch=self._prev_batch,
                     pending=self._pending, counts=dict(self.counts))
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        dev = self.device

        def move(b):
            return None if b is None else tuple(None if v is None else v.to(dev) for v in b)

        self._prev_batch, self._pending = move(extra["prev_batch"]), move(extra["pending"])
        self.counts = dict(extra["counts"])
        state = extra["fisher"]
        if state is None:
            self._fishers = self._fisher_state = None
        else:
            state = [{"a": [a.to(dev) for a in s["a"]], "e": [e.to(dev) for e in s["e"]],
                      "num_data": s["num_data"]} for s in state]
            self._fisher_state, self._fishers = state, self._rebuild(state)
        self.inputs.reset()
