"""Laplace posteriors ``N(θ_MAP, Λ⁻¹)`` with ``Λ = Λ_p + n·F``: exact, block-diagonal, KFAC, FOOF, diag.

Normalisation (every structure):

* ``θ_MAP`` -- the model's current parameters ``params`` (flattened row-major, concatenated);
* ``F`` -- the **mean** Fisher of the given ``kind`` on the batch ``(inputs, targets)`` of ``N``
  inputs, exactly as :func:`curvkit.fisher` defines it (``kind="exact"``:
  ``F = (1/N) Σ_n J_nᵀ Λ_n J_n``, the GGN; ``"mc"``: one sampled label per input; ``"empirical"``:
  data labels), or its structured approximation (``"kfac"``, ``"foof"``, ``"diag"``, ``"block_diag"``);
* ``n = num_data`` -- the training-set size (default ``N``): the batch is a subsample and
  ``n·F`` estimates the summed Fisher of the training set;
* ``Λ_p = diag(δ)`` -- a zero-mean Gaussian prior precision (scalar, per tensor, or diagonal).

Evidence (Laplace approximation of ``log p(D)``)::

    log p(D) ≈ (n/N) Σ_n log p(y_n | x_n, θ_MAP)               (batch log-likelihood scaled to n)
             + log N(θ_MAP; 0, Λ_p⁻¹)                           (−½θᵀΛ_pθ + ½ log det Λ_p − (P/2) log 2π)
             + (P/2) log 2π − ½ log det Λ                        (Gaussian integral)
           = (n/N) Σ log p − ½ θᵀΛ_pθ + ½ log det Λ_p − ½ log det Λ

(the ``(P/2) log 2π`` terms cancel). The same convention as laplace-torch's
``log_marginal_likelihood`` with its summed GGN over ``n`` points and ``temperature = 1``.

For ``structure="full"`` the posterior is never formed as a ``P × P`` matrix: with
``J = √n·G ∈ R^{P×M}`` (``G Gᵀ = F``), ``V = Λ_p^{-1/2} J`` and ``U_M = I + VᵀV``,
sampling uses the perturbation trick of Benzing (2022), App. C.1 (eq 11; memory ``O(P + M²)``,
time ``O(M³ + n_samples·M·P)``), and ``log det Λ = log det Λ_p + log det U_M`` (determinant
lemma); all scalar prior precisions are evaluated from one eigendecomposition of ``JᵀJ``. For the
exact softmax Fisher the ``C`` columns per input are first reduced to ``C − 1``
(:func:`~curvkit.linalg.perturb.reduce_softmax_errors`), which leaves ``F`` unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from curvkit.capture import LABEL_KEY, batch_size, forward, slice_inputs
from curvkit.capture.targets import check_targets
from curvkit.curvature import Curvature, fisher
from curvkit.curvature import distributed as dd
from curvkit.curvature.data import is_single_batch, iter_batches
from curvkit.laplace.blocks import LowRankBlock
from curvkit.laplace.engines import (
    Engine,
    build_lowrank_engine,
    build_operator_engine,
    chunk_inputs,
)
from curvkit.laplace.predictive import (
    LINK_APPROX,
    PRED_TYPES,
    glm_predictive,
    nn_predictive,
    output_jacobian_factors,
)
from curvkit.laplace.prior import PriorPrecision
from curvkit.linalg import OuterProductFactor
from curvkit.linalg.factor_ops import reduce_softmax_errors
from curvkit.typing import Kind, Likelihood, Structure

LOWRANK_STRUCTURES = ("full", "block_diag")


def _log_likelihood_terms(outputs: Tensor, targets: Tensor, likelihood: str) -> Tensor:
    """``log p(y_n | f_n)`` per input (float64), with all normalising constants."""
    f = outputs.detach().to(torch.float64)
    if likelihood == "classification":
        return torch.log_softmax(f, dim=1).gather(1, targets.long().reshape(-1, 1))[:, 0]
    y = targets.to(torch.float64)
    if likelihood == "regression":
        return -0.5 * ((f - y) ** 2).sum(1) - 0.5 * f.shape[1] * math.log(2 * math.pi)
    return -nn.functional.binary_cross_entropy_with_logits(f, y, reduction="none").sum(1)


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
        num_data: training-set size ``n`` (default ``N``).
        route: ``"auto"``, ``"dual"`` (``M × M``) or ``"primal"`` (``P × P``) for ``"full"`` /
            ``"block_diag"``; ``"auto"`` picks the cheaper one that fits in memory.
        reduce_rank: ``"auto"`` (exact softmax Fisher: ``C − 1`` columns per input), ``True`` or
            ``False``.
        mc_samples: labels per input for ``kind="mc"``.
        generator: ``torch.Generator`` for ``kind="mc"``.
        params: the parameters to treat as random (default: all with ``requires_grad``).
        curvature: a prebuilt :class:`~curvkit.curvature.Curvature` on this batch to reuse
            (then ``kind``/``structure`` are taken from it).
        output_fn: maps the model output to the logits (default: the tensor or its ``.logits``).
        label_key: dict key of the labels in dict batches.
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
        progress: bool | None = None,
        fisher_options: dict | None = None,
    ) -> None:
        single = is_single_batch(inputs)
        if isinstance(inputs, Tensor) and (inputs.dim() == 0 or inputs.shape[0] == 0):
            raise ValueError("LaplacePosterior: the batch is empty (inputs.shape[0] == 0); pass at "
                             "least one input to build the Fisher on")
        if isinstance(inputs, Tensor) and targets is not None and (
                not isinstance(targets, Tensor) or targets.shape[0] != inputs.shape[0]):
            got = targets.shape[0] if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a Tensor with {inputs.shape[0]} rows (one per input), "
                             f"got {got}")
        if route not in ("auto", "dual", "primal"):
            raise ValueError(f"route must be 'auto', 'dual' or 'primal', got {route!r}")
        if reduce_rank not in ("auto", True, False):
            raise ValueError(f"reduce_rank must be 'auto', True or False, got {reduce_rank!r}")
        if num_data is not None and (isinstance(num_data, bool)
                                     or not isinstance(num_data, (int, np.integer)) or num_data < 1):
            raise ValueError(f"num_data must be a positive int (the training-set size), got {num_data!r}")
        if curvature is None:
            opts = dict(fisher_options or {})
            if not single and structure in LOWRANK_STRUCTURES and route != "auto":
                opts.setdefault("route", route)
            opts.setdefault("distributed_columns", "gather")  # the engine needs every column
            curvature = fisher(model, inputs, targets, likelihood=likelihood, kind=kind,
                               structure=structure, mc_samples=mc_samples, generator=generator,
                               params=params, output_fn=output_fn, label_key=label_key,
                               progress=progress, **opts)
        elif not isinstance(curvature, Curvature):
            raise TypeError(f"curvature must be a curvkit Curvature, got {type(curvature).__name__}")
        N = int(curvature.num_data)
        if num_data is None:
            num_data = int(curvature.info.get("num_seen", N))
        self.output_fn, self.label_key, self.progress = output_fn, label_key, progress
        self.model, self.inputs, self.targets = model, inputs, targets
        self.curvature = curvature
        self.likelihood, self.kind, self.structure = curvature.likelihood, curvature.kind, curvature.structure
        self.num_data, self.batch_size = int(num_data), N
        self.route, self.reduce_rank = route, reduce_rank
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
        self._J: list[OuterProductFactor] | None = None
        self._logdet_fns: dict[bool, object] = {}
        self._loglik: Tensor | None = None
        self._engine = self._build_engine(self._prior)

    # ------------------------------------------------------------------ layout helpers
    def _to_layer(self, x: Tensor) -> Tensor:
        return self.curvature.to_layer_space(x.reshape(-1, 1))[:, 0]

    def _from_layer(self, X: Tensor) -> Tensor:
        return self.curvature.from_layer_space(X)

    def _layer_values(self, layer_vec: Tensor) -> list[Tensor]:
        return list(layer_vec.split(self.layer_sizes))

    # ------------------------------------------------------------------ engines
    def _fisher_factors(self) -> list[OuterProductFactor]:
        """Per-layer factors of ``J = √n·G`` (exact softmax: ``C − 1`` columns per input)."""
        if self._J is None:
            cap = self.curvature.captured
            if cap is None:
                raise ValueError(f"structure={self.structure!r} did not capture Fisher columns")
            reduce = self.reduce_rank
            applicable = cap.likelihood == "classification" and cap.kind == "exact"
            if reduce is True and not applicable:
                raise ValueError("reduce_rank=True needs likelihood='classification' and kind='exact' "
                                 f"(got {cap.likelihood!r}, {cap.kind!r})")
            reduce = applicable and reduce in ("auto", True) and cap.outputs.shape[1] >= 2
            p = torch.softmax(cap.outputs.to(torch.float64), dim=1) if reduce else None
            scale = math.sqrt(self.num_data)
            J = []
            for layer, a, e in zip(self.layers, cap.a, cap.e):
                if reduce:
                    e = reduce_softmax_errors(e.to(torch.float64), p).to(e.dtype)
                J.append(layer.factor(a, e * scale))
            self._J = J
        return self._J

    @property
    def rank(self) -> int | None:
        """``M``, the number of Fisher columns (after rank reduction) for low-rank structures."""
        return self._J[0].rank if self._J else None

    def _build_engine(self, prior: PriorPrecision, previous: Engine | None = None) -> Engine:
        delta = self._to_layer(prior.diag)
        if self.structure in LOWRANK_STRUCTURES and self.curvature.captured is not None:
            return build_lowrank_engine(self._fisher_factors(), delta, self.layer_sizes,
                                        self.structure, self.route, previous)
        return build_operator_engine(self.curvature.operator, delta, self.layer_sizes,
                                     [layer.name for layer in self.layers], self.num_data,
                                     self.structure, self.route)

    @property
    def engine(self) -> Engine:
        """The layer-space covariance engine (blocks of ``Λ``)."""
        return self._engine

    @property
    def prior_precision(self):
        """The prior precision: a float, a list (per tensor) or a ``(P,)`` tensor."""
        return self._prior.value

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        prior = PriorPrecision(value, self.params, self.param_names)
        self._engine = self._build_engine(prior, previous=self._engine)
        self._prior = prior

    @property
    def prior(self) -> PriorPrecision:
        return self._prior

    def __repr__(self) -> str:
        extra = ""
        if self.structure in LOWRANK_STRUCTURES and self.curvature.captured is not None:
            b = self._engine.blocks[0]
            extra = f", M={b.rank}, route={b.route!r}"
        return (f"LaplacePosterior(structure={self.structure!r}, kind={self.kind!r}, "
                f"likelihood={self.likelihood!r}, P={self.num_params}, N={self.batch_size}, "
                f"num_data={self.num_data}{extra}, prior: {self._prior.describe()})")

    # ------------------------------------------------------------------ sampling and variances
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws ``θ ∼ N(θ_MAP, Λ⁻¹)``, shape ``(n, P)`` (``params`` order, model dtype).

        ``"full"``: perturbation trick (module doc), never forming ``P × P``. Kronecker blocks:
        ``U_B [Z ⊘ √(n s_B s_Aᵀ + δ)] U_Aᵀ``; diagonal: ``z / √(δ + n d)``.

        Args:
            n: number of samples (≥ 1).
            generator: the only source of randomness (``torch.Generator`` on the model's device).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        dev = self._engine.sample(int(n), generator)  # (P, n) layer space
        out = self._from_layer(dev).T
        out += self.mean[None, :].to(out.dtype)
        return out

    def marginal_variance(self) -> Tensor:
        """``diag(Λ⁻¹)`` as a ``(P,)`` tensor in ``params`` order (model dtype)."""
        d = self._engine.inverse_diagonal()
        return self._from_layer(d[:, None])[:, 0].to(self.mean.dtype)

    def _functional(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x; θ_MAP), J Λ⁻¹ Jᵀ)`` with shapes ``(N, C)`` and ``(N, C, C)``."""
        if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] == 0):
            raise ValueError("x must be a non-empty batch of inputs")
        n_x = batch_size(x)
        with torch.no_grad():
            C = int(forward(self.model, slice_inputs(x, 0, 1), self.output_fn).shape[1])
        # per test input: C columns of J_t (P each, float64) and, for a low-rank core, M × C Grams
        blocks = self._engine.blocks
        rank = blocks[0].rank if isinstance(blocks[0], LowRankBlock) else 0
        step = chunk_inputs(n_x, 8 * C * (3 * rank + 2 * self.num_params))
        means, covs = [], []
        for i in range(0, n_x, step):
            out, Jt = output_jacobian_factors(self.model, slice_inputs(x, i, i + step), self.layers,
                                              self.output_fn)
            means.append(out)
            covs.append(self._engine.functional_blocks(Jt, C))
        return torch.cat(means), torch.cat(covs).to(self.mean.dtype)

    def functional_variance(self, x: Tensor) -> Tensor:
        """``Σ_f(x_n) = J(x_n) Λ⁻¹ J(x_n)ᵀ`` per input, ``(N, C, C)`` (GLM functional covariance)."""
        return self._functional(x)[1]

    def predictive(self, x: Tensor, pred_type: str = "glm", link_approx: str | None = None,
                   n_samples: int = 100, generator: torch.Generator | None = None):
        """Posterior predictive at ``x`` (see :mod:`curvkit.laplace.predictive`).

        Args:
            x: the inputs of one batch (``(N, …)`` tensor; tuple: positional; dict: keywords) or
                an iterable of batches such as ``test_loader`` (labels in them are ignored;
                the results of all batches are concatenated).
            pred_type: ``"glm"`` (linearised network; Gaussian outputs) or ``"nn"`` (sampled weights).
            link_approx: ``"probit"`` (GLM default) or ``"mc"`` (``"nn"`` is always Monte Carlo).
            n_samples: Monte Carlo samples for ``"mc"`` / ``"nn"``.
            generator: randomness for ``"mc"`` / ``"nn"``.

        Returns:
            Classification / binary: probabilities ``(N, C)``. Regression: ``(mean (N, C),
            covariance (N, C, C))`` of ``f`` (add the unit noise variance for ``y``).
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
            return glm_predictive(self, x, link_approx, n_samples, generator)
        return nn_predictive(self, x, n_samples, generator)

    __call__ = predictive

    # ------------------------------------------------------------------ evidence
    def log_likelihood(self) -> Tensor:
        """``(n/N) Σ_{batch} log p(y_n | x_n, θ_MAP)`` with all constants (float64 scalar)."""
        if self._loglik is None:
            total = torch.zeros(2, dtype=torch.float64, device=self.mean.device)
            for b in iter_batches(self.inputs, self.targets, self.label_key, self.progress,
                                  desc="curvkit.laplace[log-likelihood]"):
                if b.targets is None:
                    raise ValueError("the evidence needs the batch labels: pass targets=... to "
                                     "LaplacePosterior (or (x, y) batches in the loader)")
                with torch.no_grad():
                    out = forward(self.model, b.inputs, self.output_fn)
                check_targets(out, b.targets, self.likelihood)
                total[0] += _log_likelihood_terms(out, b.targets, self.likelihood).sum()
                total[1] += b.size
            dd.all_reduce_sum([total])
            if int(total[1]) != self.batch_size and self.curvature.info.get("subsample") is None:
                raise ValueError(
                    f"the evidence pass over the data saw {int(total[1])} inputs but the Fisher "
                    f"{self.batch_size}; pass a re-iterable (a DataLoader or a list of batches), not "
                    "a one-shot generator, that yields the same data each time")
            self._loglik = total[0] * (self.num_data / total[1])
        return self._loglik

    def _logdet_fn(self, per_layer: bool):
        if per_layer not in self._logdet_fns:
            self._logdet_fns[per_layer] = self._engine.logdet_function(per_layer)
        return self._logdet_fns[per_layer]

    def _per_layer_constant(self, prior: PriorPrecision) -> Tensor | None:
        """Per-layer ``log δ_l`` if ``δ`` is constant on every layer, else ``None``."""
        vals = []
        for d in self._layer_values(self._to_layer(prior.diag)):
            if not bool((d == d[0]).all()):
                return None
            vals.append(d[0])
        return torch.stack(vals).log()

    def log_det_posterior_precision(self, prior_precision=None) -> Tensor:
        """``log det Λ`` for the current or a given prior precision (float64).

        Scalar priors use the cached eigenvalues (one eigendecomposition for all ``δ``); per-layer
        constant priors use per-layer eigenvalues or one Cholesky factorisation; other priors
        rebuild the factorisation.
        """
        if prior_precision is None:
            return self._engine.logdet()
        prior = PriorPrecision(prior_precision, self.params, self.param_names)
        t = self._per_layer_constant(prior)
        if t is not None:
            try:
                if prior.kind == "scalar" or bool((t == t[0]).all()):
                    return self._logdet_fn(False)(t[0])
                return self._logdet_fn(True)(t)
            except NotImplementedError:
                pass
        return self._build_engine(prior).logdet()

    def log_marginal_likelihood(self, prior_precision=None) -> Tensor:
        """Laplace evidence ``log p(D)`` (module doc); float64 scalar.

        ``(n/N) Σ_n log p(y_n|x_n,θ_MAP) − ½ θᵀΛ_pθ + ½ log det Λ_p − ½ log det Λ``; the
        ``±(P/2) log 2π`` of the prior density and of the Gaussian integral cancel.

        Args:
            prior_precision: evaluate at this prior (any accepted format) instead of the current
                one; the posterior itself is unchanged. For ``"full"``, every scalar value is
                evaluated from one ``M × M`` eigendecomposition of ``JᵀJ`` (cached).
        """
        prior = self._prior if prior_precision is None else PriorPrecision(
            prior_precision, self.params, self.param_names)
        logdet_post = self.log_det_posterior_precision(prior_precision)
        return (self.log_likelihood() - 0.5 * prior.scatter(self.mean) + 0.5 * prior.logdet()
                - 0.5 * logdet_post)

    def optimize_prior_precision(self, method: str = "marglik", per_layer: bool = False,
                                 bounds: tuple[float, float] = (1e-8, 1e8), max_iter: int = 200,
                                 val_inputs: Tensor | None = None, val_targets: Tensor | None = None,
                                 grid: Sequence[float] | None = None, link_approx: str = "probit"):
        """Choose the prior precision, set it, and return the new value.

        ``method="marglik"`` maximises the Laplace evidence. ``per_layer=False``: one scalar ``δ``
        (from eigenvalues; the stationarity condition is MacKay's ``δ‖θ‖² = γ(δ) =
        Σ_i λ_i/(δ + λ_i)``). ``per_layer=True``: one ``δ_l`` per layer (module; its weight and bias
        share it), by L-BFGS-B over ``log δ_l`` with exact gradients (for ``"full"`` one Cholesky of
        the ``M × M`` core per evaluation).

        ``method="gridsearch"`` (scalar only) minimises the negative log-likelihood of the GLM
        predictive on held-out data ``(val_inputs, val_targets)`` over ``grid`` (default
        ``10^{-2}, 10^{-1.5}, …, 10^{4}``): classification/binary ``−mean log p(y|x)`` of the
        predictive probabilities, regression the Gaussian NLL with variance ``Σ_f + I``.

        Args:
            method: ``"marglik"`` or ``"gridsearch"``.
            per_layer: scalar or per-layer precision (``"marglik"`` only).
            bounds: search interval for each ``δ`` (``"marglik"``).
            max_iter: iteration limit of the optimiser (``"marglik"``).
            val_inputs, val_targets: held-out data (``"gridsearch"``).
            grid: candidate values (``"gridsearch"``).
            link_approx: link of the GLM predictive (``"gridsearch"``).

        Returns:
            The new prior precision (float, or a list with one value per parameter tensor).
        """
        import scipy.optimize

        if method == "gridsearch":
            return self._gridsearch(per_layer, val_inputs, val_targets, grid, link_approx)
        if method != "marglik":
            raise ValueError(f"unknown method {method!r}; supported: ['marglik', 'gridsearch'] "
                             "(maximise the Laplace evidence, or minimise the validation NLL)")
        lo, hi = float(bounds[0]), float(bounds[1])
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds!r}")
        fn = self._logdet_fn(per_layer)
        loglik = float(self.log_likelihood())
        sq = torch.stack([(v**2).sum() for v in self._layer_values(self._theta_layer)])
        sizes = torch.tensor(self.layer_sizes, dtype=torch.float64, device=sq.device)
        if not per_layer:
            sq, sizes = sq.sum().reshape(1), sizes.sum().reshape(1)

        def negative_evidence(x: np.ndarray) -> tuple[float, np.ndarray]:
            t = torch.tensor(x, dtype=torch.float64, device=sq.device, requires_grad=True)
            ld = fn(t) if per_layer else fn(t[0])
            ev = loglik - 0.5 * (torch.exp(t) * sq).sum() + 0.5 * (sizes * t).sum() - 0.5 * ld
            (-ev).backward()
            return float(-ev.detach()), t.grad.cpu().numpy().astype(np.float64)

        t0 = self._per_layer_constant(self._prior)
        if t0 is None:
            t0 = torch.stack([d.log().mean() for d in self._layer_values(self._to_layer(self._prior.diag))])
        x0 = t0.cpu().numpy() if per_layer else np.array([float(t0.mean())])
        x0 = np.clip(x0, math.log(lo), math.log(hi))
        res = scipy.optimize.minimize(negative_evidence, x0, jac=True, method="L-BFGS-B",
                                      bounds=[(math.log(lo), math.log(hi))] * len(x0),
                                      options={"maxiter": max_iter})
        if np.any(np.isclose(res.x, math.log(lo))) or np.any(np.isclose(res.x, math.log(hi))):
            warnings.warn(f"the optimal prior precision is at the bound of {bounds}; widen bounds=",
                          stacklevel=2)
        deltas = np.exp(res.x)
        if per_layer:
            owner = {}
            for li, layer in enumerate(self.layers):
                owner[id(layer.module.weight)] = li
                if layer.module.bias is not None:
                    owner[id(layer.module.bias)] = li
            value = [float(deltas[owner[id(p)]]) for p in self.params]
        else:
            value = float(deltas[0])
        self.prior_precision = value
        return value

    def _gridsearch(self, per_layer: bool, x: Tensor | None, y: Tensor | None,
                    grid: Sequence[float] | None, link_approx: str) -> float:
        if per_layer:
            raise ValueError("method='gridsearch' tunes a scalar prior precision; use "
                             "method='marglik' for per_layer=True")
        if x is None or is_single_batch(x) and (y is None or not isinstance(x, Tensor)
                                   or not isinstance(y, Tensor) or x.shape[0] == 0
                                   or y.shape[0] != x.shape[0]):
            raise ValueError("method='gridsearch' needs held-out data: val_inputs and val_targets "
                             "with the same (non-zero) number of rows, or val_inputs an iterable "
                             "of (x, y) batches")
        values = [float(v) for v in (grid if grid is not None else np.logspace(-2, 4, 13))]
        if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError(f"grid must hold finite positive values, got {grid!r}")
        best, best_nll = values[0], math.inf
        for v in values:
            self.prior_precision = v
            nll = self._predictive_nll(x, y, link_approx)
            if nll < best_nll:
                best, best_nll = v, nll
        self.prior_precision = best
        return best

    def _predictive_nll(self, x, y, link_approx: str) -> float:
        """Mean negative log-likelihood of the GLM predictive on ``(x, y)`` (or batches of them)."""
        total, count = 0.0, 0
        for b in iter_batches(x, y, self.label_key, False):
            if b.targets is None:
                raise ValueError("method='gridsearch' needs the labels of the held-out batches")
            total += self._batch_nll(b.inputs, b.targets, link_approx) * b.size
            count += b.size
        return total / count

    def _batch_nll(self, x, y: Tensor, link_approx: str) -> float:
        if self.likelihood == "regression":
            mean, cov = self.predictive(x, "glm")
            S = cov.to(torch.float64) + torch.eye(cov.shape[1], dtype=torch.float64, device=cov.device)
            d = (y.to(torch.float64) - mean.to(torch.float64))[:, :, None]
            quad = (d.transpose(1, 2) @ torch.linalg.solve(S, d))[:, 0, 0]
            return float(0.5 * (quad + torch.logdet(S) + S.shape[1] * math.log(2 * math.pi)).mean())
        p = self.predictive(x, "glm", link_approx,
                            generator=torch.Generator(device=y.device).manual_seed(0))
        p = p.to(torch.float64).clamp_min(1e-12)
        if self.likelihood == "classification":
            return float(-p.gather(1, y.long().reshape(-1, 1)).log().mean())
        yt = y.to(torch.float64)
        return float(-(yt * p.log() + (1 - yt) * (1 - p).clamp_min(1e-12).log()).sum(1).mean())
