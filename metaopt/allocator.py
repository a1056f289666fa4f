"""How the process returns freed memory to the system (glibc only).

By default glibc serves every allocation above 32 MB with its own `mmap` and unmaps it
when freed, so a conv net whose activations are tens of MB page-faults its whole working
set again at every step: a 60-way ProtoNet meta-step on Omniglot (conv4, 360 images, one
thread) spent 40% of its time in the kernel (0.88 s per step; 0.44 s with
`keep_freed_memory`). Keeping freed memory in the heap for reuse removes those faults.

The cost: the heap can fragment, so the process's measured peak is higher (983 MB vs
708 MB on that step) and the memory budget's probes, measured in the same process,
predict accordingly. It is therefore a per-run choice (`allocator: keep` in a config),
not the library's default.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Literal

__all__ = ["keep_freed_memory", "set_allocator", "ALLOCATORS"]

ALLOCATORS = ("system", "keep")
"""The values of a config's `allocator` (`set_allocator`)."""

log = logging.getLogger("metaopt")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory(top_pad_bytes: int = 256 * 2**20) -> bool:
    """Serve every allocation from the heap and never give freed heap memory back (glibc `mallopt`).

    Returns:
      True when glibc accepted the settings; False (logged) where there is no glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.warning("allocator=keep: no glibc mallopt on this system; the system allocator is unchanged")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(option, value) == 1 for option, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, top_pad_bytes)))
    if not ok:
        log.warning("allocator=keep: glibc refused a mallopt setting; the allocator may be partly unchanged")
    return ok


def set_allocator(mode: Literal["system", "keep"]) -> bool:
    """Apply a config's `allocator` choice: "system" (the default: nothing changes) or "keep"
    (`keep_freed_memory`). Returns whether the allocator was changed.

    Raises:
      ValueError: another mode, naming the choices.
    """
    if mode not in ALLOCATORS:
        raise ValueError(f"allocator={mode!r}: use system (the default) or keep (freed memory stays in the process)")
    return mode == "keep" and keep_freed_memory()
