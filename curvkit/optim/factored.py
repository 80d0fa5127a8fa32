"""Algorithm 1 bookkeeping shared by FOOF and KFAC: factor EMAs, the T/S schedule, inversions,
and data-parallel averaging of the factors.

Schedule (math_spec §6.2, pinned ordering). Steps are counted ``t = 0, 1, 2, …`` (``t`` = number
of completed steps). With inversion period ``T = inv_period`` and ``S = ema_steps ≤ T``:

* step ``t`` is a *statistics step* iff ``(t + S − 1) mod T < S``, i.e. ``t mod T`` is ``0`` or
  one of the ``S − 1`` steps before it: the ``S`` steps ending at an inversion step;
* step ``t`` is an *inversion step* iff ``t mod T = 0`` (always also a statistics step).

Within step ``t`` the order is

1. statistics step: ``X̄ ← m X̄ + (1 − m) X_t`` for every factor ``X`` of the batch of step ``t``
   (recorded during that step's forward pass), and ``w ← m w + (1 − m)`` (``w`` starts at 0);
2. inversion step: the normalised factors ``X̂ = X̄ / w`` (bias-corrected EMA, equal to
   ``X_t`` at the first statistics step) are averaged across ranks under ``torch.distributed``
   and the damped inverses are rebuilt from them;
3. the update ``θ ← θ − η ω θ − η P(m)`` with the current inverses.

This is Algorithm 1 with lines 10–12 (EMA) and 7–9 (inversion) moved before line 6 (update), so
that the first step inverts the first batch's factors ("initialisation from the first batch",
App. K; :meth:`FactoredOptimizer.initialize` pre-fills the EMA from extra batches as in App. K),
and with ``m = 0, T = S = 1`` every step uses exactly the current batch's factors. The set of
batches that enter each inverse is the same ``S``-step window as in the paper, shifted to end
at (and include) the inversion step; the official code uses the same ordering within a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.capture import Recorder
from curvkit.optim.base import CurvatureOptimizer, check_int, check_unit_interval, is_distributed


@dataclass(frozen=True)
class Schedule:
    """Algorithm 1's amortisation: inversion every ``inv_period`` (T) steps, factor EMA updates
    during the ``ema_steps`` (S) steps ending at each inversion step (see module doc)."""

    inv_period: int
    ema_steps: int

    def is_stats(self, t: int) -> bool:
        """Whether step ``t`` updates the factor EMAs."""
        return (t + self.ema_steps - 1) % self.inv_period < self.ema_steps

    def is_inversion(self, t: int) -> bool:
        """Whether step ``t`` rebuilds the inverses."""
        return t % self.inv_period == 0


@dataclass
class Plan:
    """Everything one step would change, computed without changing anything."""

    t: int
    stats: bool
    inversion: bool
    ema: list[dict[str, Tensor]] | None
    ema_weight: float
    precond: list[dict[str, Any]] | None
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
        ema_steps: ``S`` with ``1 ≤ S ≤ T``.
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
        ema_steps: int,
        keep_outputs: bool = False,
        generator: torch.Generator | None = None,
        needs_generator: bool = False,
    ) -> None:
        owner = type(self).__name__
        self.ema_decay = check_unit_interval("ema_decay", ema_decay, owner)
        inv_period = check_int("inv_period", inv_period, owner)
        ema_steps = check_int("ema_steps", ema_steps, owner)
        if ema_steps > inv_period:
            raise ValueError(f"{owner}: ema_steps={ema_steps} > inv_period={inv_period}; Algorithm 1 "
                             "updates the factor EMAs during the S ≤ T steps before each inversion. "
                             "Pass ema_steps ≤ inv_period.")
        self.schedule = Schedule(inv_period, ema_steps)
        super().__init__(model, params, defaults, generator=generator, needs_generator=needs_generator)
        self.recorder = Recorder(self.layers, keep_outputs=keep_outputs)
        self._hooks.append(self.recorder)
        self._ema_weight = 0.0
        self.counts = {"ema_updates": 0, "inversions": 0}
        self._set_recording(self.schedule.is_stats(0))

    # ------------------------------------------------------------------ subclass contract
    def _batch_factors(self, t: int) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def _invert(self, i: int, factors: dict[str, Tensor], damping: float) -> dict[str, Any]:
        raise NotImplementedError

    def _precondition(self, i: int, pieces: dict[str, Any], M: Tensor, damping: float) -> Tensor:
        raise NotImplementedError

    def _set_recording(self, on: bool) -> None:
        self.recorder.enabled = on

    def _reset_records(self) -> None:
        self.recorder.reset()

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
        """Per layer, the current normalised EMA factors ``X̂ = X̄ / w`` (copies), e.g.
        ``{"A": Â}`` (FOOF) or ``{"A": Â, "B": B̂}`` (KFAC); empty before the first statistics step."""
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

    @staticmethod
    def _check_finite(name: str, X: Tensor, layer_desc: str, t: int, owner: str) -> None:
        if not bool(torch.isfinite(X).all()):
            raise FloatingPointError(f"{owner}: the {name} of layer {layer_desc} at step {t} has "
                                     "non-finite values; the step was refused and the optimizer "
                                     "state is unchanged")

    # ------------------------------------------------------------------ the step
    def _new_ema(self, batch: list[dict[str, Tensor]]) -> tuple[list[dict[str, Tensor]], float]:
        m = self.ema_decay
        ema = []
        for i, b in enumerate(batch):
            st = self._layer_state(i)
            # m X̄ + (1 − m) X as one lerp; exactly X when m = 0
            ema.append({k: v if m == 0 else (1 - m) * v if k not in st else torch.lerp(st[k], v, 1 - m)
                        for k, v in b.items()})
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

    def _plan(self, **variant: Any) -> Plan:
        t = self._step
        self._check_hooks()
        stats, inversion = self.schedule.is_stats(t), self.schedule.is_inversion(t)
        grads = self._gradients()
        ema, weight = None, self._ema_weight
        if stats:
            ema, weight = self._new_ema(self._batch_factors(t))
        precond = None
        if inversion:
            if ema is None:
                if self._ema_weight == 0:
                    raise RuntimeError(f"{type(self).__name__}: no factor statistics to invert at step {t}")
                ema = [{k: self._layer_state(i)[k] for k in self.factor_names}
                       for i in range(len(self.layers))]
            ema = self._average_across_ranks(ema)
            precond = []
            for i, gi in enumerate(self.layer_groups):
                normalised = {k: v / weight for k, v in ema[i].items()}
                precond.append(self._invert(i, normalised, self.param_groups[gi]["damping"]))
        bufs = self._momentum_buffers(grads)
        plan = Plan(t, stats, inversion, ema, weight, precond, bufs, self._layer_vectors(bufs))
        plan.directions = self._directions(plan, **variant)
        return plan

    def _pieces(self, plan: Plan, i: int) -> dict[str, Any]:
        if plan.precond is not None:
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
        self._apply(self.layer_directions_to_params(plan.directions), plan.bufs)
        self._step = plan.t + 1
        self._reset_records()
        self._set_recording(self.schedule.is_stats(self._step))

    def _plan_or_undo(self, **variant: Any) -> Plan:
        try:
            return self._plan(**variant)
        except Exception:
            self._on_refused()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
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
        plan = self._plan_or_undo()
        self._commit(plan)
        return loss

    @torch.no_grad()
    def direction(self) -> list[Tensor]:
        """The parameter change ``Δθ`` the next :meth:`step` would make (same EMA update,
        inversion, momentum and weight decay), without changing any state. Under
        ``torch.distributed`` an inversion step all-reduces, so call it on every rank.

        Returns:
            Tensors shaped like the parameters, in ``param_groups`` order.
        """
        return self._as_update(self.layer_directions_to_params(self._plan_or_undo().directions))

    # ------------------------------------------------------------------ initialisation (App. K)
    @torch.no_grad()
    def initialize(self, batches: Iterable[Any]) -> int:
        """Pre-fill the factor EMAs from extra batches and invert once (App. K: "perform line 11
        of Algorithm 1 for a number of minibatches before training and then line 8 once").

        Each batch is an input tensor or a tuple/list whose first entry is the input; one forward
        pass (with gradients enabled, parameters untouched) is run per batch. The step counter
        is not advanced: step 0 then adds its own batch and inverts as scheduled.

        Returns:
            The number of batches used.
        """
        self._check_hooks()
        was = self.recorder.enabled
        n = 0
        try:
            for batch in batches:
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
        finally:
            self._reset_records()
            self._set_recording(was)
        if n == 0:
            raise ValueError(f"{type(self).__name__}.initialize: no batches given")
        ema = self._average_across_ranks([{k: self._layer_state(i)[k] for k in self.factor_names}
                                          for i in range(len(self.layers))])
        for i, gi in enumerate(self.layer_groups):
            st = self._layer_state(i, write=True)
            st.update(ema[i])
            st["precond"] = self._invert(i, {k: v / self._ema_weight for k, v in ema[i].items()},
                                         self.param_groups[gi]["damping"])
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
        self._set_recording(self.schedule.is_stats(self._step))


def location_gram(x: Tensor) -> Tensor:
    """``Σ_m Σ_t x_{mt} x_{mt}ᵀ`` for ``x`` of shape ``(M, T, d)``, symmetrised.

    The input factor is ``Â = location_gram(a) / N`` and KFAC's output factor
    ``B̂ = location_gram(e) / T`` (the formulas of :func:`curvkit.curvature.kfac.input_factor` and
    ``output_factor``). Unfolded convolution patches arrive as a transposed view of a contiguous
    ``(M, d, T)`` tensor; when ``d ≤ T`` the sum is taken as one batched product on that view,
    which avoids copying the ``M·T·d`` patches.
    """
    M, T, d = x.shape
    xt = x.transpose(1, 2)
    if T > 1 and d <= T and xt.is_contiguous():
        G = torch.bmm(xt, x).sum(0)
    else:
        flat = x.reshape(-1, d)
        G = flat.T @ flat
    return 0.5 * (G + G.T)


def norm_ratio(a: Tensor, b: Tensor) -> float:
    """``‖a‖_F / ‖b‖_F`` (1 when ``b = 0``)."""
    nb = float(torch.linalg.vector_norm(b))
    return 1.0 if nb == 0 or not math.isfinite(nb) else float(torch.linalg.vector_norm(a)) / nb
