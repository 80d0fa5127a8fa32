"""Algorithm 1 bookkeeping shared by FOOF and KFAC.

Factor EMAs, the T/S schedule, inversions, and data-parallel averaging of the factors.

Steps are counted ``t = 0, 1, 2, …`` (``t`` = number of completed steps), with inversion period
``T = inv_period`` and ``S = ema_steps ≤ T``. Two update orders (``precondition_with``):

``"previous"`` (default; Algorithm 1 of the paper, App. K, in the order the paper's public code
runs it). Within step ``t``:

1. the update ``θ ← θ − η ω θ − η P(m)`` with the inverses as they are *before* this batch;
2. statistics step iff ``t mod T ∈ {T − S, …, T − 1}`` (Algorithm 1, lines 10–12):
   ``X̄ ← m X̄ + (1 − m) X_t`` for every factor ``X`` of this batch, ``w ← m w + (1 − m)``
   (``w`` starts at 0);
3. inversion step iff ``t mod T = T − 1`` (Algorithm 1, lines 7–9, counted from 1 as the
   public code does): the normalised factors ``X̂ = X̄ / w`` (bias-corrected EMA, App. D.1) are
   averaged across ranks under ``torch.distributed`` and the damped inverses rebuilt; they
   precondition steps ``t + 1, …, t + T``.

So the preconditioner of step ``t`` never contains batch ``t``: it holds the ``S`` batches
before the latest inversion (at least one step stale, as in the paper). The first update uses
the initial factors: those of :meth:`FactoredOptimizer.initialize` (App. K: "perform Line 11 of
Algorithm 1 for a number of minibatches before training and then Line 8 once"), or, without it,
the first batch's own factors (the first batch then initialises the EMA and is not added again).

``"current"`` (curvkit's earlier order): the batch of step ``t`` is folded in *before* the
update. Statistics steps are ``t mod T ∈ {0, T − S + 1, …, T − 1}`` (the ``S`` steps ending at
the inversion), inversion steps ``t mod T = 0``, and within step ``t`` the order is statistics,
inversion, update. The preconditioner of an inversion step contains its own batch (with
``ema_decay=0`` it *is* that batch), which lowers the noise of ``P`` but correlates it with the
gradient it preconditions: with subsampled factors (``m = 0``) this changes results measurably
(on MNIST-1D subsampled KFAC reaches a final loss about 2× higher than under ``"previous"``).

With ``m = 0, T = S = 1``: ``"current"`` preconditions each step with its own batch's factors,
``"previous"`` with the previous batch's (the first step with its own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.curvature.streaming import Recorder
from curvkit.optim.base import CurvatureOptimizer, check_int, check_unit_interval, is_distributed

#: The update orders of :class:`FactoredOptimizer` (see module doc).
ORDERS = ("previous", "current")


@dataclass(frozen=True)
class Schedule:
    """Algorithm 1's amortisation schedule (see module doc).

    Inversion every ``inv_period`` (T) steps, factor EMA updates during the ``ema_steps`` (S)
    steps ending at each inversion.

    Args:
        inv_period: ``T ≥ 1``.
        ema_steps: ``S``, ``1 ≤ S ≤ T``.
        order: ``"previous"`` (Algorithm 1: statistics at ``t mod T ∈ {T−S, …, T−1}``, inversion
            after the update at ``t mod T = T − 1``) or ``"current"`` (statistics at
            ``t mod T ∈ {0, T−S+1, …, T−1}``, inversion before the update at ``t mod T = 0``).
    """

    inv_period: int
    ema_steps: int
    order: str = "previous"

    def is_stats(self, t: int) -> bool:
        """Whether step ``t`` updates the factor EMAs."""
        if self.order == "previous":
            return t % self.inv_period >= self.inv_period - self.ema_steps
        return (t + self.ema_steps - 1) % self.inv_period < self.ema_steps

    def is_inversion(self, t: int) -> bool:
        """Whether step ``t`` rebuilds the inverses.

        After its update for ``"previous"``, before it for ``"current"``.
        """
        if self.order == "previous":
            return t % self.inv_period == self.inv_period - 1
        return t % self.inv_period == 0

    @property
    def inverts_before_update(self) -> bool:
        """Whether an inversion step's new inverses precondition that step's own update."""
        return self.order == "current"


@dataclass
class Plan:
    """Everything one step would change, computed without changing anything."""

    t: int
    stats: bool
    ema: list[dict[str, Tensor]] | None
    ema_weight: float
    precond: list[dict[str, Any]] | None
    precond_before: bool
    bufs: dict[int, Tensor]
    vectors: list[Tensor | None]
    directions: list[Tensor | None] = field(default_factory=list)


class FactoredOptimizer(CurvatureOptimizer):
    """Base of FOOF and KFAC: per-layer Kronecker factors with Algorithm 1's schedule.

    Subclasses define :attr:`factor_names`, :meth:`_batch_factors` (this batch's factors from
    the recorded inputs/errors), :meth:`_invert` (preconditioner pieces from the normalised
    factors) and :meth:`_precondition` (``P(M)`` for a ``d_out × d_in`` matrix).

    Args:
        model, params, defaults, generator, needs_generator: see :class:`CurvatureOptimizer`.
        ema_decay: ``m ∈ [0, 1)``.
        inv_period: ``T ≥ 1``.
        ema_steps: ``S`` with ``1 ≤ S ≤ T`` (``None``: ``S = T``).
        precondition_with: ``"previous"`` (Algorithm 1: precondition with the factors as they
            were before this batch) or ``"current"`` (fold this batch in first); module doc.
        keep_outputs: whether the layer recorder keeps the layer outputs (KFAC's extra backward).
    """

    factor_names: tuple[str, ...] = ("A",)

    def __init__(
        self,
        model: nn.Module,
        params: Iterable | None,
        defaults: dict[str, Any],
        *,
        ema_decay: float,
        inv_period: int,
        ema_steps: int | None,
        precondition_with: str = "previous",
        keep_outputs: bool = False,
        generator: torch.Generator | None = None,
        needs_generator: bool = False,
    ) -> None:
        owner = type(self).__name__
        self.ema_decay = check_unit_interval("ema_decay", ema_decay, owner)
        inv_period = check_int("inv_period", inv_period, owner)
        ema_steps = inv_period if ema_steps is None else check_int("ema_steps", ema_steps, owner)
        if ema_steps > inv_period:
            raise ValueError(f"{owner}: ema_steps={ema_steps} > inv_period={inv_period}; Algorithm 1 "
                             "updates the factor EMAs during the S ≤ T steps before each inversion. "
                             "Pass ema_steps ≤ inv_period.")
        if precondition_with not in ORDERS:
            raise ValueError(f"{owner}: unknown precondition_with {precondition_with!r}; valid: "
                             f"{list(ORDERS)}")
        self.precondition_with = precondition_with
        self.schedule = Schedule(inv_period, ema_steps, precondition_with)
        super().__init__(model, params, defaults, generator=generator, needs_generator=needs_generator)
        self.recorder = Recorder(self.layers, keep_outputs=keep_outputs, model=model)  # + guard
        self._hooks.append(self.recorder)
        self._ema_weight = 0.0
        self.counts = {"ema_updates": 0, "inversions": 0}
        self._set_recording(self._records_at(0))

    # ------------------------------------------------------------------ subclass contract
    def _batch_factors(self, t: int) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def _invert(self, i: int, factors: dict[str, Tensor], damping: float) -> dict[str, Any]:
        raise NotImplementedError

    def _precondition(self, i: int, pieces: dict[str, Any], M: Tensor, damping: float) -> Tensor:
        raise NotImplementedError

    def _set_recording(self, on: bool) -> None:
        self.recorder.enabled = on

    def _records_at(self, t: int) -> bool:
        """Whether step ``t`` needs this batch's factors.

        A statistics step, or the first batch initialising the factors when there are none yet.
        """
        return self.schedule.is_stats(t) or self._ema_weight == 0

    def _reset_records(self) -> None:
        self.recorder.reset()

    def _trained_variant(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`_directions` for the direction :meth:`step` follows."""
        return {}

    def _on_refused(self) -> None:
        """Undo side effects of the forward pass when a step is refused (KFAC: MC sampling)."""

    # ------------------------------------------------------------------ state access
    def _layer_key(self, i: int) -> nn.Parameter:
        return self.layer_params(self.layers[i])[0]

    def _layer_state(self, i: int, write: bool = False) -> dict[str, Any]:
        """Layer ``i``'s state (factor EMAs, inverses); reading never creates entries."""
        key = self._layer_key(i)
        return self.state[key] if write else self.state.get(key, {})

    def factors(self) -> list[dict[str, Tensor]]:
        """Per layer, the current normalised EMA factors ``X̂ = X̄ / w`` (copies).

        E.g. ``{"A": Â}`` (FOOF) or ``{"A": Â, "B": B̂}`` (KFAC); empty before the first
        statistics step.
        """
        if self._ema_weight == 0:
            return [{} for _ in self.layers]
        return [{k: self._layer_state(i)[k] / self._ema_weight for k in self.factor_names}
                for i in range(len(self.layers))]

    # ------------------------------------------------------------------ records
    def _recorded_inputs(self, t: int) -> list[Tensor]:
        out = []
        for layer, a in zip(self.layers, self.recorder.records.inputs):
            if a is None:
                raise RuntimeError(
                    f"{type(self).__name__}: step {t} updates the factors, but no input of layer "
                    f"{layer.describe()} was recorded. Run the forward pass with gradients enabled "
                    "(not under torch.no_grad()) before opt.step(), or pass a closure."
                )
            out.append(a)
        return out

    def _check_finite(self, batch: list[dict[str, Tensor]], what: dict[str, str], t: int) -> None:
        """One synchronisation for all factors of a batch.

        A Gram matrix ``Σ x xᵀ`` is finite iff its diagonal is (``|G_ij| ≤ √(G_ii G_jj)``), so
        only the diagonals are summed.
        """
        sums = torch.stack([d[k].diagonal().sum() for d in batch for k in d])
        if bool(torch.isfinite(sums).all()):
            return
        bad = int((~torch.isfinite(sums)).nonzero()[0, 0])
        i, k = divmod(bad, len(batch[0]))
        raise FloatingPointError(f"{type(self).__name__}: the {what[list(batch[i])[k]]} of layer "
                                 f"{self.layers[i].describe()} at step {t} has non-finite values; "
                                 "the step was refused and the optimizer state is unchanged")

    # ------------------------------------------------------------------ the step
    def _new_ema(self, batch: list[dict[str, Tensor]]) -> tuple[list[dict[str, Tensor]], float]:
        m = self.ema_decay
        ema = []
        for i, b in enumerate(batch):
            st = self._layer_state(i)
            # m X̄ + (1 − m) X as one lerp; exactly X when m = 0
            ema.append({k: v if m == 0 else (1 - m) * v if k not in st
                        else torch.lerp(st[k].to(v), v, 1 - m) for k, v in b.items()})
        return ema, m * self._ema_weight + (1 - m)

    def _average_across_ranks(self, ema: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Average the factor EMAs over ranks (one all-reduce); identity without distribution."""
        if not is_distributed():
            return ema
        flat = torch.cat([d[k].reshape(-1) for d in ema for k in self.factor_names])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        out, off = [], 0
        for d in ema:
            nd = {}
            for k in self.factor_names:
                n = d[k].numel()
                nd[k] = flat[off: off + n].reshape(d[k].shape)
                off += n
            out.append(nd)
        return out

    def _invert_all(self, ema: list[dict[str, Tensor]], weight: float) -> list[dict[str, Any]]:
        """Preconditioner pieces of every layer from the (unnormalised, rank-averaged) EMAs.

        Each EMA is divided by its weight ``w`` first.
        """
        return [self._invert(i, {k: v / weight for k, v in ema[i].items()},
                             self.param_groups[gi]["damping"])
                for i, gi in enumerate(self.layer_groups)]

    def _plan(self, final: bool = True, **variant: Any) -> Plan:
        """The step as a :class:`Plan`.

        ``final=False`` (for :meth:`direction`) skips an inversion that would only serve later
        steps.
        """
        t = self._step
        self._check_hooks()
        sched = self.schedule
        init = self._ema_weight == 0  # no factors yet: this batch initialises them
        stats = init or sched.is_stats(t)
        grads = self._gradients()
        ema, weight = None, self._ema_weight
        if stats:
            ema, weight = self._new_ema(self._batch_factors(t))
        before = init or (sched.inverts_before_update and sched.is_inversion(t))
        after = not init and not sched.inverts_before_update and sched.is_inversion(t)
        precond = None
        if before or (after and final):
            if ema is None:
                ema = [{k: self._layer_state(i)[k] for k in self.factor_names}
                       for i in range(len(self.layers))]
            ema = self._average_across_ranks(ema)
            precond = self._invert_all(ema, weight)
        bufs = self._momentum_buffers(grads)
        plan = Plan(t, stats, ema, weight, precond, before, bufs, self._layer_vectors(bufs))
        plan.directions = self._directions(plan, **variant)
        return plan

    def _pieces(self, plan: Plan, i: int) -> dict[str, Any]:
        """The preconditioner pieces that act on this step's update."""
        if plan.precond is not None and plan.precond_before:
            return plan.precond[i]
        st = self._layer_state(i)
        if "precond" not in st:
            raise RuntimeError(f"{type(self).__name__}: no preconditioner for layer "
                               f"{self.layers[i].describe()} (state missing)")
        return st["precond"]

    def _directions(self, plan: Plan) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for i, (gi, M) in enumerate(zip(self.layer_groups, plan.vectors)):
            if M is None:
                out.append(None)
                continue
            out.append(self._precondition(i, self._pieces(plan, i), M, self.param_groups[gi]["damping"]))
        return out

    def _commit(self, plan: Plan) -> None:
        if plan.ema is not None:
            for i, d in enumerate(plan.ema):
                self._layer_state(i, write=True).update(d)
            self._ema_weight = plan.ema_weight
        if plan.stats:
            self.counts["ema_updates"] += 1
        if plan.precond is not None:
            for i, pieces in enumerate(plan.precond):
                self._layer_state(i, write=True)["precond"] = pieces
            self.counts["inversions"] += 1
        self._apply(self.layer_directions_to_params(plan.directions, plan.bufs), plan.bufs)
        self._step = plan.t + 1
        self._reset_records()
        self._set_recording(self._records_at(self._step))

    def _plan_or_undo(self, **variant: Any) -> Plan:
        try:
            return self._plan(**variant)
        except Exception:
            self._on_refused()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update (see the class docstring for the rule and the module doc for the schedule).

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            FloatingPointError: non-finite loss, gradient, layer inputs or errors; nothing changed.
            RuntimeError: a statistics step without a recorded forward pass.
        """
        loss = self._evaluate_closure(closure, type(self).__name__, self._step)
        plan = self._plan_or_undo(**self._trained_variant())
        self._commit(plan)
        return loss

    @torch.no_grad()
    def direction(self) -> list[Tensor]:
        """The parameter change ``Δθ`` the next :meth:`step` would make, without changing state.

        The same EMA update, inversion, momentum and weight decay as :meth:`step`. Under
        ``torch.distributed`` an inversion step all-reduces, so call it on every rank.

        Returns:
            Tensors shaped like the parameters, in ``param_groups`` order.
        """
        plan = self._plan_or_undo(final=False)
        return self._as_update(self.layer_directions_to_params(plan.directions, plan.bufs))

    # ------------------------------------------------------------------ initialisation (App. K)
    @torch.no_grad()
    def initialize(self, batches: Iterable[Any], init_batches: int | None = None) -> int:
        """App. K initialisation of the factor EMAs before training.

        "Perform Line 11 of Algorithm 1 for a number of minibatches (50) before training and then
        executing Line 8 once", with the EMA normalised.

        Each batch is an input tensor or a tuple/list whose first entry is the input; one forward
        pass (with gradients enabled, parameters untouched) is run per batch, its factors enter
        the EMA (``X̄ ← m X̄ + (1 − m) X``), and the damped inverses are built once from the
        normalised EMA. The step counter is not advanced. Under the default
        ``precondition_with="previous"`` the first update then uses exactly these initial
        factors; under ``"current"`` step 0 adds its own batch and inverts as scheduled.

        Args:
            batches: an iterable of batches (e.g. a ``DataLoader``).
            init_batches: use at most this many batches of ``batches`` (the paper: 50;
                ``None``: all).

        Returns:
            The number of batches used.

        Raises:
            ValueError: no batches, or ``init_batches < 1``.
            FloatingPointError: non-finite inputs or errors; the optimizer state is unchanged.
        """
        owner = type(self).__name__
        if init_batches is not None:
            init_batches = check_int("init_batches", init_batches, owner)
        self._check_hooks()
        n = 0
        saved = [{k: st[k] for k in self.factor_names if k in st}
                 for st in (self._layer_state(i) for i in range(len(self.layers)))]
        saved_weight, saved_counts = self._ema_weight, dict(self.counts)
        gen_state = None if self.generator is None else self.generator.get_state()
        try:
            for batch in batches:
                if init_batches is not None and n >= init_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                self._reset_records()
                self._set_recording(True)
                with torch.enable_grad():
                    self.model(x)
                ema, weight = self._new_ema(self._batch_factors(self._step))
                for i, d in enumerate(ema):
                    self._layer_state(i, write=True).update(d)
                self._ema_weight = weight
                self.counts["ema_updates"] += 1
                n += 1
            if n == 0:
                raise ValueError(f"{owner}.initialize: no batches given")
            ema = self._average_across_ranks([{k: self._layer_state(i)[k] for k in self.factor_names}
                                              for i in range(len(self.layers))])
            precond = self._invert_all(ema, self._ema_weight)
        except Exception:
            if gen_state is not None and self.generator is not None:  # saved from the generator
                self.generator.set_state(gen_state)
            for i, d in enumerate(saved):
                key = self._layer_key(i)
                st = self.state.get(key, {})
                for k in self.factor_names:
                    st.pop(k, None)
                st.update(d)
                if not st:
                    self.state.pop(key, None)
            self._ema_weight, self.counts = saved_weight, saved_counts
            raise
        finally:
            self._reset_records()
            self._set_recording(self._records_at(self._step))
        for i, pieces in enumerate(precond):
            st = self._layer_state(i, write=True)
            st.update(ema[i])
            st["precond"] = pieces
        self.counts["inversions"] += 1
        return n

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra.update(ema_weight=self._ema_weight, counts=dict(self.counts))
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._ema_weight = float(extra["ema_weight"])
        self.counts = dict(extra["counts"])
        self._reset_records()
        self._set_recording(self._records_at(self._step))


def norm_ratio(a: Tensor, b: Tensor) -> float:
    """``‖a‖_F / ‖b‖_F`` (1 when ``b = 0``)."""
    nb = float(torch.linalg.vector_norm(b))
    return 1.0 if nb == 0 or not math.isfinite(nb) else float(torch.linalg.vector_norm(a)) / nb
