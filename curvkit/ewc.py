"""Elastic weight consolidation (EWC) with a subsampled full, KFAC, diagonal or any Fisher structure.

Benzing (2022), App. C.2 (math_spec §8): EWC only needs quadratic forms ``Δᵀ F Δ``, and for a
subsampled Fisher ``F = G Gᵀ`` these are cheap without ever forming ``G`` (``P × M``) or ``F``
(``P × P``): keep the per-layer inputs ``ã`` and errors ``ẽ`` of the Fisher batch and use the
``Gᵀv`` trick of the Woodbury solve.

Symbols (bound to argument names):

* ``κ`` -- ``strength``; ``γ`` -- ``decay``;
* ``θ`` -- the selected parameters (``params``), ``θ*_t`` -- their values when task ``t`` was
  consolidated, ``Δ_t = θ − θ*_t``;
* ``F_t`` -- the **mean** Fisher of task ``t``'s consolidation batch of ``N_t`` inputs,
  ``F_t = (1/N_t) Σₙ E_y[g gᵀ]`` with ``g = ∇_θ(−log p(y|xₙ, θ))`` (``kind`` chooses the
  expectation: ``"exact"`` over ``y ∼ p(·|xₙ)``, ``"mc"`` sampled, ``"empirical"`` data labels;
  see :data:`curvkit.curvature.FISHER_FORMULAS`), in the structure ``structure``;
* full structure: ``F_t = G_t G_tᵀ``, ``G_t`` with ``M_t = N_t·R`` columns (``R = C`` for
  ``"exact"``, ``mc_samples`` for ``"mc"``, 1 for ``"empirical"``); column ``m = (n, r)``
  restricted to layer ``l`` is ``vec_r(Σ_τ ẽ_{l,mτ} ã_{l,nτ}ᵀ)`` (``τ``: location, ``T_l = 1``
  for ``Linear``), the ``1/√N_t`` (and ``√p``, ``1/√S``) folded into ``ẽ``.

Penalty (``decay=None``, one anchor per task)::

    R(θ) = (κ/2) Σ_t Δ_tᵀ F_t Δ_t                  ∇R = κ Σ_t F_t Δ_t

Online / decayed accumulation (``decay=γ``; Schwarz et al. 2018, "online EWC")::

    F̃ ← γ F̃ + F_new,   θ* ← θ at the latest consolidation,   R(θ) = (κ/2) (θ − θ*)ᵀ F̃ (θ − θ*)

i.e. the older Fishers are kept (scaled by ``γ`` per later task) but measured from the latest
anchor only. ``γ = 1`` accumulates without forgetting, ``γ = 0`` keeps only the newest Fisher.

Full structure, per task (the ``Gᵀv`` trick, math_spec §3.2 step 1)::

    u_m = Σ_l Σ_τ ẽ_{l,mτ}ᵀ (W̃_l − W̃*_l) ã_{l,nτ}     (u = G*ᵀ Δ ∈ R^M)
    Δᵀ F Δ = ‖u‖²

Autograd through ``u`` (``ã``, ``ẽ`` are constants) gives ``∇(κ/2)‖u‖² = κ G* u = κ F Δ``
exactly. Cost ``O(M·P)`` per evaluation; nothing of size ``P × M`` or ``P × P`` is formed.

Scaling and the Laplace argument: the Laplace posterior after task A is
``N(θ*_A, (N_A F_A + prior)⁻¹)`` for the *summed* log-likelihood of ``N_A`` points, so adding
``(N_A/2) Δᵀ F_A Δ`` to a summed task-B loss is Bayes-consistent. With the usual *mean* task loss
``(1/N_B) Σ ℓ`` that corresponds to ``strength = N_A / N_B``; in practice ``κ`` is tuned.

Stored memory (``memory_bytes``), with ``b`` bytes per float and ``P`` selected parameters::

    full:      b · Σ_t N_t Σ_l T_l (d_in,l + R · d_out,l)   (+ b·P per stored anchor)
    diag:      b · P per stored diagonal                     (+ b·P per stored anchor)
    otherwise: the bytes of every tensor the structure's operator holds (e.g. KFAC:
               Σ_l (d_in,l² + d_out,l²) per task)

``d_in,l`` counts the bias ones column. Only the errors are stored ``R`` times; the inputs once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvkit.curvature import fisher, structures
from curvkit.curvature.streaming import KINDS, LIKELIHOODS
from curvkit.linalg import LinearOperator, LowRankFactor, OuterProductFactor
from curvkit.typing import Kind, Likelihood, Structure

__all__ = ["EWC"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class _LayerSpec:
    """One supported layer of the parameter layout, in layer-space order (see ``Curvature``)."""

    name: str
    weight: bool
    bias: bool
    d_out: int
    d_in: int
    weight_shape: tuple[int, ...]

    def describe(self) -> str:
        return f"'{self.name or '<model>'}'"


@dataclass
class _Term:
    """One stored quadratic form ``coef · Δᵀ F Δ`` measured from anchor number ``anchor``.

    Exactly one of ``factors`` (full: per-layer ``(a, e)``), ``diagonal`` (layer-space ``diag F``)
    or ``operator`` (layer-space :class:`LinearOperator`) is set.
    """

    coef: float
    anchor: int
    factors: list[OuterProductFactor] | None = None
    diagonal: Tensor | None = None
    operator: LinearOperator | None = None


def _tensor_bytes(obj, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from a linalg object (attributes, lists)."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        st = obj.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return int(st.nbytes())
    if depth > 8 or id(obj) in seen:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen, depth + 1) for x in obj.values())
    if isinstance(obj, (LinearOperator, LowRankFactor)):
        seen.add(id(obj))
        return sum(_tensor_bytes(x, seen, depth + 1) for x in vars(obj).values())
    return 0


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class EWC:
    """EWC penalty ``(κ/2) Σ_t (θ − θ*_t)ᵀ F_t (θ − θ*_t)`` with a curvkit Fisher per task.

    See the module docstring for the math, the Fisher normalisation (mean Fisher, ``1/N``), the
    online variant and the memory formula.

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

    Raises:
        ValueError: bad ``strength``, ``kind``, ``structure``, ``likelihood``, ``decay`` or
            ``params``.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EWC needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.strength = strength
        if kind not in KINDS:
            raise ValueError(f"EWC: unknown kind {kind!r}; supported: {list(KINDS)}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"EWC: unknown likelihood {likelihood!r}; supported: {list(LIKELIHOODS)}")
        if structure not in structures():
            raise ValueError(
                f"EWC: unknown structure {structure!r}; registered structures: {list(structures())}"
            )
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"EWC: mc_samples must be a positive int, got {mc_samples!r}")
        if decay is not None and not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
            raise ValueError(f"EWC: decay must be None (one anchor per task) or in [0, 1] "
                             f"(online EWC), got {decay!r}")
        self.kind, self.structure, self.likelihood = kind, structure, likelihood
        self.mc_samples, self.generator = mc_samples, generator
        self.decay = None if decay is None else float(decay)
        self.param_names = self._resolve_names(params)
        self.num_tasks = 0
        self._layers: list[_LayerSpec] | None = None
        self._anchors: list[list[Tensor]] = []
        self._terms: list[_Term] = []

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

    def _resolve_names(self, params: Sequence[nn.Parameter] | None) -> list[str]:
        named = list(self.model.named_parameters())
        if params is None:
            names = [n for n, p in named if p.requires_grad]
        else:
            by_id = {id(p): n for n, p in named}
            names = []
            for i, p in enumerate(params):
                if id(p) not in by_id:
                    raise ValueError(f"EWC: params[{i}] (shape {tuple(p.shape)}) is not a parameter "
                                     f"of the model; pass tensors from model.parameters()")
                names.append(by_id[id(p)])
            if len(set(names)) != len(names):
                raise ValueError("EWC: params lists the same parameter twice")
        if not names:
            raise ValueError("EWC: no parameters to protect (none require grad)")
        return names

    def _current_params(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        missing = [n for n in self.param_names if n not in named]
        if missing:
            raise ValueError(
                f"EWC: the model changed shape since consolidation: parameters {missing} no "
                "longer exist. EWC anchors are tied to the parameter layout; create a new EWC (or restore "
                "the model's structure)."
            )
        return [named[n] for n in self.param_names]

    # ------------------------------------------------------------------ layer space
    def _layer_matrices(self) -> list[Tensor]:
        """Current ``W̃_l = [W_l | b_l]`` (``d_out × d_in``), attached to the graph."""
        if self._layers is None:
            raise RuntimeError("EWC has no layer layout yet; call consolidate() first")
        self._current_params()  # names still exist
        mats = []
        for spec in self._layers:
            try:
                module = self.model.get_submodule(spec.name)
            except AttributeError:
                module = None
            weight = getattr(module, "weight", None) if module is not None else None
            bias = getattr(module, "bias", None) if module is not None else None
            if (
                module is None
                or (spec.weight and (weight is None or tuple(weight.shape) != spec.weight_shape))
                or (spec.bias and (bias is None or tuple(bias.shape) != (spec.d_out,)))
            ):
                now = "missing" if weight is None else f"weight {tuple(weight.shape)}"
                raise ValueError(
                    f"EWC: the model changed shape since consolidation: layer {spec.describe()} had "
                    f"weight {spec.weight_shape}{' and a bias' if spec.bias else ''}, now {now}. "
                    "Stored anchors and Fishers only fit the old layout; create a new EWC (or "
                    "restore the old layer)."
                )
            cols = [weight.reshape(spec.d_out, -1)] if spec.weight else []
            if spec.bias:
                cols.append(bias.reshape(spec.d_out, 1))
            mats.append(torch.cat(cols, dim=1) if len(cols) > 1 else cols[0])
        return mats

    # ------------------------------------------------------------------ consolidate
    @torch.no_grad()
    def _snapshot(self) -> list[Tensor]:
        return [m.detach().clone() for m in self._layer_matrices()]

    def consolidate(
        self,
        inputs,
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
                ``torch.distributed`` the union of every rank's shard).
            targets: data labels (needed for ``kind="empirical"``); with an iterable, in its
                batches.
            likelihood: overrides the likelihood given at construction.
            progress: tqdm progress bar over an iterable of batches (default on).

        Raises:
            FloatingPointError: non-finite parameters, inputs or Fisher factors.
            ValueError: the model's layout changed since the previous consolidation.
        """
        likelihood = self.likelihood if likelihood is None else likelihood
        params = self._current_params()
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
                   params=params, progress=progress, distributed_columns="gather")
        specs = [
            _LayerSpec(l.name, l.weight, l.bias, l.d_out, l.d_in, tuple(l.module.weight.shape))
            for l in F.layers
        ]
        if self._layers is None:
            self._layers = specs
        elif specs != self._layers:
            raise ValueError(
                "EWC.consolidate: the model's layer layout changed since the previous "
                f"consolidation ({[s.name for s in self._layers]} with shapes "
                f"{[s.weight_shape for s in self._layers]} -> {[s.name for s in specs]} with "
                f"{[s.weight_shape for s in specs]}); create a new EWC for the new layout"
            )
        term = self._make_term(F)
        anchor = self._snapshot()
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
            if term.diagonal is not None and old and old[-1].diagonal is not None:
                # diagonal Fishers merge exactly: F̃ = γ F̃_prev + F_new
                prev = old.pop()
                term.diagonal = prev.coef * prev.diagonal + term.diagonal
            self._terms = [*old, term]
        self.num_tasks += 1

    def _make_term(self, F) -> _Term:
        if self.structure == "full" and F.captured is not None:
            cap = F.captured
            factors = []
            for layer, a, e in zip(F.layers, cap.a, cap.e):
                a = a.detach().clone(memory_format=torch.contiguous_format)
                e = e.detach().clone(memory_format=torch.contiguous_format)
                if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
                    raise FloatingPointError(
                        f"EWC.consolidate: non-finite Fisher factors at layer {layer.describe()}")
                factors.append(OuterProductFactor(a, e))
            return _Term(1.0, 0, factors=factors)
        if self.structure == "diag":
            d = F.operator.diagonal().detach().clone()
            if not torch.isfinite(d).all():
                raise FloatingPointError("EWC.consolidate: the diagonal Fisher has non-finite entries")
            return _Term(1.0, 0, diagonal=d)
        return _Term(1.0, 0, operator=F.operator)

    # ------------------------------------------------------------------ penalty
    def penalty(self) -> Tensor:
        """``(κ/2) Σ_t (θ − θ*_t)ᵀ F_t (θ − θ*_t)`` at the current parameters (differentiable).

        For ``decay=γ`` the sum is over the stored Fishers with weights ``γ^{age}`` and the one
        latest anchor. Its autograd gradient is ``κ Σ_t F_t (θ − θ*_t)``.

        Returns:
            A scalar tensor in the parameters' dtype, attached to the autograd graph.

        Raises:
            RuntimeError: no task has been consolidated yet.
            ValueError: the model changed shape since consolidation.
            FloatingPointError: the penalty is not finite (names the non-finite parameter).
        """
        if not self._terms:
            raise RuntimeError(
                "EWC.penalty() called before any consolidate(): there is no anchor θ* or Fisher "
                "yet. Call ewc.consolidate(inputs, targets) after training on a task (and skip the "
                "penalty while ewc.num_tasks == 0)."
            )
        mats = self._layer_matrices()
        dtype = mats[0].dtype
        stored = self._anchors[0][0].dtype
        if dtype != stored:
            raise TypeError(f"EWC: the model's parameters are {dtype} but were {stored} at "
                            "consolidation; cast the model back or re-consolidate")
        deltas = [[m - m0 for m, m0 in zip(mats, anchor)] for anchor in self._anchors]
        total = mats[0].new_zeros(())
        for term in self._terms:
            total = total + term.coef * self._quadratic(term, deltas[term.anchor])
        out = 0.5 * self.strength * total
        if not torch.isfinite(out):
            for n, p in zip(self.param_names, self._current_params()):
                if not torch.isfinite(p).all():
                    raise FloatingPointError(
                        f"EWC.penalty: parameter '{n}' has non-finite values (nan/inf)")
            raise FloatingPointError(
                f"EWC.penalty overflowed ({float(out.detach())}); the parameters moved very far from the "
                "anchor or the strength is too large")
        return out

    @staticmethod
    def _quadratic(term: _Term, delta: list[Tensor]) -> Tensor:
        """``Δᵀ F Δ`` for one stored Fisher (``delta``: per-layer ``W̃ − W̃*``)."""
        if term.factors is not None:
            u = None
            for f, d in zip(term.factors, delta):
                ul = f.rmatmat(d.reshape(-1, 1))  # (M, 1): the Gᵀv trick, per layer
                u = ul if u is None else u + ul
            return (u * u).sum()
        x = torch.cat([d.reshape(-1) for d in delta])
        if term.diagonal is not None:
            return (term.diagonal * x * x).sum()
        return torch.dot(x, term.operator @ x)

    # ------------------------------------------------------------------ memory
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes held: ``{"curvature": ..., "anchors": ..., "total": ...}`` (see module doc)."""
        curv = 0
        for t in self._terms:
            if t.factors is not None:
                curv += sum(_nbytes(f.a) + _nbytes(f.e) for f in t.factors)
            elif t.diagonal is not None:
                curv += _nbytes(t.diagonal)
            else:
                curv += _tensor_bytes(t.operator)
        anchors = sum(_nbytes(m) for a in self._anchors for m in a)
        return {"curvature": curv, "anchors": anchors, "total": curv + anchors}

    def memory_bytes(self) -> int:
        """Total bytes of stored curvature and anchors.

        Full structure: ``b · Σ_t N_t Σ_l T_l (d_in,l + R · d_out,l) + b · P · (#anchors)``.
        """
        return self.memory_breakdown()["total"]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Configuration, anchors and stored Fishers (tensors by reference, like ``torch.optim``).

        Full and diagonal structures hold only tensors; other structures store their layer-space
        :class:`~curvkit.linalg.LinearOperator` object (``torch.load(..., weights_only=False)``).
        """
        terms = []
        for t in self._terms:
            d = {"coef": t.coef, "anchor": t.anchor}
            if t.factors is not None:
                d["a"] = [f.a for f in t.factors]
                d["e"] = [f.e for f in t.factors]
            elif t.diagonal is not None:
                d["diagonal"] = t.diagonal
            else:
                d["operator"] = t.operator
            terms.append(d)
        return {
            "version": _STATE_VERSION,
            "config": {"strength": self.strength, "kind": self.kind, "structure": self.structure,
                       "likelihood": self.likelihood, "mc_samples": self.mc_samples,
                       "decay": self.decay},
            "param_names": list(self.param_names),
            "layers": [vars(s).copy() for s in self._layers or []],
            "anchors": [list(a) for a in self._anchors],
            "terms": terms,
            "num_tasks": self.num_tasks,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the model must have the stored layout.

        Raises:
            ValueError: unknown version, or parameters / layers that do not fit the model.
        """
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        if version != _STATE_VERSION:
            raise ValueError(f"EWC.load_state_dict: expected a state dict of version "
                             f"{_STATE_VERSION} (from EWC.state_dict()), got {version!r}")
        cfg = state["config"]
        names = list(state["param_names"])
        named = dict(self.model.named_parameters())
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"EWC.load_state_dict: the model has no parameters {missing}; the state "
                             "belongs to a different model")
        layers = [_LayerSpec(s["name"], s["weight"], s["bias"], s["d_out"], s["d_in"],
                             tuple(s["weight_shape"])) for s in state["layers"]]
        terms = []
        for d in state["terms"]:
            if "a" in d:
                t = _Term(float(d["coef"]), int(d["anchor"]),
                          factors=[OuterProductFactor(a, e) for a, e in zip(d["a"], d["e"])])
            elif "diagonal" in d:
                t = _Term(float(d["coef"]), int(d["anchor"]), diagonal=d["diagonal"])
            else:
                t = _Term(float(d["coef"]), int(d["anchor"]), operator=d["operator"])
            terms.append(t)
        old = (self.param_names, self._layers)
        self.param_names, self._layers = names, layers or None
        try:
            if layers:
                mats = self._layer_matrices()
                for a in state["anchors"]:
                    for m, m0 in zip(mats, a):
                        if m.shape != m0.shape:
                            raise ValueError(f"EWC.load_state_dict: anchor shape {tuple(m0.shape)} "
                                             f"does not fit the model's {tuple(m.shape)}")
        except ValueError:
            self.param_names, self._layers = old
            raise
        self.strength = cfg["strength"]
        self.kind, self.structure = cfg["kind"], cfg["structure"]
        self.likelihood, self.mc_samples, self.decay = cfg["likelihood"], cfg["mc_samples"], cfg["decay"]
        self._anchors = [list(a) for a in state["anchors"]]
        self._terms = terms
        self.num_tasks = int(state["num_tasks"])

    def __repr__(self) -> str:
        online = "one anchor per task" if self.decay is None else f"online, decay={self.decay}"
        return (f"EWC(strength={self.strength}, kind={self.kind!r}, structure={self.structure!r}, "
                f"{online}, tasks={self.num_tasks}, memory={self.memory_bytes()} B)")
