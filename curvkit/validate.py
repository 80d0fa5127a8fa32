"""Compare curvature approximations with the exact damped Fisher on one batch.

:func:`compare` builds, on the same batch and (for ``kind="mc"``) the same sampled labels, the
exact subsampled Fisher ``F`` (the reference) and each requested structure ``F̃`` (``"kfac"``,
``"foof"``, ``"block_diag"``, ``"diag"``, ...), and reports per structure and damping mode:

* ``matrix_error`` -- ``‖D̃ − D‖_F / ‖D‖_F`` with the damped matrices ``D = F + λI`` and ``D̃``
  the structure's damped matrix: ``F̃ + λI`` (``damping_mode="exact"``, paper eq 3) or, for
  KFAC's ``"heuristic"`` mode, ``blockdiag_l((B̂_l + λ_B I) ⊗ (Â_l + λ_A I))`` (paper eq 4).
  Only with ``reference="explicit"`` (it needs the ``P × P`` matrices).
* ``direction_error`` and ``direction_cosine`` -- of the preconditioned gradient
  ``x̃ = D̃⁻¹ ∇L`` against ``x = (F + λI)⁻¹ ∇L``: ``‖x̃ − x‖/‖x‖`` and ``⟨x̃, x⟩/(‖x̃‖‖x‖)``.
  ``∇L`` is the gradient of the mean negative log-likelihood ``L = (1/N) Σ_n −log p(y_n|x_n)``
  on the data labels.
* ``cosine_A`` -- the cosine in FOOF's inner product (paper Fig 3B), per layer ``l``::

      ⟨U, V⟩_Â = tr(U Â_l Vᵀ) = ⟨U Â_l^{1/2}, V Â_l^{1/2}⟩_F,
      cos_Â(U, V) = ⟨U, V⟩_Â / (‖U‖_Â ‖V‖_Â)

  with ``U``, ``V`` the layer's ``d_out × d_in`` blocks (``[W | b]``) of ``x̃`` and ``x``, and
  ``Â_l = (1/N) Σ_n Σ_t ã ãᵀ`` the *undamped* FOOF/KFAC input factor of the batch. It measures
  how similarly the two directions change the layer's outputs. ``cosine_A`` is the mean over
  layers; ``cosine_A_network`` pools the layers (``Σ_l ⟨·,·⟩_Â`` in numerator and norms).

When both ``"kfac"`` and ``"foof"`` are compared, :attr:`ValidationReport.pairs` also holds
``cos_Â(x̃_KFAC, x̃_FOOF)`` for each KFAC damping mode -- the quantity plotted in Fig 3B.

``reference="explicit"`` forms ``F`` as a dense ``P × P`` float64 matrix and solves with it;
``reference="woodbury"`` never forms a ``P × P`` matrix: ``x = F.solve(∇L, λ)`` through the
``M × M`` Woodbury core of ``curvkit.fisher(..., structure="full")`` (exact; for large ``P``),
and the matrix errors are left out.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from curvkit.curvature import Curvature, fisher
from curvkit.curvature import structures as registered_structures
from curvkit.curvature.data import is_single_batch, iter_batches
from curvkit.curvature.distributed import all_reduce_sum
from curvkit.curvature.jacobian import num_loss_terms
from curvkit.curvature.kfac import KroneckerBlockDiagonal, factors_of, input_factor, input_factor_of
from curvkit.curvature.layout import BlockLayout
from curvkit.curvature.streaming import (
    KINDS,
    LIKELIHOODS,
    check_choice,
    check_outputs,
    check_targets,
    forward,
    loss_gradient,
)
from curvkit.linalg import available_memory_bytes, damped_cholesky
from curvkit.typing import DampingMode, Kind, Likelihood, Structure

__all__ = ["compare", "ValidationReport", "Row", "REFERENCES"]

#: Reference solvers accepted by :func:`compare`.
REFERENCES = ("explicit", "woodbury")

DEFAULT_STRUCTURES: tuple[Structure, ...] = ("kfac", "foof", "block_diag", "diag")


@dataclass
class Row:
    """Result for one structure and damping mode (see the module docstring for the metrics).

    Attributes:
        structure: the structure's name.
        damping_mode: ``"exact"`` or ``"heuristic"``.
        matrix_error: ``‖D̃ − D‖_F / ‖D‖_F`` (``None`` with ``reference="woodbury"``).
        direction_error: ``‖x̃ − x‖ / ‖x‖``.
        direction_cosine: ``cos(x̃, x)``.
        cosine_A: mean over layers of ``cos_Â(x̃_l, x_l)``.
        cosine_A_layers: per layer ``cos_Â(x̃_l, x_l)``.
        cosine_A_network: ``cos_Â`` pooled over layers.
        build_seconds: time to build the structure.
        solve_seconds: time of the damped solve.
    """

    structure: str
    damping_mode: str
    matrix_error: float | None
    direction_error: float
    direction_cosine: float
    cosine_A: float
    cosine_A_layers: list[float]
    cosine_A_network: float
    build_seconds: float
    solve_seconds: float

    @property
    def label(self) -> str:
        """The structure name, with ``[heuristic]`` appended for KFAC's heuristic damping."""
        return self.structure if self.damping_mode == "exact" else f"{self.structure}[{self.damping_mode}]"


@dataclass
class ValidationReport:
    """What :func:`compare` found; ``str(report)`` is a table, :meth:`to_dict` is JSON-ready.

    Attributes:
        settings: the comparison's settings (kind, likelihood, ``N``, ``P``, damping, ...).
        rows: one :class:`Row` per structure and damping mode.
        pairs: ``cos_Â`` between KFAC and FOOF directions (paper Fig 3B), if both were compared.
        baseline: the plain gradient as a direction: ``cos(∇L, x)`` and ``cos_Â(∇L, x)``.
    """

    settings: dict
    rows: list[Row]
    pairs: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)

    def closest(self, metric: str = "direction_cosine") -> Row:
        """The row closest to the reference by ``metric`` (cosines: largest; errors: smallest)."""
        valid = ("direction_cosine", "cosine_A", "cosine_A_network", "direction_error", "matrix_error")
        if metric not in valid:
            raise ValueError(f"unknown metric {metric!r}; valid: {list(valid)}")
        rows = [r for r in self.rows if getattr(r, metric) is not None]
        if not rows:
            raise ValueError(f"no row has {metric!r} (matrix_error needs reference='explicit')")
        if metric.endswith("error"):
            return min(rows, key=lambda r: getattr(r, metric))
        return max(rows, key=lambda r: getattr(r, metric))

    def to_dict(self) -> dict:
        """Plain ``dict`` of settings, rows and pairs (``json.dumps``-able)."""
        return {"settings": dict(self.settings), "rows": [asdict(r) for r in self.rows],
                "pairs": dict(self.pairs), "baseline": dict(self.baseline)}

    def to_json(self, **kwargs) -> str:
        """The report as JSON text; ``kwargs`` go to ``json.dumps``."""
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        s = self.settings
        head = (f"curvkit.validate: kind={s['kind']!r}, likelihood={s['likelihood']!r}, "
                f"N={s['num_data']}, P={s['num_params']}, layers={s['num_layers']}, "
                f"damping={s['damping']:g}, reference={s['reference']!r}, dtype={s['dtype']}")
        cols = ("structure", "damping", "‖D̃−D‖/‖D‖", "‖x̃−x‖/‖x‖", "cos(x̃,x)", "cos_Â(x̃,x)", "time [s]")
        body = []
        for r in self.rows:
            body.append((
                r.structure, r.damping_mode,
                "n/a" if r.matrix_error is None else f"{r.matrix_error:.4f}",
                f"{r.direction_error:.4f}", f"{r.direction_cosine:.4f}", f"{r.cosine_A:.4f}",
                f"{r.build_seconds + r.solve_seconds:.2f}",
            ))
        widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths)))

        lines = [head, fmt(cols), "  ".join("-" * w for w in widths)]
        lines += [fmt(b) for b in body]
        if self.baseline:
            lines.append(f"plain gradient ∇L: cos(∇L,x) = {self.baseline['direction_cosine']:.4f}, "
                         f"cos_Â(∇L,x) = {self.baseline['cosine_A']:.4f}")
        if self.pairs:
            lines.append("Fig 3B: " + ", ".join(f"{k} = {v:.4f}" for k, v in self.pairs.items()))
        if self.rows:
            best = self.closest()
            lines.append(f"closest to the exact Fisher (cos(x̃,x)): {best.label}")
        lines.append("x = (F + λI)⁻¹∇L, x̃ = D̃⁻¹∇L; D = F + λI, D̃ the structure's damped matrix; "
                     "cos_Â: inner product tr(U Â Vᵀ), Â = (1/N)Σ ã ãᵀ undamped, mean over layers")
        return "\n".join(lines)


# ---------------------------------------------------------------------- helpers
def _check_args(reference: str, damping: float, structs: tuple[str, ...], likelihood: str,
                kind: str) -> None:
    check_choice(reference, REFERENCES, "reference")
    check_choice(likelihood, LIKELIHOODS, "likelihood")
    check_choice(kind, KINDS, "kind")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
            or damping <= 0:
        raise ValueError(f"damping must be a finite number > 0 (the Fisher is rank-deficient), got "
                         f"{damping!r}")
    if not structs:
        raise ValueError(f"structures is empty; choose from {list(registered_structures())}")
    unknown = [s for s in structs if s not in registered_structures()]
    if unknown:
        raise ValueError(f"unknown structures {unknown}; registered: {list(registered_structures())}")


def _gradient(model: nn.Module, inputs, targets: Tensor | None, likelihood: str,
              params: list[nn.Parameter]) -> Tensor:
    """``∇L`` of ``L = (1/N_ℓ) Σ −log p(y|x)`` over one batch or all batches, flat.

    ``N_ℓ`` counts loss terms as the Fisher does (inputs; for outputs ``(N, …, C)`` the positions
    whose target is not ``-100``). With a ``torch.distributed`` group each rank sums over its
    shard and the sums are all-reduced, so every rank holds the gradient of the union.
    """
    total, terms = None, 0
    for b in iter_batches(inputs, targets, progress=False):
        if b.targets is None:
            raise ValueError("compare needs the data targets to form the gradient ∇L: pass "
                             "targets=... (or (x, y) batches)")
        with torch.enable_grad():
            outputs = forward(model, b.inputs)
            check_outputs(outputs, likelihood)
            check_targets(outputs, b.targets, likelihood)
            seed = loss_gradient(outputs, b.targets, likelihood)
            terms += num_loss_terms(outputs, b.targets, likelihood)
            grads = torch.autograd.grad(outputs, params, grad_outputs=seed.to(outputs.dtype),
                                        allow_unused=True)
        g = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                       for g, p in zip(grads, params)]).detach()
        total = g if total is None else total + g
    if total is None:
        raise ValueError("compare got no batch; pass at least one")
    count = torch.tensor([float(terms)], dtype=total.dtype, device=total.device)
    total, count = all_reduce_sum([total, count])  # torch.distributed: the union of the shards
    return total / count


def _layer_blocks(F: Curvature, x: Tensor) -> list[Tensor]:
    """Flat parameter-space vector -> per-layer ``[W | b]`` blocks ``(d_out, d_in)`` (float64)."""
    sizes = [p.numel() for p in F.params]
    parts = {id(p): t.reshape(p.shape)
             for p, t in zip(F.params, x.reshape(-1).to(torch.float64).split(sizes))}
    return [BlockLayout.of(layer).block([parts[id(p)] for p in layer.parameters()])
            for layer in F.layers]


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(torch.dot(a, b) / (na * nb))


def _cos_A(U: list[Tensor], V: list[Tensor], A: list[Tensor]) -> tuple[list[float], float]:
    """Per-layer and pooled ``cos_Â`` with ``⟨U, V⟩_Â = tr(U Â Vᵀ)``."""
    per, num, nu, nv = [], 0.0, 0.0, 0.0
    for u, v, a in zip(U, V, A):
        uv, uu, vv = float(((u @ a) * v).sum()), float(((u @ a) * u).sum()), float(((v @ a) * v).sum())
        per.append(uv / math.sqrt(uu * vv) if uu > 0 and vv > 0 else float("nan"))
        num, nu, nv = num + uv, nu + uu, nv + vv
    return per, (num / math.sqrt(nu * nv) if nu > 0 and nv > 0 else float("nan"))


def _damped_dense(F: Curvature, damping: float, mode: str) -> Tensor:
    """The structure's damped matrix in parameter space, float64 (paper eqs 3–4)."""
    op = F.operator
    if isinstance(op, KroneckerBlockDiagonal):
        L = op.damped_dense(damping, mode).to(torch.float64)
        D = torch.zeros_like(L)
        D[F.index[:, None], F.index[None, :]] = L
        return D
    if mode != "exact":
        raise ValueError(f"{F.name} has no damped matrix for damping_mode={mode!r}; it supports "
                         f"{list(F.damping_modes)}")
    D = F.to_dense().to(torch.float64)
    return D + damping * torch.eye(D.shape[0], dtype=torch.float64, device=D.device)


def _rel_frobenius(D: Tensor, ref: Tensor) -> float:
    return float(torch.linalg.matrix_norm(D - ref) / torch.linalg.matrix_norm(ref))


# ---------------------------------------------------------------------- public
def compare(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    likelihood: Likelihood = "classification",
    kind: Kind = "exact",
    structures: Sequence[Structure] | Structure = DEFAULT_STRUCTURES,
    damping: float = 1e-3,
    reference: str = "explicit",
    generator: torch.Generator | None = None,
    *,
    mc_samples: int = 1,
    params: Sequence[nn.Parameter] | None = None,
    progress: bool | None = None,
) -> ValidationReport:
    """Compare curvature structures with the exact damped Fisher on one batch.

    Args:
        model: the network (supported layers: ``nn.Linear``, ``nn.Conv2d``); put BatchNorm /
            Dropout models in eval mode first.
        inputs: the batch (``N`` inputs; tensor, tuple or dict as in :func:`curvkit.fisher`), or
            an iterable of ``(x, y)`` batches (a ``DataLoader``): then every structure is the
            Fisher of the union and ``∇L`` the mean gradient over all data (the iterable is
            passed over once per structure, so it must be re-iterable). With an initialised
            ``torch.distributed`` group each rank passes its shard and gets the report of the
            union (``reference="woodbury"``: the Woodbury columns stay with their ranks;
            ``"explicit"``: they are gathered for the dense matrices).
        targets: the data labels (for the gradient ``∇L``, and for ``kind="empirical"``); with
            an iterable, in its batches.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        kind: the Fisher kind of the reference and of every structure.
        structures: registered structure names; ``"kfac"`` is reported for both damping modes.
        damping: ``λ > 0``.
        reference: ``"explicit"`` (dense ``P × P``, with matrix errors) or ``"woodbury"``
            (``F.solve`` of ``structure="full"``; no ``P × P`` matrix, for large ``P``).
        generator: MC sampling for ``kind="mc"``. Every structure sees the same sampled labels
            (each is built from a copy of the generator's state); if ``None`` one is seeded from
            the global RNG and the seed is recorded in ``settings["mc_seed"]``.
        mc_samples: MC samples per input for ``kind="mc"``.
        params: parameters to compare on (default: all with ``requires_grad``).
        progress: tqdm progress bars over an iterable of batches (default on).

    Returns:
        A :class:`ValidationReport`.

    Raises:
        ValueError: unknown ``reference``, ``kind``, ``likelihood`` or structure; ``damping ≤ 0``;
            missing or malformed targets.
        MemoryError: ``reference="explicit"`` would not fit (use ``reference="woodbury"``).
    """
    structs = (structures,) if isinstance(structures, str) else tuple(structures)
    _check_args(reference, damping, structs, likelihood, kind)
    if targets is None and is_single_batch(inputs) and not isinstance(inputs, (tuple, list, dict)):
        raise ValueError("compare needs the data targets to form the gradient ∇L: pass targets=...")
    damping = float(damping)
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]

    mc_seed = None
    state = None
    if kind == "mc":
        if generator is None:
            mc_seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator(device=params[0].device).manual_seed(mc_seed)
        state = generator.get_state()

    def fresh_generator() -> torch.Generator | None:
        if state is None or generator is None:  # a state is saved only with a generator
            return generator
        g = torch.Generator(device=generator.device)
        g.set_state(state.clone())
        return g

    def build(structure: Structure, gen: torch.Generator | None) -> Curvature:
        return fisher(model, inputs, targets, likelihood=likelihood, kind=kind, structure=structure,
                      mc_samples=mc_samples, generator=gen, params=params, progress=progress,
                      distributed_columns="gather" if reference == "explicit" else "shard")

    F = build("full", generator)
    P = F.shape[0]
    grad = _gradient(model, inputs, targets, likelihood, F.params)
    if reference == "explicit":
        need = 3 * P * P * 8
        if need > 0.9 * available_memory_bytes(F.device):
            raise MemoryError(
                f"reference='explicit' needs about {need / 1e9:.1f} GB for {P}×{P} float64 "
                "matrices; use reference='woodbury' (exact solves without a P×P matrix)")
        D_ref = _damped_dense(F, damping, "exact")
        g64 = grad.to(torch.float64).unsqueeze(1)
        x_ref = damped_cholesky(D_ref, name="damped Fisher (explicit reference)").solve(g64)[:, 0]
    else:
        D_ref = None
        x_ref = F.solve(grad, damping).to(torch.float64)
    if F.captured is not None:
        A = [input_factor_of(layer, a).to(torch.float64) if layer.one_hot
             else input_factor(a.to(torch.float64)) for layer, a in zip(F.layers, F.captured.a)]
    else:  # the union over batches took the primal route: Â from the (exact) union FOOF factors
        A = [a.to(torch.float64) for a in factors_of(build("foof", None)).A]
    V_ref = _layer_blocks(F, x_ref)

    rows: list[Row] = []
    directions: dict[tuple[str, str], list[Tensor]] = {}
    for structure in structs:
        t0 = time.perf_counter()
        Fs = build(structure, fresh_generator())
        build_s = time.perf_counter() - t0
        modes: tuple[DampingMode, ...] = ("exact", "heuristic") if structure == "kfac" else ("exact",)
        for mode in modes:
            t0 = time.perf_counter()
            x = Fs.solve(grad, damping, damping_mode=mode)
            solve_s = time.perf_counter() - t0
            x64 = x.to(torch.float64)
            U = _layer_blocks(Fs, x64)
            per, pooled = _cos_A(U, V_ref, A)
            directions[(structure, mode)] = U
            err = None
            if D_ref is not None:
                err = _rel_frobenius(_damped_dense(Fs, damping, mode), D_ref)
            rows.append(Row(
                structure=structure, damping_mode=mode, matrix_error=err,
                direction_error=float(torch.linalg.vector_norm(x64 - x_ref)
                                      / torch.linalg.vector_norm(x_ref)),
                direction_cosine=_cos(x64, x_ref), cosine_A=float(sum(per) / len(per)),
                cosine_A_layers=per, cosine_A_network=pooled, build_seconds=build_s,
                solve_seconds=solve_s,
            ))
        del Fs

    pairs: dict[str, float] = {}
    if ("foof", "exact") in directions:
        for mode in ("exact", "heuristic"):
            if ("kfac", mode) in directions:
                per, _ = _cos_A(directions[("kfac", mode)], directions[("foof", "exact")], A)
                pairs[f"cos_Â(kfac[{mode}], foof)"] = float(sum(per) / len(per))

    per, _ = _cos_A(_layer_blocks(F, grad), V_ref, A)
    baseline = {"direction_cosine": _cos(grad.to(torch.float64), x_ref),
                "cosine_A": float(sum(per) / len(per))}
    settings = {
        "kind": kind, "likelihood": likelihood, "num_data": F.num_data, "num_params": P,
        "num_layers": len(F.layers), "damping": damping, "reference": reference,
        "mc_samples": mc_samples if kind == "mc" else None, "mc_seed": mc_seed,
        "dtype": str(F.dtype).replace("torch.", ""), "structures": list(structs),
        "fisher": F.formula,
        "cosine_A": "tr(U Â Vᵀ)/(‖U‖_Â‖V‖_Â), Â = (1/N) Σ_n Σ_t ã ãᵀ (undamped), mean over layers",
    }
    return ValidationReport(settings, rows, pairs, baseline)
