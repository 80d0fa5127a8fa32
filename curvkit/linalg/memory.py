"""Memory checks: refuse an allocation that would not fit, with a GB estimate.

:func:`check_memory` is called before every large allocation in curvkit (dense matrices, Gram
and Woodbury cores, explicit columns); :func:`available_memory_bytes` tells how much is free.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_memory_bytes", "check_memory"]


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
