"""The :class:`EWC` object: configuration, consolidation, the penalty, memory and state.

The math (Benzing 2022, App. C.2) is in the package docstring (:mod:`curvkit.ewc`); the stored
Fisher forms in :mod:`curvkit.ewc.terms`, the parameter layout in :mod:`curvkit.ewc.layout`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit.curvature import distributed as dd
from curvkit.curvature import fisher, structures
from curvkit.curvature.streaming import KINDS, LIKELIHOODS
from curvkit.ewc.layout import ParameterLayout
from curvkit.ewc.terms import Term, term_of
from curvkit.typing import Kind, Likelihood, Structure

__all__ = ["EWC", "DISTRIBUTED_MODES"]

_STATE_VERSION = 3
_READABLE_VERSIONS = (2, 3)  # version 2: before distributed="shard" (all columns on every rank)
#: Values of ``EWC(distributed=...)``.
DISTRIBUTED_MODES = ("gather", "shard")
Distributed = Literal["gather", "shard"]


class EWC:
    """EWC penalty ``(κ/2) Σ_t (θ − θ*_t)ᵀ F_t (θ − θ*_t)`` with a curvkit Fisher per task.

    See :mod:`curvkit.ewc` for the math (Benzing 2022, App. C.2), the Fisher normalisation (mean
    Fisher, ``1/N``), the online variant and the memory formula.

    Example::

        ewc = EWC(model, strength=100.0, structure="full", kind="mc")
        for task in tasks:
            train(model, task, extra_loss=ewc.penalty if ewc.num_tasks else None)
            ewc.consolidate(task.x[:200], task.y[:200])

    Args:
        model: the network (supported layers: those of :func:`curvkit.fisher`).
        strength: ``κ ≥ 0``; the penalty is ``(κ/2) Δᵀ F Δ`` with the mean Fisher ``F``.
        kind: Fisher kind, ``"exact"``, ``"mc"`` or ``"empirical"``.
        structure: any registered structure (:func:`curvkit.structures`): ``"full"`` (stored
            per-layer inputs and errors, exact subsampled Fisher), ``"kfac"``, ``"diag"``,
            ``"block_diag"``, ...
        likelihood: default likelihood of :meth:`consolidate` (``"classification"``,
            ``"regression"``, ``"binary"``).
        mc_samples: ``S`` for ``kind="mc"``.
        generator: ``torch.Generator`` for MC label sampling.
        decay: ``None`` for one anchor and Fisher per task; ``γ ∈ [0, 1]`` for online EWC
            (``F̃ ← γ F̃ + F_new``, anchor = latest consolidation).
        params: the parameters to protect (default: all with ``requires_grad`` at construction).
            They are remembered by name, so :meth:`penalty` always uses the model's current
            tensors.
        distributed: what a rank keeps of a ``"full"`` / ``"block_diag"`` Fisher under
            ``torch.distributed`` (no effect on one process or for other structures, whose
            small factors are all-reduced and replicated). ``"gather"`` (default): every
            rank's Woodbury columns are copied to every rank, and :meth:`penalty` is the full
            penalty on each. ``"shard"``: rank ``r`` keeps only its own columns ``U_r`` of the
            union Fisher ``F = Σ_r U_r U_rᵀ`` (memory per rank shrinks with the number of
            ranks ``W``), and :meth:`penalty` is this rank's **DDP share**; its gradient,
            averaged over the ranks by ``DistributedDataParallel``, is the full penalty's
            gradient, and :meth:`penalty_value` (a collective) gives the full value.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: bad ``strength``, ``kind``, ``structure``, ``likelihood``, ``decay``,
            ``params`` or ``distributed``.
    """

    def __init__(
        self,
        model: nn.Module,
        strength: float = 100.0,
        *,
        kind: Kind = "exact",
        structure: Structure = "full",
        likelihood: Likelihood = "classification",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        decay: float | None = None,
        params: Sequence[nn.Parameter] | None = None,
        distributed: Distributed = "gather",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EWC needs an nn.Module, got {type(model).__name__}")
        if distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"EWC: distributed must be one of {list(DISTRIBUTED_MODES)} "
                             f"('gather': every rank holds all Woodbury columns; 'shard': each "
                             f"rank its own), got {distributed!r}")
        self.distributed = distributed
        self.model = model
        self.strength = strength
        _check_config(kind, likelihood, structure, mc_samples, decay)
        self.kind, self.structure, self.likelihood = kind, structure, likelihood
        self.mc_samples, self.generator = mc_samples, generator
        self.decay = None if decay is None else float(decay)
        self.layout = ParameterLayout(model, params)
        self.num_tasks = 0
        self._anchors: list[list[Tensor]] = []
        self._terms: list[Term] = []

    # ------------------------------------------------------------------ configuration
    @property
    def strength(self) -> float:
        """``κ``, the multiplier of ``½ Δᵀ F Δ`` (settable; must be finite and ≥ 0)."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        if isinstance(value, Tensor):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"EWC strength must be a finite number ≥ 0, got {value!r}")
        self._strength = float(value)

    @property
    def param_names(self) -> list[str]:
        """Names (in ``model.named_parameters()``) of the protected parameters."""
        return self.layout.names

    # ------------------------------------------------------------------ consolidate
    def consolidate(
        self,
        inputs: Any,
        targets: Tensor | None = None,
        *,
        likelihood: Likelihood | None = None,
        progress: bool | None = None,
    ) -> None:
        """Store ``θ*`` and the Fisher of ``(inputs, targets)`` at the current parameters.

        Call after training on a task. The Fisher is built by :func:`curvkit.fisher` with the
        ``kind``, ``structure``, ``mc_samples`` and ``generator`` given at construction; for
        ``"full"`` only its per-layer inputs ``ã (N, T, d_in)`` and errors ``ẽ (N·R, T, d_out)``
        are kept. Pass a subsample of the task's data to bound the memory (``N`` inputs).
        Put the model in ``eval()`` mode first if it has dropout / batch-norm.

        Args:
            inputs: the consolidation batch ``(N, ...)`` (tensor, tuple or dict as in
                :func:`curvkit.fisher`), or an iterable of batches (a ``DataLoader``): then
                ``F_t`` is the Fisher of the union of all batches (all ``N`` data; with
                ``torch.distributed`` the union of every rank's shard; with
                ``distributed="shard"`` this rank keeps only its own Woodbury columns, and
                every rank must call ``consolidate`` together).
            targets: data labels (needed for ``kind="empirical"``); with an iterable, in its
                batches.
            likelihood: overrides the likelihood given at construction.
            progress: tqdm progress bar over an iterable of batches (default on).

        Raises:
            FloatingPointError: non-finite parameters, inputs or Fisher factors.
            ValueError: the model's layout changed since the previous consolidation.
        """
        likelihood = self.likelihood if likelihood is None else likelihood
        params = self.layout.current()
        for n, p in zip(self.param_names, params):
            if not torch.isfinite(p).all():
                raise FloatingPointError(
                    f"EWC.consolidate: parameter '{n}' has non-finite values (nan/inf); the anchor "
                    "θ* must be finite -- fix the training run before consolidating"
                )
        if isinstance(inputs, Tensor) and inputs.is_floating_point() and not torch.isfinite(
                inputs).all():
            raise FloatingPointError("EWC.consolidate: inputs have non-finite values (nan/inf)")
        F = fisher(self.model, inputs, targets, likelihood=likelihood, kind=self.kind,
                   structure=self.structure, mc_samples=self.mc_samples, generator=self.generator,
                   params=params, progress=progress,
                   distributed_columns="shard" if self.distributed == "shard" else "gather")
        self.layout.adopt(F.layers, "consolidate")
        term = term_of(F)
        with torch.no_grad():
            anchor = [m.detach().clone() for m in self.layout.blocks()]
        if self.decay is None:
            self._anchors.append(anchor)
            term.anchor = len(self._anchors) - 1
            self._terms.append(term)
        else:
            self._anchors = [anchor]
            old = []
            for t in self._terms:
                t.coef *= self.decay
                t.anchor = 0
                if t.coef > 0:
                    old.append(t)
            if term.form == "diagonal" and old and old[-1].form == "diagonal":
                # diagonal Fishers merge exactly: F̃ = γ F̃_prev + F_new
                prev = old.pop()
                term.tensors["diagonal"] = (prev.coef * prev.tensors["diagonal"]
                                            + term.tensors["diagonal"])
            self._terms = [*old, term]
        self.num_tasks += 1

    # ------------------------------------------------------------------ penalty
    def penalty(self) -> Tensor:
        """``(κ/2) Σ_t (θ − θ*_t)ᵀ F_t (θ − θ*_t)`` at the current parameters (differentiable).

        For ``decay=γ`` the sum is over the stored Fishers with weights ``γ^{age}`` and the one
        latest anchor. Its autograd gradient is ``κ Σ_t F_t (θ − θ*_t)``.

        With ``distributed="shard"`` in a ``W``-process group, a sharded Fisher
        ``F_t = Σ_r U_{t,r} U_{t,r}ᵀ`` contributes only this rank's **DDP share**
        ``W · (κ/2) ‖U_{t,r}ᵀ Δ_t‖²`` (no collective: safe inside a DDP backward), and a
        replicated one (kfac, foof, diag, primal route) its full ``(κ/2) Δ_tᵀ F_t Δ_t``. Add it
        to the loss of the ``DistributedDataParallel`` model: DDP averages gradients over the
        ranks, ``(1/W) Σ_r W κ U_{t,r} U_{t,r}ᵀ Δ_t = κ F_t Δ_t``, exactly the full penalty's
        gradient. The value returned is this rank's share, not the penalty (the mean of the
        shares over the ranks is); use :meth:`penalty_value` to log it. If you *sum* gradients
        over ranks instead of averaging, divide the share by ``W``.

        Returns:
            A scalar tensor in the parameters' dtype, attached to the autograd graph.

        Raises:
            RuntimeError: no task has been consolidated yet.
            ValueError: the model changed shape since consolidation, or a sharded Fisher is used
                outside the process group (rank and world size) it was consolidated in.
            TypeError: the parameters' dtype changed since consolidation.
            FloatingPointError: the penalty is not finite (names the non-finite parameter).
        """
        if not self._terms:
            raise RuntimeError(
                "EWC.penalty() called before any consolidate(): there is no anchor θ* or Fisher "
                "yet. Call ewc.consolidate(inputs, targets) after training on a task (and skip the "
                "penalty while ewc.num_tasks == 0)."
            )
        mats = self.layout.blocks()
        dtype = mats[0].dtype
        stored = self._anchors[0][0].dtype
        if dtype != stored:
            raise TypeError(f"EWC: the model's parameters are {dtype} but were {stored} at "
                            "consolidation; cast the model back or re-consolidate")
        _check_shards(self._terms, "penalty")
        deltas = [[m - m0 for m, m0 in zip(mats, anchor)] for anchor in self._anchors]
        layers = self.layout.layers
        assert layers is not None  # set with the first term
        total = mats[0].new_zeros(())
        for term in self._terms:
            weight = term.coef * (1 if term.shard is None else term.shard[1])  # W · local share
            total = total + weight * term.quadratic(deltas[term.anchor], layers)
        out = 0.5 * self.strength * total
        if not torch.isfinite(out):
            for n, p in zip(self.param_names, self.layout.current()):
                if not torch.isfinite(p).all():
                    raise FloatingPointError(
                        f"EWC.penalty: parameter '{n}' has non-finite values (nan/inf)")
            raise FloatingPointError(
                f"EWC.penalty overflowed ({float(out.detach())}); the parameters moved very far "
                "from the anchor or the strength is too large")
        return out

    def penalty_value(self) -> Tensor:
        """The full penalty ``(κ/2) Σ_t Δ_tᵀ F_t Δ_t`` for logging (detached), on every rank.

        On one process, or with ``distributed="gather"``, this is ``penalty().detach()``. With
        ``distributed="shard"`` in a ``W``-process group it is the mean of the ranks' shares
        (:meth:`penalty`), ``(1/W) Σ_r share_r``, which is the full penalty; it is a
        **collective** (one all-reduce of a scalar, summed in float64): every rank must call it.

        Returns:
            A scalar tensor in the parameters' dtype, not attached to the autograd graph.

        Raises:
            RuntimeError, ValueError, TypeError, FloatingPointError: as :meth:`penalty`.
        """
        if self.distributed != "shard" or not dd.is_distributed():
            with torch.no_grad():
                return self.penalty().detach()
        failed: FloatingPointError | None = None
        try:
            with torch.no_grad():
                share = self.penalty().detach()
            buf = share.reshape(1).to(torch.float64).clone()
        except FloatingPointError as err:  # still join the collective, then raise on every rank
            ref = self._anchors[0][0]
            failed, share = err, ref.new_zeros(())
            buf = torch.full((1,), math.nan, dtype=torch.float64, device=ref.device)
        dd.all_reduce_sum([buf])
        if failed is not None:
            raise failed
        if not torch.isfinite(buf).all():
            raise FloatingPointError("EWC.penalty_value: the penalty share of another rank is "
                                     "not finite (that rank raised the reason)")
        return (buf[0] / dd.world_size()).to(share.dtype)

    # ------------------------------------------------------------------ memory
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes held by this process (see :mod:`curvkit.ewc` for the formula per structure).

        With ``distributed="shard"`` a sharded Fisher counts only this rank's columns
        (``N_r`` of the ``N`` data).

        Returns:
            ``{"curvature": ..., "anchors": ..., "total": ...}``.
        """
        curv = sum(t.nbytes() for t in self._terms)
        anchors = sum(m.numel() * m.element_size() for a in self._anchors for m in a)
        return {"curvature": curv, "anchors": anchors, "total": curv + anchors}

    def memory_bytes(self) -> int:
        """Total bytes of stored curvature and anchors.

        Full structure: ``b · Σ_t N_t Σ_l T_l (d_in,l + R · d_out,l) + b · P · (#anchors)``.

        Returns:
            The number of bytes.
        """
        return self.memory_breakdown()["total"]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Configuration, layout, anchors and stored Fishers, as plain data.

        Only numbers, strings, ``None``, lists, dicts and tensors (by reference, like
        ``torch.optim``), for every structure of :data:`curvkit.ewc.terms.STATE_STRUCTURES` and
        every kind, so ``torch.load(f)`` with its default ``weights_only=True`` reads it back.
        The generator is not part of the state.

        With ``distributed="shard"`` a sharded Fisher saves only **this rank's** columns (and
        ``[rank, world size]``): save one file per rank; :meth:`load_state_dict` accepts it only
        on the same rank of a process group of the same world size.

        Returns:
            The state dict.

        Raises:
            TypeError: a structure registered by the user keeps an operator object.
        """
        return {
            "version": _STATE_VERSION,
            "config": {"strength": self.strength, "kind": self.kind, "structure": self.structure,
                       "likelihood": self.likelihood, "mc_samples": self.mc_samples,
                       "decay": self.decay, "distributed": self.distributed},
            "param_names": list(self.param_names),
            "layers": self.layout.describe() if self.layout.layers is not None else None,
            "anchors": [list(a) for a in self._anchors],
            "terms": [t.state(self.structure) for t in self._terms],
            "num_tasks": self.num_tasks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into this EWC; the model must have the saved layout.

        The strength, kind, likelihood, ``mc_samples`` and decay are taken from the state; the
        structure must be this EWC's. Nothing changes when an error is raised.

        Args:
            state: a dict from :meth:`state_dict` (e.g. ``torch.load(f)``).

        Raises:
            ValueError: unknown version, another structure or ``distributed`` mode, a shard
                state loaded on another rank or world size, or parameters / layers / anchors
                that do not fit the model.
        """
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"EWC.load_state_dict: expected a state dict of version "
                             f"{_STATE_VERSION} (from EWC.state_dict()), got {version!r}")
        cfg = state["config"]
        if cfg["structure"] != self.structure:
            raise ValueError(
                f"EWC.load_state_dict: the state holds structure={cfg['structure']!r} Fishers but "
                f"this EWC has structure={self.structure!r}; construct "
                f"EWC(model, structure={cfg['structure']!r}) to load it")
        mode = cfg.get("distributed", "gather")
        if mode != self.distributed:
            raise ValueError(
                f"EWC.load_state_dict: the state was saved with distributed={mode!r} but this EWC "
                f"has distributed={self.distributed!r}; construct EWC(model, "
                f"distributed={mode!r}) to load it")
        _check_config(cfg["kind"], cfg["likelihood"], cfg["structure"], cfg["mc_samples"],
                      cfg["decay"])
        layout = ParameterLayout.from_names(self.model, state["param_names"])
        terms = [Term.from_state(d) for d in state["terms"]]
        _check_shards(terms, "load_state_dict")
        anchors = [list(a) for a in state["anchors"]]
        if state["layers"] is not None:
            layout.rebuild(state["layers"])
            _check_anchors(anchors, layout)
            _check_terms(terms, layout, len(anchors))
        self.strength = cfg["strength"]
        self.kind, self.likelihood = cfg["kind"], cfg["likelihood"]
        self.mc_samples, self.decay = cfg["mc_samples"], cfg["decay"]
        self.layout, self._anchors, self._terms = layout, anchors, terms
        self.num_tasks = int(state["num_tasks"])

    def __repr__(self) -> str:
        online = "one anchor per task" if self.decay is None else f"online, decay={self.decay}"
        return (f"EWC(strength={self.strength}, kind={self.kind!r}, structure={self.structure!r}, "
                f"{online}, distributed={self.distributed!r}, tasks={self.num_tasks}, "
                f"memory={self.memory_bytes()} B)")


def _check_shards(terms: list[Term], where: str) -> None:
    """A sharded Fisher is only meaningful on its own rank of a group of its world size."""
    here = [dd.rank(), dd.world_size()]
    for i, t in enumerate(terms):
        if t.shard is not None and list(t.shard) != here:
            r, w = t.shard
            raise ValueError(
                f"EWC.{where}: stored Fisher {i} holds only rank {r}'s Woodbury columns of a "
                f"{w}-process group (distributed='shard'), but this process is rank {here[0]} of "
                f"{here[1]}; use it on rank {r} of a {w}-process torch.distributed group (each "
                "rank loads the state it saved), or consolidate again here")


def _check_config(kind: Any, likelihood: Any, structure: Any, mc_samples: Any, decay: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"EWC: unknown kind {kind!r}; supported: {list(KINDS)}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"EWC: unknown likelihood {likelihood!r}; supported: {list(LIKELIHOODS)}")
    if structure not in structures():
        raise ValueError(
            f"EWC: unknown structure {structure!r}; registered structures: {list(structures())}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"EWC: mc_samples must be a positive int, got {mc_samples!r}")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float))
                              or not 0.0 <= decay <= 1.0):
        raise ValueError(f"EWC: decay must be None (one anchor per task) or in [0, 1] "
                         f"(online EWC), got {decay!r}")


def _check_anchors(anchors: list[list[Tensor]], layout: ParameterLayout) -> None:
    want = [(b.d_out, b.d_in) for b in layout.blocks_layout]
    for a in anchors:
        got = [tuple(m.shape) for m in a]
        if got != want:
            raise ValueError(f"EWC.load_state_dict: anchor blocks of shapes {got} do not fit the "
                             f"model's layer blocks {want}")


def _check_terms(terms: list[Term], layout: ParameterLayout, num_anchors: int) -> None:
    L = len(layout.blocks_layout)
    P = sum(b.size for b in layout.blocks_layout)
    for i, t in enumerate(terms):
        lists = [v for v in t.tensors.values() if isinstance(v, list)]
        if not 0 <= t.anchor < num_anchors or any(len(v) != L for v in lists) or (
                t.operator is not None and t.operator.shape[0] != P):
            raise ValueError(f"EWC.load_state_dict: stored Fisher {i} ({t.form}) does not fit the "
                             f"model's {L} layers ({P} parameters) and {num_anchors} anchors")
