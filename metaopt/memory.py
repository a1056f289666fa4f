"""Measuring the peak memory of a block of code, in bytes above the level at its start.

Three methods, chosen by `measure_peak_memory(device, method="auto")`:

- "cuda" (CUDA devices): the caching allocator's counters, `max_memory_allocated`
  after `reset_peak_memory_stats`, minus `memory_allocated` at entry. Live tensor
  bytes on the device (not the allocator's reserved pool); autograd's bookkeeping
  lives in host memory and is not counted, as it does not use device memory.
- "rss" (CPU on Linux, the default there): the process's peak resident set size
  (VmHWM) above its resident size at entry. Before the block, freed heap memory is
  returned to the OS (`malloc_trim(0)`) and the peak is reset (/proc/self/clear_refs),
  so reuse of cached memory does not hide growth. Counts everything the block
  allocates: tensors and also autograd graph nodes and functorch wrappers, which
  for small models are most of the cost (measured: 8.5x the tensor bytes for full
  backprop on the 1-40-40-1 MLP). Process-wide: other threads' allocations count.
  Granularity one page (4 KiB). `experiments/bench_memory.py` checks it against a
  fresh process's peak RSS.
- "profiler" (CPU fallback): every tensor allocation and free recorded by
  `torch.profiler(profile_memory=True)`; the peak of their running sum. Tensor
  storage only; slow (profiling overhead).
- "none": measures nothing (peak 0), for code that measures only some iterations.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Iterator, Literal

import torch

__all__ = ["PeakMemory", "measure_peak_memory", "current_bytes", "peak_rss_bytes", "reset_peak_rss",
           "rss_bytes", "default_method", "reset_peak", "peak_bytes", "tensor_bytes", "available_bytes"]

Method = Literal["auto", "cuda", "rss", "profiler", "none"]


class PeakMemory:
    """Filled in when the `measure_peak_memory` block exits.

    Attributes:
      peak_bytes: the peak inside the block above the level at entry, in bytes.
      method: the method used ("cuda", "rss" or "profiler").
    """

    peak_bytes: int = 0
    method: str = ""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def rss_bytes() -> int:
    """This process's current resident set size in bytes (-1 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return -1


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM) in bytes, or -1 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _trim_heap() -> None:
    # No gc.collect() here: a full collection over torch's ~3e5 objects costs ~0.1 s, and
    # the peak above the current level does not need it.
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def default_method(device: torch.device | str = "cpu") -> Method:
    """"cuda" on CUDA devices, "rss" on CPU where /proc allows it, else "profiler"."""
    if torch.device(device).type == "cuda":
        return "cuda"
    return "rss" if rss_bytes() > 0 and reset_peak_rss() else "profiler"


def current_bytes(device: torch.device | str = "cpu") -> int:
    """A cheap reading of memory in use now (for step-boundary guards): CUDA allocated bytes, or RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


def reset_peak(device: torch.device | str = "cpu") -> None:
    """Start a new peak reading (for `peak_bytes`): the CUDA allocator's peak, or the process's VmHWM.

    Process-wide, like `measure_peak_memory`: an enclosing measurement that reset earlier keeps
    everything allocated since (live memory stays in the new peak); only a transient peak
    between the two resets is forgotten.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_bytes(device: torch.device | str = "cpu") -> int:
    """The peak since the last `reset_peak`: CUDA max allocated bytes, or peak RSS (current RSS where
    /proc has no VmHWM). Cheap enough for step-boundary guards (one small /proc read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = peak_rss_bytes()
    return peak if peak > 0 else rss_bytes()


def _meminfo_available() -> int | None:
    """/proc/meminfo's MemAvailable in bytes (Linux), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes the process's cgroup still allows (cgroup v2 memory.max - memory.current, or v1's limit - usage),
    or None without a limit or where unreadable."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                text = limit.read().strip()
                if text == "max" or int(text) >= 1 << 60:  # v1 writes "no limit" as a huge number
                    return None
                return max(int(text) - int(usage.read().strip()), 0)
        except (OSError, ValueError):
            continue
    return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes this process can still allocate on `device` now, or None where unknown.

    CUDA: the device's free memory plus what torch's caching allocator holds unused. CPU: the kernel's
    MemAvailable (Linux), less where the cgroup's limit leaves less. An estimate at one moment: other
    processes (parallel runs on one machine) may take some of it later. For plans without a memory budget:
    what a run must still fit in, or be killed (an out-of-memory kill leaves no record).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    found = [b for b in (_meminfo_available(), _cgroup_room()) if b is not None]
    return min(found) if found else None


def tensor_bytes(tree: object) -> int:
    """Bytes of the tensor storage in a (nested) dict/list/tuple of tensors (0 for anything else)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


@contextlib.contextmanager
def measure_peak_memory(device: torch.device | str = "cpu", method: Method = "auto") -> Iterator[PeakMemory]:
    """Measure the peak memory of the enclosed block (see the module docstring for the methods).

    Example:
      with measure_peak_memory() as mem:
          estimator(loop, meta, tasks)
      print(mem.peak_bytes, mem.method)
    """
    result = PeakMemory()
    device = torch.device(device)
    method = default_method(device) if method == "auto" else method
    result.method = method
    if method == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = int(torch.cuda.max_memory_allocated(device) - base)
    elif method == "rss":
        _trim_heap()
        reset_peak_rss()
        base = rss_bytes()
        yield result
        result.peak_bytes = max(0, peak_rss_bytes() - base)
    elif method == "none":  # measure nothing (peak_bytes stays 0): the same block, unmeasured
        yield result
    elif method == "profiler":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield result
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        result.peak_bytes = int(peak)
    else:
        raise ValueError(f"unknown memory method {method!r}; use auto, cuda, rss or profiler")
