"""Memory checks: refuse an allocation that would not fit, with a GB estimate.

:func:`check_memory` is called before every large allocation in curvkit (dense matrices, Gram
and Woodbury cores, explicit columns); :func:`available_memory_bytes` tells how much is free.
:func:`scratch` hands out small reusable work buffers for chunked loops.
"""

from __future__ import annotations

import math
import os
import threading

import torch

__all__ = ["available_memory_bytes", "check_memory", "scratch"]

#: Largest work buffer :func:`scratch` keeps between calls (entries; 16 MB in float64).
SCRATCH_MAX = 2**21
_SCRATCH = threading.local()


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str, limit: int = SCRATCH_MAX) -> torch.Tensor:
    """An uninitialised work buffer of ``shape``, reused across calls on this thread (CPU).

    A fresh CPU allocation of a few MB is returned to the operating system when it is freed, and
    the next one pays a page fault per 4 KB page on first touch (≈ 0.7 ms per MB measured on a
    2-core VM, as long as the GEMM that fills it). Chunked loops that allocate the same buffer for
    every layer and right-hand side therefore take one buffer per ``slot`` from here. Each call
    with the same ``slot`` returns the same memory, so a caller must be done with the previous
    buffer of that slot; buffers above ``limit`` entries (default :data:`SCRATCH_MAX`) and non-CPU
    devices get a plain ``torch.empty`` (the CUDA caching allocator already reuses memory).

    Args:
        slot: a name unique to the caller's use (two live buffers need two slots).
        shape: the buffer's shape.
        dtype: its dtype.
        device: its device.
        limit: the largest buffer (entries) kept for reuse; a caller that keeps a ``P``-sized
            buffer passes ``P`` and states the retained memory.

    Returns:
        A contiguous tensor of ``shape`` with arbitrary contents.
    """
    device = torch.device(device)
    n = math.prod(shape)
    if device.type != "cpu" or n > limit:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (slot, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        buf = bufs[key] = torch.empty(max(n, 2**16), dtype=dtype, device=device)
    return buf[:n].view(shape)


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device`` in bytes.

    CUDA: ``torch.cuda.mem_get_info``. CPU: ``psutil.virtual_memory().available`` when psutil is
    installed (it is in every extra), else the free physical pages from
    ``os.sysconf`` (which leave out reclaimable caches, so memory checks err on the safe side).

    Raises:
        RuntimeError: If neither psutil nor ``os.sysconf`` can tell (``pip install psutil``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError) as err:
        raise RuntimeError("cannot determine the available memory on this system; "
                           "pip install psutil") from err


def _gb(nbytes: float) -> str:
    gb = nbytes / 1e9
    return f"{gb:.2f}" if gb >= 0.01 else f"{gb:.2g}"


def check_memory(nbytes: int, what: str, device: torch.device | str = "cpu") -> None:
    """Raise ``MemoryError`` (saying how many GB) if ``nbytes`` would not fit on ``device``."""
    free = available_memory_bytes(device)
    if nbytes > 0.9 * free:
        raise MemoryError(
            f"{what} needs {_gb(nbytes)} GB but only {_gb(free)} GB is available on "
            f"{torch.device(device)}; use a smaller batch, fewer MC samples or a structured "
            "approximation (structure='kfac', 'foof' or 'diag')"
        )
