"""Rules for convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``.

**Convolution** (any stride, dilation, integer / ``'same'`` / ``'valid'`` padding, padding mode
``zeros`` / ``reflect`` / ``replicate`` / ``circular``): the input is padded as the module pads it
(``F.pad`` with the module's mode; zeros for ``'same'``, left ``⌊d(k−1)/2⌋``), then unfolded into
patches ``a_{nt} ∈ R^{C_in/G · Πk}`` (channel-major, matching ``weight.reshape(C_out, -1)``), one
per output location ``t``; ``e_{nt}`` is the output gradient there. With ``groups = G > 1`` the
layer is ``G`` blocks, one per group ``g``: rows ``g·C_out/G …`` of the weight against the
patches of input channels ``g·C_in/G …`` (block-diagonal, exact). A 2-D convolution with integer
zero padding and one group unfolds as ``F.unfold`` would (:func:`unfold_2d`, the same entries).

**Transposed convolution** ``y = conv_transpose(x, W)`` with ``W`` of shape
``(C_in, C_out/G, *k)``: its weight gradient is ``∂/∂W[i, o, κ] = Σ_t x_{i,t} ê_{(o,κ),t}`` with
``ê = unfold(∂/∂y)`` over the *input* locations ``t`` (the convolution's adjoint). So the block is
the ``(C_out/G·Πk) × C_in/G`` matrix ``Wᵀ`` (per group), ``a_{nt} = x_{nt}`` and
``e_{mt} = ê_{mt}`` -- a Kronecker form read through a transposed :meth:`layer_index`. The bias
(one per output channel, summed over output locations) is its own block with ``a = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from typing_extensions import override

from curvkit.capture.rules.base import LayerAdapter, UnsupportedLayerError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _pad_pairs(m: _ConvNd) -> list[tuple[int, int]]:
    """Per spatial dim ``(left, right)`` zero/mode padding (zeros for 'valid')."""
    nd = len(m.kernel_size)
    if m.padding == "valid":
        return [(0, 0)] * nd
    if isinstance(m.padding, str):  # "same", the only other string torch accepts
        out = []
        for d, k in zip(m.dilation, m.kernel_size):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in m.padding]


def unfold_2d(x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
              stride: tuple[int, ...]) -> Tensor:
    """``F.unfold`` of an (already padded) ``(N, C, H, W)`` input, the same ``(N, C·kh·kw, L)``.

    Equal entry for entry, built from strided window views and one copy, which on CPU runs
    1.6–4× faster than the ``im2col`` kernel (measured on ResNet-8 layers, N = 100).
    """
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    N, C = x.shape[:2]
    v = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # N C Ho Wo kh' kw'
    if dh > 1 or dw > 1:
        v = v[..., ::dh, ::dw]
    L = v.shape[2] * v.shape[3]
    return v.permute(0, 1, 4, 5, 2, 3).reshape(N, C * kh * kw, L)


def unfold_nd(x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
              stride: tuple[int, ...]) -> Tensor:
    """Patches of an (already padded) input ``(N, C, *S)`` -> ``(N, T, C·Πk)``, channel-major."""
    nd = len(kernel)
    if nd <= 2:
        x2 = x.unsqueeze(2) if nd == 1 else x
        k2 = (1, *kernel) if nd == 1 else kernel
        d2 = (1, *dilation) if nd == 1 else dilation
        s2 = (1, *stride) if nd == 1 else stride
        return unfold_2d(x2, k2, d2, s2).transpose(1, 2)
    N, C = x.shape[:2]
    for i, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends a window dim
        if d > 1:
            x = x[..., ::d]
    # (N, C, L1..Lnd, k1..knd) -> (N, L, C, k) -> (N, T, C·Πk)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    T = math.prod(x.shape[1 : 1 + nd])
    return x.reshape(N, T, C * math.prod(kernel))


@dataclass(eq=False)
class ConvAdapter(LayerAdapter):
    """Block ``group`` of a convolution (see the module docstring)."""

    group: int = 0

    family: ClassVar[str] = "conv"

    @property
    def conv(self) -> _ConvNd:
        """The module, typed as a convolution (the rule is registered for convolutions only)."""
        return cast(_ConvNd, self.module)

    @override
    @classmethod
    def from_module(cls, name, module, selected):
        ads = [cls(name, module, "weight" in selected, "bias" in selected, group=g)
               for g in range(module.groups)]
        for ad in ads:
            ad.check()
        return ads

    @override
    @property
    def standard(self) -> bool:  # type: ignore[override]
        return self.conv.groups == 1

    @property
    def nd(self) -> int:
        """Number of spatial dimensions of the convolution."""
        return len(self.conv.kernel_size)

    @override
    @property
    def d_out(self) -> int:
        return int(self.conv.weight.shape[0]) // self.conv.groups

    @override
    @property
    def row0(self) -> int:
        return self.group * self.d_out

    @override
    def describe(self) -> str:
        base = super().describe()
        return base if self.conv.groups == 1 else f"{base} group {self.group}"

    def _fast(self, m: _ConvNd) -> bool:
        return (self.nd == 2 and m.groups == 1 and m.padding_mode == "zeros"
                and not isinstance(m.padding, str))

    @override
    def inputs(self, x: Tensor, module: nn.Module | None = None,
               batch_size: int | None = None) -> Tensor:
        m = self.conv if module is None else cast(_ConvNd, module)  # a tied module: own geometry
        x = x.detach()
        if x.dim() == self.nd + 1:  # unbatched input
            x = x.unsqueeze(0)
        x = self.batch_first(x, batch_size, "input")
        if self._fast(m):
            ph, pw = cast("tuple[int, ...]", m.padding)  # _fast: integer zero padding
            if ph or pw:
                x = F.pad(x, (pw, pw, ph, ph))
            a = unfold_2d(x, m.kernel_size, m.dilation, m.stride).transpose(1, 2)
            return self.with_bias_column(a)
        cin = x.shape[1] // m.groups
        x = x[:, self.group * cin : (self.group + 1) * cin]
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        else:
            pads = [p for pair in reversed(_pad_pairs(m)) for p in pair]
            if any(pads):
                x = F.pad(x, pads)
        return self.with_bias_column(unfold_nd(x, m.kernel_size, m.dilation, m.stride))

    @override
    def errors(self, grad_out: Tensor, batch_size: int | None = None) -> Tensor:
        if grad_out.dim() == self.nd + 1:
            grad_out = grad_out.unsqueeze(0)
        grad_out = self.batch_first(grad_out, batch_size, "output gradient")
        g = grad_out[:, self.row0 : self.row0 + self.d_out]
        N, C = g.shape[:2]
        return g.reshape(N, C, -1).transpose(1, 2)


def _check_transposed(ad: LayerAdapter) -> None:
    m = cast(_ConvTransposeNd, ad.module)
    if m.padding_mode != "zeros":  # torch itself only allows zeros
        raise UnsupportedLayerError(f"Layer {ad.describe()} uses padding_mode={m.padding_mode!r}")


@dataclass(eq=False)
class ConvTransposeAdapter(LayerAdapter):
    """Weight block ``group`` of a transposed convolution: ``Wᵀ`` per group (module doc)."""

    group: int = 0

    standard: ClassVar[bool] = False
    family: ClassVar[str] = "conv_transpose"
    handles: ClassVar[tuple[str, ...]] = ("weight", "bias")

    @property
    def conv(self) -> _ConvTransposeNd:
        """The module, typed as a transposed convolution."""
        return cast(_ConvTransposeNd, self.module)

    @override
    @classmethod
    def from_module(cls, name, module, selected):
        ads: list[LayerAdapter] = []
        if "weight" in selected:
            ads += [cls(name, module, True, False, group=g) for g in range(module.groups)]
        if "bias" in selected:
            ads.append(ConvTransposeBias(name, module, False, True))
        for ad in ads:
            _check_transposed(ad)
        return ads

    @property
    def nd(self) -> int:
        """Number of spatial dimensions of the convolution."""
        return len(self.conv.kernel_size)

    @property
    def cin(self) -> int:
        """Input channels per group, ``C_in/G`` (the columns of ``Wᵀ``)."""
        return int(self.conv.weight.shape[0]) // self.conv.groups

    @property
    def cout(self) -> int:
        """Output channels per group, ``C_out/G``."""
        return int(self.conv.weight.shape[1])

    @override
    @property
    def d_out(self) -> int:
        return self.cout * math.prod(self.conv.kernel_size)

    @override
    @property
    def d_w(self) -> int:
        return self.cin

    @override
    def describe(self) -> str:
        base = super().describe()
        return base if self.conv.groups == 1 else f"{base} group {self.group}"

    @override
    def inputs(self, x: Tensor, module: nn.Module | None = None,
               batch_size: int | None = None) -> Tensor:
        x = x.detach()
        if x.dim() == self.nd + 1:
            x = x.unsqueeze(0)
        x = x[:, self.group * self.cin : (self.group + 1) * self.cin]
        N, C = x.shape[:2]
        return x.reshape(N, C, -1).transpose(1, 2)

    @override
    def errors(self, grad_out: Tensor, batch_size: int | None = None) -> Tensor:
        m = self.conv
        if grad_out.dim() == self.nd + 1:
            grad_out = grad_out.unsqueeze(0)
        g = grad_out[:, self.group * self.cout : (self.group + 1) * self.cout]
        pads = [p for p in cast("tuple[int, ...]", m.padding) for _ in range(2)]  # ints only
        if any(pads):  # un-pad by padding with zeros: the patches read outside the output
            g = F.pad(g, pads)
        return unfold_nd(g, m.kernel_size, m.dilation, m.stride)

    @override
    def layer_index(self, offsets: dict[int, int]) -> Tensor:
        # entry (row (o, κ), column i) is W[g·cin + i, o, κ]
        w0 = offsets[id(self.module.weight)] + self.group * self.cin * self.d_out
        rows = torch.arange(self.d_out)[:, None]
        cols = torch.arange(self.cin)[None, :] * self.d_out
        return (w0 + rows + cols).reshape(-1)

    @override
    def span(self, offsets: dict[int, int]) -> tuple[int, int] | None:
        if self.cin == 1 or self.d_out == 1:
            w0 = offsets[id(self.module.weight)] + self.group * self.cin * self.d_out
            return w0, w0 + self.size
        return None


@dataclass(eq=False)
class ConvTransposeBias(LayerAdapter):
    """The bias of a transposed convolution: ``a = 1`` at every output location."""

    standard: ClassVar[bool] = False
    family: ClassVar[str] = "conv_transpose"

    @property
    def conv(self) -> _ConvTransposeNd:
        """The module, typed as a transposed convolution."""
        return cast(_ConvTransposeNd, self.module)

    @override
    @property
    def d_out(self) -> int:
        return int(cast(Tensor, self.conv.bias).shape[0])

    def inputs(self, x: Tensor, module: nn.Module | None = None,
               batch_size: int | None = None) -> Tensor:
        """``a = 1`` at each output location (sizes from the module's output formula)."""
        m = self.conv
        nd = len(m.kernel_size)
        if x.dim() == nd + 1:
            x = x.unsqueeze(0)
        T = 1
        for L, k, s, p, d, op in zip(x.shape[2:], m.kernel_size, m.stride, m.padding, m.dilation,
                                     m.output_padding):
            T *= (L - 1) * s - 2 * p + d * (k - 1) + op + 1
        return torch.ones(x.shape[0], T, 1, dtype=x.dtype, device=x.device)

    @override
    def errors(self, grad_out: Tensor, batch_size: int | None = None) -> Tensor:
        if grad_out.dim() == len(self.conv.kernel_size) + 1:
            grad_out = grad_out.unsqueeze(0)
        N, C = grad_out.shape[:2]
        e = grad_out.reshape(N, C, -1).transpose(1, 2)
        return e

    @override
    def combine(self, a: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        if a.shape[1] != e.shape[1]:
            raise UnsupportedLayerError(
                f"Layer {self.describe()} was called with output_size=...: its output has "
                f"{e.shape[1]} locations, not the {a.shape[1]} of its output_padding; freeze its "
                "bias or pass output_padding instead")
        return a, e
