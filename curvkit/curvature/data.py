"""Curvature of the union of batches: one batch, an iterable of batches, or shards on many ranks.

The meaning is stated once: for batches ``B_1, …, B_K`` of sizes ``N_1, …, N_K`` (any sizes,
``N = Σ_k N_k``; with ``torch.distributed``, the batches of every rank), the Fisher is that of one
batch holding all ``N`` data, ``F = (1/N) Σ_{n=1}^{N} E[g_n g_nᵀ]`` (the expectation of the
kind). Each per-batch quantity below is a mean over its batch, so the union is the
``N_k``-weighted mean. For outputs ``(N, …, C)`` the Fisher is the mean per loss term
(:mod:`curvkit.capture.targets`): its error-side quantities (``B̂``, the diagonal, the Woodbury
columns) are weighted by the batches' loss terms ``N_ℓ,k`` and divided by ``N_ℓ = Σ_k N_ℓ,k``
instead (``Â`` stays a mean over inputs), so the union is again the concatenated batch; the
total is ``Curvature.info["num_loss_terms"]``:

* ``"kfac"`` -- the KFAC **of the union**: ``Â = (1/N) Σ_k N_k Â_k`` and ``B̂ = (1/N) Σ_k N_k B̂_k``
  (both factors accumulated over all data, then one Kronecker product per layer), i.e. exactly
  ``curvkit.fisher`` on the concatenated batch. (laplace-torch's ``KronLaplace.fit(loader)``
  instead sums the per-batch Kronecker products ``Σ_k B̂_k ⊗ Â_k``; the two differ.)
* ``"foof"`` -- ``Â`` as above; ``"diag"`` -- ``diag(F) = (1/N) Σ_k N_k diag(F_k)`` (exact).
* ``"full"`` / ``"block_diag"`` -- ``F = G Gᵀ`` whose columns are those of every batch, the
  errors rescaled from ``1/√N_k`` to ``1/√N``. Two ways, nothing of size ``P × N`` formed:

  - *primal* (``route="primal"``, or ``"auto"`` once the columns seen reach ``M ≥ P`` and the
    ``P × P`` matrix fits the budget): ``F = (1/N) Σ_k N_k U_k U_kᵀ`` accumulated batch by
    batch in float64; only the ``P × P`` (per layer for ``"block_diag"``) matrix is kept;
  - *dual* (Woodbury): the per-layer inputs ``a`` and errors ``e`` of all batches are kept
    (memory ``Σ_l N·T_l·(d_in,l + R·d_out,l)`` values plus the ``M × M`` Gram, ``M = N·R``) up
    to ``column_budget_gb`` (default: half the available memory); beyond it a ``MemoryError``
    states the GB estimate. ``subsample=k`` with a ``subsample_generator`` keeps the columns of
    ``k`` data drawn uniformly without replacement (reservoir sampling over the stream), giving
    ``F̃ = (1/k) Σ_{kept}``, an unbiased estimate of the union Fisher.

``kind="mc"`` draws its labels batch by batch from the one ``generator``, so the union is a valid
MC Fisher of all data but its draws differ from those on the concatenated batch.

**Processes.** With an initialised ``torch.distributed`` group (more than one rank), each rank
passes its shard: factors and diagonals are all-reduced (sums and ``N``), primal matrices
all-reduced (the route decided by all ranks together), and the Woodbury columns either stay with
their ranks (``distributed_columns="shard"``, the default of :func:`curvkit.fisher`: the Gram is
assembled from per-layer inputs/errors broadcast rank by rank, a solve all-gathers ``Uᵀv``
(``M`` numbers) and all-reduces one ``P``-vector, memory per rank shrinks with the number of
ranks; ``Curvature.captured`` is then ``None``) or are all-gathered in rank order
(``"gather"``, used by the Laplace posterior, EWC and validate, which need every column). Either
way every rank holds the curvature of the union, equal to one process on the rank-ordered
concatenated data. Every rank must pass at least one batch, and all ranks make the same calls.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from curvkit.capture import Captured, parse_batch
from curvkit.curvature import distributed as dd
from curvkit.linalg import (
    BlockDiagonal,
    Dense,
    Diagonal,
    LinearOperator,
    StackedFactor,
    Woodbury,
    available_memory_bytes,
)

__all__ = ["build", "is_single_batch", "iter_batches", "UNION_STRUCTURES"]

#: Structures with a union over batches (see the module docstring).
UNION_STRUCTURES = ("full", "block_diag", "kfac", "foof", "diag")
_MEAN_FACTORS = ("kfac", "foof")


def is_single_batch(data: Any) -> bool:
    """One batch (tensor, dict, tuple, list of tensors) rather than an iterable of batches.

    A ``list`` whose elements are all tuples, lists or dicts is a list of batches; any other
    iterable (``DataLoader``, generator) is an iterable of batches.
    """
    if isinstance(data, (Tensor, Mapping, tuple)):
        return True
    if isinstance(data, list):
        return not (data and all(isinstance(b, (tuple, list, Mapping)) for b in data))
    return False


def iter_batches(data: Any, targets: Any = None, label_key: str = "labels",
                 progress: bool | None = None, desc: str = "curvkit") -> Iterator:
    """Parsed batches (:class:`~curvkit.capture.Batch`) of one batch or an iterable of batches.

    Args:
        data: one batch or an iterable of batches.
        targets: labels of a single batch (an error with an iterable).
        label_key: dict key of the labels.
        progress: tqdm bar over an iterable (default on); ``False`` turns it off.
        desc: the bar's label.
    """
    if is_single_batch(data):
        yield parse_batch(data, targets, label_key)
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a batch (Tensor, tuple, dict) or an iterable of batches "
                        f"(e.g. a DataLoader), got {type(data).__name__}")
    if targets is not None:
        raise ValueError("targets=... goes with a single batch; with an iterable of batches each "
                         "batch carries its labels: (inputs, targets) tuples or dicts with a "
                         f"{label_key!r} key")
    total = len(cast(Sized, data)) if hasattr(data, "__len__") else None
    bar = tqdm(data, total=total, desc=desc, disable=progress is False, leave=False,
               dynamic_ncols=True)
    try:
        for b in bar:
            yield parse_batch(b, None, label_key)
    finally:
        bar.close()


def _expected_total(data: Any, first: int) -> int | None:
    """The number of data an iterable will yield, when it says so (``len(loader.dataset)``)."""
    ds = getattr(data, "dataset", None)
    if ds is not None and hasattr(ds, "__len__"):
        return len(ds)
    if hasattr(data, "__len__"):
        return len(data) * first
    return None


# ====================================================================== building
def build(ctx0, structure: str, builder: Callable[..., LinearOperator], data: Any,
          targets: Any, *, label_key: str, progress: bool | None, subsample: int | None,
          subsample_generator: torch.Generator | None, column_budget_gb: float | None,
          options: dict, distributed_columns: str = "shard"
          ) -> tuple[LinearOperator, Captured | None, int, dict]:
    """``(layer-space operator, captured or None, N, info)`` of the union (module docstring)."""
    from curvkit.curvature.build import check_inputs

    single = is_single_batch(data)
    if subsample is not None:
        if isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1:
            raise ValueError(f"subsample must be a positive int (data to keep), got {subsample!r}")
        if structure not in ("full", "block_diag"):
            raise ValueError(f"subsample= keeps Woodbury columns, for structure='full' or "
                             f"'block_diag' only (got {structure!r}, which accumulates exactly)")
        if not isinstance(subsample_generator, torch.Generator):
            raise ValueError("subsample=k needs subsample_generator=torch.Generator().manual_seed("
                             "s), so the kept data are reproducible")
        if dd.is_distributed():
            raise NotImplementedError("subsample= with a torch.distributed process group is not "
                                      "supported; subsample on one process or use route='primal'")
    if distributed_columns not in ("shard", "gather"):
        raise ValueError(f"distributed_columns must be 'shard' or 'gather', got "
                         f"{distributed_columns!r}")
    if column_budget_gb is not None and not (column_budget_gb > 0):
        raise ValueError(f"column_budget_gb must be positive, got {column_budget_gb!r}")

    def contexts() -> Iterator:
        for b in iter_batches(data, targets, label_key, progress,
                              desc=f"curvkit.fisher[{structure}]"):
            check_inputs(b.inputs, ctx0.params)
            yield dataclasses.replace(ctx0, inputs=b.inputs, targets=b.targets)

    if single and subsample is None and not dd.is_distributed():
        ctx = next(contexts())
        op = builder(ctx, **options)
        return op, ctx.__dict__.get("captured"), ctx.num_data, {}
    if structure not in UNION_STRUCTURES:
        raise NotImplementedError(
            f"structure={structure!r} has no union over several batches or ranks; pass one batch "
            f"or use one of {list(UNION_STRUCTURES)}")
    if structure in _MEAN_FACTORS or structure == "diag":
        return _mean_union(structure, builder, contexts(), options)
    return _column_union(ctx0, structure, builder, contexts(), data, options, subsample,
                         subsample_generator, column_budget_gb, distributed_columns)


def _no_data() -> ValueError:
    return ValueError("the iterable of batches yielded no batch; pass at least one batch")


def _mean_union(structure: str, builder, contexts: Iterator, options: dict):
    """KFAC / FOOF factors or the diagonal: ``N_k``-weighted sums, then ``/N``."""
    from curvkit.curvature.kfac import KFACFactors, KroneckerBlockDiagonal

    N, NT, first = 0, 0, None
    sums: list[Tensor] | None = None
    for ctx in contexts:
        op = builder(ctx, **options)
        n = ctx.num_data
        nt = loss_terms(ctx, n)
        if structure == "diag":
            parts = [op.diagonal().to(torch.float64) * nt]
        else:
            f = op.factors
            parts = [A.to(torch.float64) * n for A in f.A]
            parts += [B.to(torch.float64) * nt for B in f.B if B is not None]
        sums = parts if sums is None else [s.add_(p) for s, p in zip(sums, parts)]
        if first is None:
            first = op
        N, NT = N + n, NT + nt
    if first is None or sums is None:  # both None together: no batch
        if not dd.is_distributed():
            raise _no_data()
        raise ValueError("this rank's shard yielded no batch; give every rank at least one")
    total = torch.tensor([float(N), float(NT)], dtype=torch.float64, device=sums[0].device)
    dd.all_reduce_sum([*sums, total])
    N, NT = int(total[0].item()), int(total[1].item())
    info = {"num_loss_terms": NT}
    if structure == "diag":
        return Diagonal((sums[0] / NT).to(first.dtype), name=first.name), None, N, info
    f = first.factors
    L = len(f.A)
    mean = [(s / (N if i < L else NT)).to(first.dtype) for i, s in enumerate(sums)]
    B = mean[L:] if f.B[0] is not None else [None] * L
    factors = KFACFactors(layers=f.layers, A=tuple(mean[:L]), B=tuple(B), num_data=N, kind=f.kind)
    return KroneckerBlockDiagonal(factors, name=first.name), None, N, info


def loss_terms(ctx, n: int) -> int:
    """``N_ℓ`` of a batch whose capture ran (``n``, its inputs, otherwise)."""
    cap = ctx.__dict__.get("captured")
    return int(cap.num_terms) if cap is not None and cap.num_terms is not None else n


class _Columns:
    """Per-layer inputs ``a`` and unscaled errors ``√N_ℓ,k·e`` of the data kept so far.

    With ``keep = k`` a reservoir of ``k`` data (Algorithm R: datum ``g`` replaces a uniformly
    chosen slot with probability ``k/(g+1)``, randomness from ``generator``) in fixed buffers.
    """

    def __init__(self, keep: int | None, generator: torch.Generator | None) -> None:
        self.keep, self.generator = keep, generator
        self.parts: list[list[Tensor]] = []  # per field: a_1..a_L, e_1..e_L, outputs[, sampled]
        self.num_layers = 0
        self.seen = 0
        self.R = 1
        self.kind: str | None = None
        self.likelihood: str | None = None

    @property
    def kept(self) -> int:
        return min(self.seen, self.keep) if self.keep is not None else self.seen

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ls in self.parts[:2 * self.num_layers]
                   for t in ls)

    def _fields(self, cap: Captured) -> list[tuple[Tensor, int]]:
        """``(tensor, rows per datum)`` of every kept field of a capture."""
        out = [(a.detach(), 1) for a in cap.a]
        nt = cap.num_terms if cap.num_terms is not None else cap.num_data
        out += [(e.detach() * math.sqrt(nt), cap.repeats) for e in cap.e]
        out.append((cap.outputs, 1))
        if cap.sampled is not None:
            out.append((cap.sampled.movedim(1, 0), 1))  # (n, S[, C])
        return out

    def add(self, cap: Captured) -> None:
        n = cap.num_data
        if not self.parts:
            self.num_layers, self.R = len(cap.a), cap.repeats
            self.kind, self.likelihood = cap.kind, cap.likelihood
            self.layout = [a.shape[1:] for a in cap.a]
        for layer, shape, a in zip(cap.layers, self.layout, cap.a):
            if shape != a.shape[1:]:
                raise ValueError(
                    f"layer {layer.describe()} has inputs of shape (T, d_in) = {tuple(shape)} in "
                    f"an earlier batch and {tuple(a.shape[1:])} now; the Woodbury columns of all "
                    "batches need one layout (pad sequences to one length), or use "
                    "structure='kfac' / 'diag', which accumulate any shapes")
        fields = self._fields(cap)
        if self.keep is None:
            if not self.parts:
                self.parts = [[] for _ in fields]
            for ls, (t, _) in zip(self.parts, fields):
                ls.append(t)
        else:
            self._reservoir(fields, n, self.keep)
        self.seen += n

    def _reservoir(self, fields: list[tuple[Tensor, int]], n: int, k: int) -> None:
        gen = self.generator
        if gen is None:  # build() checks it first
            raise ValueError("subsample=k needs subsample_generator=torch.Generator()")
        if not self.parts:
            self.parts = [[t.new_zeros((k * per, *t.shape[1:]))] for t, per in fields]
        chosen: dict[int, int] = {}
        for j in range(n):
            g = self.seen + j
            if g < k:
                chosen[g] = j
            else:
                r = int(torch.randint(0, g + 1, (1,), generator=gen, device=gen.device))
                if r < k:
                    chosen[r] = j  # a later datum of this batch overrides an earlier one
        if not chosen:
            return
        slots = torch.tensor(list(chosen), dtype=torch.long)
        rows = torch.tensor(list(chosen.values()), dtype=torch.long)
        for ls, (t, per) in zip(self.parts, fields):
            dst = (slots[:, None] * per + torch.arange(per)).reshape(-1).to(t.device)
            src = (rows[:, None] * per + torch.arange(per)).reshape(-1).to(t.device)
            ls[0][dst] = t[src]

    def tensors(self) -> list[Tensor]:
        if self.keep is None:
            return [torch.cat(ls) for ls in self.parts]
        per = [1] * self.num_layers + [self.R] * self.num_layers + [1, 1]
        return [ls[0][: self.kept * p] for ls, p in zip(self.parts, per)]

    def gather(self) -> None:
        """All ranks' kept columns, in rank order (every rank ends with the union)."""
        self.parts = [[dd.all_gather_rows(t)] for t in self.tensors()]

    def captured(self, layers, N: float) -> Captured:
        """The union capture with errors scaled by ``1/√N`` (``N`` = loss terms the mean is over)."""
        ts = self.tensors()
        L, s = self.num_layers, 1.0 / math.sqrt(N)
        sampled = ts[2 * L + 1].movedim(0, 1).contiguous() if len(ts) > 2 * L + 1 else None
        if self.kind is None or self.likelihood is None:  # build() refuses empty data first
            raise ValueError("no batch was captured")
        return Captured(list(layers), ts[:L], [e * s for e in ts[L:2 * L]], ts[2 * L], sampled,
                        self.kind, self.likelihood)


def _primal_matrices(structure: str, ctx, options: dict, weight: float) -> list[Tensor]:
    """``weight·U Uᵀ`` of the captured columns in float64: one matrix (full) or one per layer."""
    from curvkit.curvature.fisher import layer_factors

    factors = layer_factors(ctx, options.get("gram_route", "auto"))
    if structure == "full":
        return [Woodbury(StackedFactor(factors), route="primal").dense64() * weight]
    return [Woodbury(f, route="primal").dense64() * weight for f in factors]


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _column_union(ctx0, structure, builder, contexts: Iterator, data, options, subsample,
                  generator, budget_gb, distributed_columns: str = "shard"):
    """``"full"`` / ``"block_diag"`` over many batches: primal sums or kept Woodbury columns."""
    route = options.get("route", "auto")
    if route not in ("auto", "dual", "primal"):
        raise ValueError(f"route must be 'auto', 'dual' or 'primal', got {route!r}")
    sizes = [layer.size for layer in ctx0.layers]
    P = sum(sizes)
    primal_bytes = 8 * (P * P if structure == "full" else sum(s * s for s in sizes))
    big = P if structure == "full" else max(sizes)
    device = ctx0.params[0].device
    budget = (0.5 * available_memory_bytes(device) if budget_gb is None
              else float(budget_gb) * 1e9)
    if subsample is not None and route == "primal":
        raise ValueError("subsample= keeps columns (dual route); it cannot be combined with "
                         "route='primal', which accumulates all data exactly")
    cols = _Columns(subsample, generator)
    dense: list[Tensor] | None = None
    N, NT = 0, 0
    checked_total = False
    for ctx in contexts:
        n = ctx.num_data
        if dense is None and route == "primal":
            dense = _primal_matrices(structure, ctx, options, 1.0)  # runs the capture
            dense = [D.mul_(loss_terms(ctx, n)) for D in dense]
        elif dense is not None:
            new = _primal_matrices(structure, ctx, options, 1.0)
            for D, X in zip(dense, new):
                D.add_(X, alpha=loss_terms(ctx, n))
        else:
            cols.add(ctx.captured)
        N, NT = N + n, NT + loss_terms(ctx, n)
        if dense is None and subsample is None:
            M = cols.kept * cols.R
            if route == "auto" and M >= big and primal_bytes <= budget and not dd.is_distributed():
                dense = _columns_to_dense(cols, ctx0, structure, options)
                cols = _Columns(None, None)
                continue
            if not checked_total:
                checked_total = True
                total = _expected_total(data, n)
                if total is not None and total > n and (route == "dual" or total * cols.R < big
                                                        or primal_bytes > budget):
                    est = cols.nbytes() * total / n + 24 * (total * cols.R) ** 2
                    if est > budget:
                        raise _budget_error(structure, total, cols.R, est, budget, P, primal_bytes)
            need = cols.nbytes() + 24 * M * M
            if need > budget:
                raise _budget_error(structure, N, cols.R, need, budget, P, primal_bytes)
    if N == 0:
        raise _no_data()
    counts = torch.tensor([float(N), float(cols.kept * cols.R), float(NT)], dtype=torch.float64,
                          device=device)
    dd.all_reduce_sum([counts])
    N, NT = int(counts[0].item()), int(counts[2].item())
    if dense is None and dd.is_distributed() and route == "auto" and subsample is None \
            and int(counts[1].item()) >= big and primal_bytes <= budget:  # decided by all ranks
        dense = _columns_to_dense(cols, ctx0, structure, options)
    if dense is not None:
        dd.all_reduce_sum(dense)
        dtype = ctx0.params[0].dtype
        mats = [Dense((D / NT).to(dtype), name=f"Fisher[{structure}, primal]") for D in dense]
        info = {"route": "primal", "num_seen": N, "num_loss_terms": NT}
        if structure == "full":
            return mats[0], None, N, info
        return BlockDiagonal(mats, name="Fisher[block_diag]"), None, N, info
    if dd.is_distributed() and distributed_columns == "shard":
        return _sharded(ctx0, structure, cols, NT, options), None, N, \
            {"num_seen": N, "distributed_columns": "shard", "num_loss_terms": NT}
    if dd.is_distributed():
        cols.gather()
    kept = cols.kept if subsample is not None else N
    cap = cols.captured(ctx0.layers, kept * NT / N)  # the kept data's share of the loss terms
    if subsample is None:
        cap.num_terms = NT
    ctx = dataclasses.replace(ctx0, inputs=None, targets=None)
    ctx.__dict__["captured"] = cap
    op = builder(ctx, **options)
    info = {"num_seen": N, "num_loss_terms": NT}
    if subsample is not None:
        info["subsample"] = kept
    return op, cap, kept, info


def _sharded(ctx0, structure: str, cols: _Columns, N: int, options: dict) -> LinearOperator:
    """Woodbury with this rank's columns only (:class:`~curvkit.curvature.distributed.ShardedFactor`).

    ``N`` is the number of loss terms of the union (the errors' ``1/√N``).
    """
    from curvkit.curvature.fisher import layer_factors

    if cols.kept == 0:
        raise ValueError("this rank's shard yielded no batch; give every rank at least one")
    ctx = dataclasses.replace(ctx0, inputs=None, targets=None)
    ctx.__dict__["captured"] = cols.captured(ctx0.layers, N)  # local columns at the union's 1/√N
    # the softmax rank reduction is per input, so each rank reduces its own columns
    factors = layer_factors(ctx, options.get("gram_route", "auto"), options.get("reduce_rank", False))
    if structure == "full":
        return Woodbury(dd.ShardedFactor(StackedFactor(factors)), route="dual", name="Fisher[full]")
    return BlockDiagonal([Woodbury(dd.ShardedFactor(f), route="dual",
                                   name=f"Fisher[block {layer.name}]")
                          for f, layer in zip(factors, ctx0.layers)], name="Fisher[block_diag]")


def _columns_to_dense(cols: _Columns, ctx0, structure: str, options: dict) -> list[Tensor]:
    """Switch to the primal route: ``Σ_k N_ℓ,k U_k U_kᵀ`` from the columns kept so far."""
    ctx = dataclasses.replace(ctx0, inputs=None, targets=None)
    ctx.__dict__["captured"] = cols.captured(ctx0.layers, 1)  # unscaled: Σ_k N_ℓ,k U_k U_kᵀ
    return _primal_matrices(structure, ctx, options, 1.0)


def _budget_error(structure: str, N: int, R: int, need: float, budget: float, P: int,
                  primal_bytes: int) -> MemoryError:
    M = N * R
    return MemoryError(
        f"curvkit.fisher(structure={structure!r}) over an iterable of batches keeps the Woodbury "
        f"columns of every datum: {N} data ({M} columns, inputs/errors and the {M}×{M} Gram) "
        f"need about {_gb(need)}, over the budget of {_gb(budget)} (column_budget_gb). Pass "
        "subsample=k with subsample_generator=torch.Generator().manual_seed(0) to keep k data "
        f"drawn at random, route='primal' to accumulate the P×P matrix instead (P = {P}: "
        f"{_gb(primal_bytes)}), a larger column_budget_gb, or structure='kfac' / 'diag'"
    )
