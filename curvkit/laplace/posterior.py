"""Laplace posteriors ``N(θ_MAP, Λ⁻¹)``, ``Λ = n·F + diag(δ)``: exact, block-diagonal, KFAC, FOOF, diag.

Normalisation (every structure):

* ``θ_MAP`` -- the model's current parameters ``params`` (flattened row-major, concatenated);
* ``F`` -- the **mean** Fisher of the given ``kind`` on the batch ``(inputs, targets)`` of ``N``
  inputs, exactly as :func:`curvkit.fisher` defines it (``kind="exact"``:
  ``F = (1/N) Σ_n J_nᵀ Λ_n J_n``, the GGN; ``"mc"``: one sampled label per input; ``"empirical"``:
  data labels), or its structured approximation (``"kfac"``, ``"foof"``, ``"diag"``, ``"block_diag"``);
* ``n = num_data`` -- the training-set size (default ``N``): the batch is a subsample and
  ``n·F`` estimates the summed Fisher of the training set;
* ``Λ_p = diag(δ)`` -- a zero-mean Gaussian prior precision (scalar, per tensor, or diagonal).

The posterior precision is the curvature operator with a damping: ``Λ = (n·F) + D``, ``D = δ`` (a
number or a per-parameter tensor). Every query is one method of the
:class:`~curvkit.linalg.LinearOperator` contract: ``sample`` (for ``"full"`` the perturbation
trick of Benzing 2022, App. C.1, eq 11, never ``P × P``), ``inverse_diagonal``,
``inverse_quad_blocks`` (GLM functional variances), ``logdet`` (one Cholesky of the ``M × M``
core for ``"full"``) and ``eigenvalues`` (every scalar ``δ`` at once); the evidence and the
predictives are pure functions (:mod:`curvkit.laplace.evidence`, :mod:`curvkit.laplace.predictive`).
For the exact softmax Fisher the ``C`` columns per input are first reduced to ``C − 1``
(``reduce_rank``, a build option of :mod:`curvkit.curvature.fisher`), which leaves ``F`` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvkit.curvature import Curvature, fisher
from curvkit.curvature import distributed as dd
from curvkit.curvature.data import is_single_batch, iter_batches
from curvkit.curvature.fisher import lowrank_operator
from curvkit.curvature.jacobian import (
    LABEL_KEY,
    as_logits,
    check_targets,
    forward,
    log_likelihood_terms,
    num_loss_terms,
)
from curvkit.laplace import saving, tuning
from curvkit.laplace.arguments import check_arguments
from curvkit.laplace.evidence import laplace_evidence, use_eigenvalues
from curvkit.laplace.functional import functional_moments
from curvkit.laplace.predictive import LINK_APPROX, PRED_TYPES, glm_predictive, nn_predictive
from curvkit.laplace.prior import PriorPrecision
from curvkit.linalg import BlockDiagonal, LinearOperator, ScaledFactor, Woodbury
from curvkit.linalg.operator import DampingError
from curvkit.typing import Kind, Likelihood, Structure

LOWRANK_STRUCTURES = ("full", "block_diag")


class LaplacePosterior:
    """Laplace posterior ``N(θ_MAP, Λ⁻¹)``, ``Λ = Λ_p + num_data·F`` (see module doc).

    Args:
        model: the trained network (``θ_MAP`` = its current parameters); supported layers only
            (``nn.Linear``, ``nn.Conv2d``) among the trainable ones.
        inputs: the Fisher data: one batch, ``N ≥ 1`` inputs (a subsample of the training set
            is fine; a tensor, tuple or dict, see :func:`curvkit.fisher`), or an iterable of
            batches such as ``train_loader`` -- then ``F`` is the Fisher of the union of all
            batches (:mod:`curvkit.curvature.data`), ``N`` their total, and the evidence makes a
            second pass over the data (pass a re-iterable: a ``DataLoader`` or a list). With an
            initialised ``torch.distributed`` group each rank passes its shard and every rank
            gets the posterior of the union.
        targets: its labels (needed for the evidence and ``kind="empirical"``); with an
            iterable, each batch carries its labels (``(x, y)`` tuples or dicts with ``"labels"``).
        likelihood: ``"classification"`` (softmax), ``"regression"`` (Gaussian, unit variance)
            or ``"binary"`` (Bernoulli on logits).
        kind: Fisher kind, ``"exact"`` (GGN, all labels), ``"mc"`` (sampled labels, needs
            ``generator`` for reproducibility) or ``"empirical"`` (data labels).
        structure: ``"full"`` (exact Fisher, Woodbury/perturbation), ``"block_diag"``, ``"kfac"``,
            ``"foof"``, ``"diag"`` (when registered, see :func:`curvkit.structures`).
        prior_precision: ``δ`` -- a scalar, one per parameter tensor, or a full diagonal.
        num_data: training-set size ``n`` in loss terms (``n·F`` estimates the summed Fisher);
            default: the Fisher data's ``N`` for ``(N, C)`` outputs, the non-ignored positions
            ``N_ℓ`` for ``(N, …, C)`` (then ``F`` is the mean per position).
        route: ``"auto"``, ``"dual"`` (``M × M``) or ``"primal"`` (``P × P``) for ``"full"`` /
            ``"block_diag"``; ``"auto"`` picks the cheaper one that fits in memory
            (:meth:`curvkit.linalg.Woodbury.choose_route`).
        reduce_rank: ``"auto"`` (exact softmax Fisher: ``C − 1`` columns per input), ``True`` or
            ``False``.
        mc_samples: labels per input for ``kind="mc"``.
        generator: ``torch.Generator`` for ``kind="mc"``.
        params: the parameters to treat as random (default: all with ``requires_grad``).
        curvature: a prebuilt :class:`~curvkit.curvature.Curvature` on this batch to reuse
            (then ``kind``/``structure`` are taken from it).
        output_fn: maps the model output to the logits (default: the tensor or its ``.logits``).
        label_key: dict key of the labels in dict batches.
        ignore_index: classification target value of positions that are no loss term (outputs
            ``(N, …, C)``, e.g. padding tokens); used by the Fisher and the log-likelihood.
        progress: tqdm progress bars over iterables of batches (default on; ``False`` off).
        fisher_options: further options of :func:`curvkit.fisher` for iterables, e.g.
            ``{"column_budget_gb": 8, "subsample": 5000, "subsample_generator": g}``.

    Raises:
        ValueError: empty batch, non-positive or mis-shaped prior precision, bad ``num_data``,
            unknown option.
        UnsupportedLayerError: a trainable parameter lives in an unsupported module.
        MemoryError: the requested posterior needs more memory than is available (GB stated).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor | None = None,
        likelihood: Likelihood = "classification",
        kind: Kind = "exact",
        structure: Structure = "full",
        prior_precision=1.0,
        num_data: int | None = None,
        *,
        route: str = "auto",
        reduce_rank: bool | str = "auto",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        params: Sequence[nn.Parameter] | None = None,
        curvature: Curvature | None = None,
        output_fn=None,
        label_key: str = LABEL_KEY,
        ignore_index: int = -100,
        progress: bool | None = None,
        fisher_options: dict | None = None,
    ) -> None:
        single = is_single_batch(inputs)
        check_arguments(inputs, targets, route, reduce_rank, num_data)
        if curvature is None:
            opts = dict(fisher_options or {})
            if not single and structure in LOWRANK_STRUCTURES and route != "auto":
                opts.setdefault("route", route)
            if not single and structure in LOWRANK_STRUCTURES and reduce_rank is not False:
                opts.setdefault("reduce_rank", reduce_rank)  # kept by sharded (distributed) columns
            curvature = fisher(model, inputs, targets, likelihood=likelihood, kind=kind,
                               structure=structure, mc_samples=mc_samples, generator=generator,
                               params=params, output_fn=output_fn, label_key=label_key,
                               ignore_index=ignore_index, progress=progress, **opts)
        elif not isinstance(curvature, Curvature):
            raise TypeError(f"curvature must be a curvkit Curvature, got {type(curvature).__name__}")
        N = int(curvature.num_data)
        if num_data is None:  # F is a mean over loss terms: n·F their sum
            num_data = int(curvature.info.get("num_loss_terms") or curvature.info.get("num_seen") or N)
        self.output_fn, self.label_key, self.progress = output_fn, label_key, progress
        self.ignore_index = int(ignore_index)
        self.model, self.inputs, self.targets = model, inputs, targets
        self.curvature = curvature
        self.likelihood, self.kind, self.structure = curvature.likelihood, curvature.kind, curvature.structure
        self.num_data, self.batch_size = int(num_data), N
        self.route_option, self.reduce_rank = route, reduce_rank
        self.params = list(curvature.params)
        by_id = {id(p): nm for nm, p in model.named_parameters()}
        self.param_names = [by_id.get(id(p), f"params[{i}]") for i, p in enumerate(self.params)]
        self.numels = [p.numel() for p in self.params]
        self.num_params = sum(self.numels)
        self.layers = list(curvature.layers)
        self.layer_sizes = [layer.size for layer in self.layers]
        self.mean = torch.cat([p.detach().reshape(-1) for p in self.params])
        self._theta_layer = self._to_layer(self.mean.to(torch.float64))
        self._prior = PriorPrecision(prior_precision, self.params, self.param_names)
        self._loglik: Tensor | None = None
        #: the layer-space operator ``n·F``; ``Λ`` is it with the damping :meth:`damping`.
        self.precision: LinearOperator = self.num_data * self._fisher_operator()
        self._fit()

    # ------------------------------------------------------------------ layout helpers
    def _to_layer(self, x: Tensor) -> Tensor:
        return self.curvature.to_layer_space(x.reshape(-1, 1))[:, 0]

    def _from_layer(self, X: Tensor) -> Tensor:
        return self.curvature.from_layer_space(X)

    def _layer_values(self, layer_vec: Tensor) -> list[Tensor]:
        return list(layer_vec.split(self.layer_sizes))

    # ------------------------------------------------------------------ the operator
    def _fisher_operator(self) -> LinearOperator:
        """The layer-space ``F``: the curvature's operator (re-routed for low-rank structures).

        For ``"full"``/``"block_diag"`` its Woodbury form with the softmax rank reduction and the
        cost-chosen route.
        """
        cap, op = self.curvature.captured, self.curvature.operator
        route = "cost" if self.route_option == "auto" else self.route_option
        if cap is None:  # e.g. columns gathered from a loader: re-route its Woodbury blocks
            def reroute(o):
                return Woodbury(o.factor, route=route, name=o.name) if isinstance(o, Woodbury) else o
            if isinstance(op, BlockDiagonal) and any(isinstance(b, Woodbury) for b in op.blocks):
                return BlockDiagonal([reroute(b) for b in op.blocks], name=op.name)
            return reroute(op)
        if self.structure not in LOWRANK_STRUCTURES:
            return op
        # "auto" / True / False: the build option decides where the reduction applies (and
        # refuses True where it does not)
        return lowrank_operator(cap, self.layers, self.structure, route, reduce_rank=self.reduce_rank)

    def _woodbury_blocks(self) -> list[Woodbury]:
        op = getattr(self.precision, "a", self.precision)  # F inside the scaled operator n·F
        blocks = op.blocks if isinstance(op, BlockDiagonal) else [op]
        return [b for b in blocks if isinstance(b, Woodbury)]

    def _fisher_factors(self) -> list:
        """Per-layer factors of ``J = √n·G`` (exact softmax: ``C − 1`` columns per input)."""
        s = math.sqrt(self.num_data)
        return [ScaledFactor(f, s) for w in self._woodbury_blocks() for f in w.factor.row_blocks()]

    @property
    def rank(self) -> int | None:
        """``M``, the number of Fisher columns (after rank reduction) for low-rank structures."""
        blocks = self._woodbury_blocks()
        return blocks[0].rank if blocks else None

    @property
    def route(self) -> str | None:
        """The Woodbury route in use (``"dual"``/``"primal"``) for low-rank structures."""
        blocks = self._woodbury_blocks()
        return blocks[0].route if blocks else None

    def damping(self, prior: PriorPrecision | None = None):
        """``D`` of ``Λ = n·F + D`` in layer space: a float (scalar prior) or a ``(P,)`` tensor."""
        prior = prior or self._prior
        return prior.scalar if prior.kind == "scalar" else self._to_layer(prior.diag)

    def _logdet_at(self, prior: PriorPrecision) -> Tensor:
        try:
            return self.precision.logdet(self.damping(prior))
        except DampingError as err:
            for layer, d in zip(self.layers, self._layer_values(self._to_layer(prior.diag))):
                if not bool((d == d[0]).all()):
                    raise ValueError(
                        f"the Kronecker-factored block of layer '{layer.name}' needs one prior "
                        "precision for the whole layer (weight and bias share it), got values in "
                        f"[{float(d.min()):.4g}, {float(d.max()):.4g}]; pass a scalar or per-layer "
                        "prior, or use structure='full' or 'diag' for per-parameter priors") from err
            raise

    def _fit(self) -> None:
        """Factorise ``Λ`` at the current prior (one Cholesky of the core for ``"full"``)."""
        self._logdet = self._logdet_at(self._prior)

    @property
    def prior_precision(self):
        """The prior precision: a float, a list (per tensor) or a ``(P,)`` tensor."""
        return self._prior.value

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        prior = PriorPrecision(value, self.params, self.param_names)
        old, self._prior = self._prior, prior
        try:
            self._fit()
        except Exception:
            self._prior = old
            raise

    @property
    def prior(self) -> PriorPrecision:
        """The validated prior precision."""
        return self._prior

    def __repr__(self) -> str:
        extra = f", M={self.rank}, route={self.route!r}" if self.rank is not None else ""
        return (f"LaplacePosterior(structure={self.structure!r}, kind={self.kind!r}, "
                f"likelihood={self.likelihood!r}, P={self.num_params}, N={self.batch_size}, "
                f"num_data={self.num_data}{extra}, prior: {self._prior.describe()})")

    # ------------------------------------------------------------------ sampling and variances
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws ``θ ∼ N(θ_MAP, Λ⁻¹)``, shape ``(n, P)`` (``params`` order, model dtype).

        ``"full"``: perturbation trick (App. C.1, eq 11), never forming ``P × P``. Kronecker
        blocks: ``U_B [Z ⊘ √(n s_B s_Aᵀ + δ)] U_Aᵀ``; diagonal: ``z / √(δ + n d)``.

        Args:
            n: number of samples (≥ 1).
            generator: the only source of randomness (``torch.Generator`` on the model's device).

        Returns:
            ``(n, P)`` samples.

        Raises:
            ValueError: ``n`` is not a positive int.
            MemoryError: the samples would not fit (GB stated).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        dev = self.precision.sample(int(n), self.damping(), generator)  # (P, n) layer space
        out = self._from_layer(dev).T
        out += self.mean[None, :].to(out.dtype)
        return out

    def marginal_variance(self) -> Tensor:
        """``diag(Λ⁻¹)`` as a ``(P,)`` tensor in ``params`` order (model dtype)."""
        d = self.precision.inverse_diagonal(self.damping())
        return self._from_layer(d[:, None])[:, 0].to(self.mean.dtype)

    def _functional(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x; θ_MAP), J Λ⁻¹ Jᵀ)`` with shapes ``(N, …, C)`` and ``(N, …, C, C)``.

        Chunked over the test inputs (:func:`curvkit.laplace.functional.functional_moments`).
        """
        if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] == 0):
            raise ValueError("x must be a non-empty batch of inputs")
        f_mean, f_var = functional_moments(self.model, x, self.layers, self.precision,
                                           self.damping(), self.rank, self.output_fn)
        return f_mean, f_var.to(self.mean.dtype)

    def functional_variance(self, x: Tensor) -> Tensor:
        """``Σ_f = J Λ⁻¹ Jᵀ`` per input (and position), ``(N, …, C, C)`` (GLM functional covariance)."""
        return self._functional(x)[1]

    def _sampled_outputs(self, x: Tensor, n_samples: int, generator) -> Tensor:
        """``f(x; θ_s)`` for exact posterior samples ``θ_s``, ``(S, N, …, C)``."""
        step = max(1, 2**27 // max(1, 8 * self.num_params))
        outs = []
        with torch.no_grad():
            for j in range(0, n_samples, step):
                for th in self.sample(min(step, n_samples - j), generator):
                    params = {nm: t.view_as(p) for nm, t, p in
                              zip(self.param_names, th.split(self.numels), self.params)}
                    if isinstance(x, Mapping):
                        out = functional_call(self.model, params, (), dict(x))
                    else:
                        out = functional_call(self.model, params, tuple(x) if isinstance(
                            x, (tuple, list)) else (x,))
                    outs.append(as_logits(out, self.output_fn))
        return torch.stack(outs)

    def predictive(self, x: Tensor, pred_type: str = "glm", link_approx: str | None = None,
                   n_samples: int = 100, generator: torch.Generator | None = None):
        """Posterior predictive at ``x`` (see :mod:`curvkit.laplace.predictive`).

        Args:
            x: ``(N, …)`` inputs.
            pred_type: ``"glm"`` (linearised network; Gaussian outputs) or ``"nn"`` (sampled weights).
            link_approx: ``"probit"`` (GLM default) or ``"mc"`` (``"nn"`` is always Monte Carlo).
            n_samples: Monte Carlo samples for ``"mc"`` / ``"nn"``.
            generator: randomness for ``"mc"`` / ``"nn"``.

        Outputs ``(N, …, C)`` (class dim last, e.g. ``(N, T, V)``) get it per position; GLM:
        ``T·C`` output seeds per input (refused above 4096, pointing to ``pred_type="nn"``).

        Returns:
            Classification / binary: probabilities ``(N, …, C)``. Regression: ``(mean (N, …, C),
            covariance (N, …, C, C))`` of ``f`` (add the unit noise variance for ``y``).
        """
        if pred_type not in PRED_TYPES:
            raise ValueError(f"unknown pred_type {pred_type!r}; valid: {list(PRED_TYPES)}")
        if link_approx is None:
            link_approx = "probit" if pred_type == "glm" else "mc"
        if link_approx not in LINK_APPROX:
            raise ValueError(f"unknown link_approx {link_approx!r}; valid: {list(LINK_APPROX)}")
        if pred_type == "nn" and link_approx != "mc":
            raise ValueError("pred_type='nn' samples weights, so link_approx must be 'mc'")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if not is_single_batch(x):
            outs = [self.predictive(b.inputs, pred_type, link_approx, n_samples, generator)
                    for b in iter_batches(x, None, self.label_key, self.progress,
                                          desc="curvkit.laplace[predictive]")]
            if not outs:
                raise ValueError("the iterable of test batches yielded no batch")
            if isinstance(outs[0], tuple):
                return tuple(torch.cat(parts) for parts in zip(*outs))
            return torch.cat(outs)
        if pred_type == "glm":
            f_mean, f_var = self._functional(x)
            return glm_predictive(f_mean, f_var, self.likelihood, link_approx, n_samples, generator)
        return nn_predictive(self._sampled_outputs(x, n_samples, generator), self.likelihood)

    __call__ = predictive

    # ------------------------------------------------------------------ evidence
    def log_likelihood(self) -> Tensor:
        """``(n/N_ℓ) Σ log p(y | x, θ_MAP)`` with all constants (float64 scalar).

        The sum runs over the ``N_ℓ`` loss terms of the data, as ``F``'s mean: its inputs, or the
        non-ignored positions of ``(N, …, C)`` outputs.
        """
        if self._loglik is None:
            total = torch.zeros(3, dtype=torch.float64, device=self.mean.device)
            for b in iter_batches(self.inputs, self.targets, self.label_key, self.progress,
                                  desc="curvkit.laplace[log-likelihood]"):
                if b.targets is None:
                    raise ValueError("the evidence needs the batch labels: pass targets=... to "
                                     "LaplacePosterior (or (x, y) batches in the loader)")
                with torch.no_grad():
                    out = forward(self.model, b.inputs, self.output_fn)
                check_targets(out, b.targets, self.likelihood, self.ignore_index)
                total[0] += log_likelihood_terms(out, b.targets, self.likelihood,
                                                 self.ignore_index).sum()
                total[1] += b.size
                total[2] += num_loss_terms(out, b.targets, self.likelihood, self.ignore_index)
            dd.all_reduce_sum([total])
            if int(total[1]) != self.batch_size and self.curvature.info.get("subsample") is None:
                raise ValueError(
                    f"the evidence pass over the data saw {int(total[1])} inputs but the Fisher "
                    f"{self.batch_size}; pass a re-iterable (a DataLoader or a list of batches), not "
                    "a one-shot generator, that yields the same data each time")
            if int(total[2]) == 0:
                raise ValueError(f"every target equals ignore_index={self.ignore_index}: the "
                                 "evidence has no loss terms")
            self._loglik = total[0] * (self.num_data / total[2])
        return self._loglik

    def log_det_posterior_precision(self, prior_precision=None) -> Tensor:
        """``log det Λ`` for the current or a given prior precision (float64).

        A new scalar prior costs one Cholesky of the core, or nothing when the eigenvalues are
        already cached (:func:`~curvkit.laplace.evidence.use_eigenvalues`); other priors
        factorise ``n·F + diag(δ)`` once.

        Args:
            prior_precision: any accepted prior format (default: the current one).

        Returns:
            The float64 scalar.
        """
        if prior_precision is None:
            return self._logdet
        prior = PriorPrecision(prior_precision, self.params, self.param_names)
        if prior.kind == "scalar":
            cached = getattr(self.precision, "_eigenvalue_cache", None) is not None
            if use_eigenvalues(1, cached):
                t = torch.tensor(math.log(prior.scalar), dtype=torch.float64)
                return self.precision.logdet_function()(t)
        return self._logdet_at(prior)

    def log_marginal_likelihood(self, prior_precision=None) -> Tensor:
        """Laplace evidence ``log p(D)`` (:mod:`curvkit.laplace.evidence`); float64 scalar.

        Args:
            prior_precision: evaluate at this prior (any accepted format) instead of the current
                one; the posterior itself is unchanged.

        Returns:
            ``(n/N_ℓ) Σ log p(y|x,θ_MAP) − ½ θᵀΛ_pθ + ½ log det Λ_p − ½ log det Λ``.
        """
        prior = self._prior if prior_precision is None else PriorPrecision(
            prior_precision, self.params, self.param_names)
        return laplace_evidence(self.log_likelihood(), prior, self.mean,
                                self.log_det_posterior_precision(prior_precision))

    def optimize_prior_precision(self, method: str = "marglik", per_layer: bool = False,
                                 bounds: tuple[float, float] = (1e-8, 1e8), max_iter: int = 200,
                                 val_inputs: Tensor | None = None, val_targets: Tensor | None = None,
                                 grid: Sequence[float] | None = None, link_approx: str = "probit"):
        """Choose the prior precision, set it, and return it (see :mod:`curvkit.laplace.tuning`).

        Args:
            method: ``"marglik"`` (maximise the evidence; scalar from one eigendecomposition,
                per layer by L-BFGS-B with exact gradients) or ``"gridsearch"`` (validation NLL of
                the GLM predictive over ``grid``, default ``10^{-2}, 10^{-1.5}, …, 10^{4}``).
            per_layer: scalar or per-layer precision (``"marglik"`` only).
            bounds: search interval for each ``δ`` (``"marglik"``).
            max_iter: iteration limit of the optimiser (``"marglik"``).
            val_inputs: held-out inputs, or an iterable of held-out batches (``"gridsearch"``).
            val_targets: held-out targets for a single batch of ``val_inputs`` (``"gridsearch"``).
            grid: candidate values (``"gridsearch"``).
            link_approx: link of the GLM predictive (``"gridsearch"``).

        Returns:
            The new prior precision (float, or a list with one value per parameter tensor).

        Raises:
            ValueError: unknown method, bad bounds/grid, missing validation data.
        """
        if method == "gridsearch":
            return tuning.gridsearch(self, per_layer, val_inputs, val_targets, grid, link_approx)
        if method != "marglik":
            raise ValueError(f"unknown method {method!r}; supported: ['marglik', 'gridsearch'] "
                             "(maximise the Laplace evidence, or minimise the validation NLL)")
        return tuning.marglik(self, per_layer, bounds, max_iter)

    # ------------------------------------------------------------------ saving
    def state_dict(self) -> dict:
        """Everything the posterior's numbers depend on (see :func:`curvkit.laplace.saving.state`).

        Returns:
            Tensors/str/numbers that round-trip through ``torch.load(weights_only=True)``.
        """
        return saving.state(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into a posterior of the same model and structure.

        Args:
            state: the state.

        Raises:
            ValueError: the state is of another version, structure or parameter count.
        """
        saving.load(self, state)
