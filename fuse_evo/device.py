"""Checking a requested torch device before anything loads.

``torch.device("cuda")`` is accepted on a machine without CUDA; the failure comes later, deep
in a ``.to()`` after minutes of loading. Every command that takes a device (``--device``,
``run.device``) checks it here first, naming the option.
"""

from __future__ import annotations

import torch

from .errors import FuseEvoError


def check_device(device: str | None, option: str, fix: str | None = None) -> str | None:
    """``device`` unchanged if this machine has it (None: the command's default), else a
    FuseEvoError naming ``option`` (``--device``, ``run.device``) and ``fix`` (what to do)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FuseEvoError(f"{option}={device}: not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise FuseEvoError(f"{option}={device}: this machine has no usable CUDA device (torch {torch.__version__}, "
                               f"{build}); {fix or f'use {option}=cpu or leave it out'}")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise FuseEvoError(f"{option}={device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise FuseEvoError(f"{option}={device}: MPS is not available on this machine; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise FuseEvoError(f"{option}={device}: fuse_evo runs on cpu, cuda or mps, not {parsed.type}")
    return device


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD = 1 << 20


def return_freed_tensors_to_the_os() -> bool:
    """Make every allocation of 1 MiB or more its own memory mapping, unmapped when freed.

    glibc raises its mmap threshold after each large free (up to 32 MiB), so tensor-sized
    transients (a histogram pass over a 16 MB attention matrix, a scoring batch's logits) then
    come from the heap and stay there: a 1.1B TIES search peaked at 13.5 GB RSS with it, 12.3
    GB without (sources, base and live model: 11 GB), every worker of a node paying it; a
    malloc_trim after each merge and scoring pass did not help. The price: a page fault per
    fresh tensor, measured up to ~35% on DARE's per-candidate merge at 134M on 2 cores. True
    when set (Linux with glibc); elsewhere nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
