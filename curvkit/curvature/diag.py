"""Diagonal structure ``"diag"``: ``diag(F)`` of the Fisher of the chosen kind.

With ``F = G Gᵀ`` and column ``m`` of ``G`` restricted to layer ``l`` equal to
``vec_r(Σ_t ẽ_{mt} a_{nt}ᵀ)`` (see :mod:`curvkit.linalg.outer` for the index letters)::

    diag(F)_{(o, d)} = Σ_m ( Σ_t ẽ_{mt,o} a_{nt,d} )²          (layer l, row-major (o, d))

which for ``T = 1`` is ``Σ_n (Σ_r ẽ_{nr,o}²) a_{n,d}²``. This is exact -- the diagonal of the
full (and of the block-diagonal) Fisher of the kind -- not an approximation of it:

* ``"exact"``: ``(1/N) Σ_n diag(J_nᵀ Λ_n J_n)``;
* ``"mc"``: ``(1/(N·S)) Σ_n Σ_s g(ŷ_{ns})²`` for the labels drawn from ``generator``;
* ``"empirical"``: ``(1/N) Σ_n g(y_n)²``.

Two backends compute it:

* ``backend="capture"`` (default): curvkit's own capture (one forward, the kind's backward
  seeds), ``OuterProductFactor.sq_row_norms`` per layer.
* ``backend="backpack"``: BackPACK (``DiagGGNExact`` for ``"exact"``, ``DiagGGNMC`` for
  ``"mc"``, squared ``BatchGrad`` for ``"empirical"``) on a deep copy of the model, so the
  user's model is neither extended nor given result attributes. BackPACK's loss modules are
  used with ``reduction="sum"`` and rescaled to curvkit's mean Fisher:

  ==================  ===============================  ===========================================
  likelihood          BackPACK loss (sum)               factor to curvkit's Fisher
  ==================  ===============================  ===========================================
  classification      ``CrossEntropyLoss``              ``1/N``
  regression          ``MSELoss``: ``Σ‖f−y‖²``          ``1/(2N)`` (GGN/Fisher), ``1/(4N)`` (BatchGrad²)
  binary              ``BCEWithLogitsLoss``             ``1/N``
  ==================  ===============================  ===========================================

  (With ``reduction="mean"`` BackPACK divides by ``N`` for cross-entropy but by ``N·C`` for
  ``MSELoss`` and ``BCEWithLogitsLoss``; curvkit's regression Fisher is that of
  ``½‖f−y‖²``, i.e. unit variance, so PyTorch's mean ``MSELoss`` Fisher is ``(2/C)·F``.)
  BackPACK's MC labels come from the global RNG, not from curvkit's sampling: with
  ``generator`` given, the global RNG is forked and seeded from it (the caller's global RNG
  state is restored), so results are reproducible but the draws differ from the capture
  backend's -- the two agree only in expectation. BackPACK needs every module between the
  input and the output to be one it supports (``nn.Sequential`` of standard layers).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from curvkit.capture import forward
from curvkit.curvature.build import BuildContext, register_structure
from curvkit.curvature.layout import BlockLayout
from curvkit.linalg import Diagonal

__all__ = ["BACKENDS", "capture_diagonal", "backpack_diagonal"]

#: Backends of ``structure="diag"``.
BACKENDS = ("capture", "backpack")


def capture_diagonal(ctx: BuildContext) -> Tensor:
    """``diag(F)`` in layer space from curvkit's capture (exact ``diag(G Gᵀ)``)."""
    cap = ctx.captured
    return torch.cat([layer.factor(a, e).sq_row_norms()
                      for layer, a, e in zip(ctx.layers, cap.a, cap.e)])


_LOSSES = {
    "classification": nn.CrossEntropyLoss,
    "regression": nn.MSELoss,
    "binary": nn.BCEWithLogitsLoss,
}


def backpack_diagonal(ctx: BuildContext) -> Tensor:
    """``diag(F)`` in layer space from BackPACK (see the module docstring for the scaling).

    Raises:
        ImportError: BackPACK is not installed.
        RuntimeError: BackPACK cannot handle the model (the message says to use
            ``backend='capture'``).
    """
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad, DiagGGNExact, DiagGGNMC
    except ImportError as err:  # pragma: no cover - backpack is a dependency
        raise ImportError("backend='backpack' needs BackPACK: pip install backpack-for-pytorch; "
                          "or use backend='capture'") from err

    N = ctx.num_data
    names = {id(p): n for n, p in ctx.model.named_parameters()}
    selected = {names[id(p)] for p in ctx.params}
    model = copy.deepcopy(ctx.model)
    copies = dict(model.named_parameters())
    for name, p in copies.items():
        p.requires_grad_(name in selected)

    if ctx.kind == "exact":
        ext, field = DiagGGNExact(), "diag_ggn_exact"
    elif ctx.kind == "mc":
        ext, field = DiagGGNMC(mc_samples=ctx.mc_samples), "diag_ggn_mc"
    else:
        ext, field = BatchGrad(), "grad_batch"
    regression = ctx.likelihood == "regression"
    if ctx.kind == "empirical":
        scale = 1.0 / (4 * N) if regression else 1.0 / N
    else:
        scale = 1.0 / (2 * N) if regression else 1.0 / N

    if ctx.kind == "empirical" and ctx.targets is None:
        raise ValueError("kind='empirical' needs the data targets: pass targets=...")
    seed = None
    if ctx.generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator,
                                 device=ctx.generator.device))
    device = ctx.params[0].device
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            if seed is not None:
                torch.manual_seed(seed)
            model = extend(model)
            loss_fn = extend(_LOSSES[ctx.likelihood](reduction="sum"))
            outputs = forward(model, ctx.inputs, ctx.output_fn)
            if outputs.dim() > 2:
                raise _PerPositionOutputs(tuple(outputs.shape))
            targets = _backpack_targets(ctx, outputs)
            loss = loss_fn(outputs, targets)
            with backpack(ext), warnings.catch_warnings():
                # BackPACK's module hooks fire on outputs when the input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
    except _PerPositionOutputs as err:
        raise ValueError(
            f"backend='backpack' supports (N, C) outputs only; the model's outputs have shape "
            f"{err.shape}, whose positions are loss terms of their own (the Fisher is a mean per loss "
            "term, which BackPACK's per-input diagonal does not give). Use backend='capture' (the "
            "default) for per-position outputs."
        ) from None
    except Exception as err:  # BackPACK raises various types for unsupported graphs
        raise RuntimeError(
            f"BackPACK could not compute the diagonal ({type(err).__name__}: {err}); it needs a "
            "model made of modules it supports (e.g. nn.Sequential of Linear/Conv2d/activations). "
            "Use structure='diag' with backend='capture' instead."
        ) from err

    parts = []
    for layer in ctx.layers:
        qs = []  # per selected parameter, its diagonal shaped like it
        for pname, used in (("weight", layer.weight), ("bias", layer.bias)):
            if not used:
                continue
            p = copies[f"{layer.name}.{pname}" if layer.name else pname]
            q = getattr(p, field)
            qs.append((q**2).sum(0) if ctx.kind == "empirical" else q)
        parts.append(BlockLayout.of(layer).block(qs).reshape(-1))  # the layer's [W | b] block
    return (torch.cat(parts) * scale).detach()


class _PerPositionOutputs(Exception):
    """Raised inside the BackPACK pass for outputs ``(N, …, C)`` with extra dimensions."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape)
        self.shape = shape


def _backpack_targets(ctx: BuildContext, outputs: Tensor) -> Tensor:
    """Data targets (empirical), else placeholders (BackPACK's exact/MC ignore them)."""
    if ctx.kind == "empirical":
        t = ctx.targets
        if t is None:
            raise ValueError("kind='empirical' needs the data targets: pass targets=...")
        return t if ctx.likelihood == "classification" else t.to(outputs.dtype)
    if ctx.likelihood == "classification":
        return torch.zeros(outputs.shape[0], dtype=torch.long, device=outputs.device)
    return torch.zeros_like(outputs.detach())


@register_structure("diag")
def build_diag(ctx: BuildContext, backend: str = "capture", **options) -> Diagonal:
    """Diagonal Fisher ``diag(F)`` of the chosen kind (``backend``: ``"capture"``/``"backpack"``)."""
    if options:
        raise TypeError(f"structure='diag' got unknown options {sorted(options)}; allowed: ['backend']")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for structure='diag'; valid: {list(BACKENDS)}")
    d = capture_diagonal(ctx) if backend == "capture" else backpack_diagonal(ctx)
    return Diagonal(d, name=f"Fisher[diag, {backend}]")
