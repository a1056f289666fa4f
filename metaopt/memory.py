"""Measuring peak memory of a block of code, in bytes above the level at its start.

CUDA: the caching allocator's own counters (`torch.cuda.reset_peak_memory_stats`,
`max_memory_allocated` minus `memory_allocated` at entry): bytes of live tensors,
not the allocator's reserved pool.

CPU: PyTorch keeps no peak counter for the CPU allocator, so the block runs under
`torch.profiler` with `profile_memory=True`, which records every tensor
allocation and free with its size; the peak is the largest running sum of those
events. Like the CUDA figure it counts tensor storage only (not Python objects,
not the allocator's cached free memory). Profiling slows the block down: measure
separately from timing. `experiments/compare_estimators.py` checks the CPU figure
against a fresh process's peak resident set size.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

__all__ = ["PeakMemory", "measure_peak_memory", "peak_rss_bytes", "reset_peak_rss"]


class PeakMemory:
    """Filled in when the `measure_peak_memory` block exits.

    Attributes:
      peak_bytes: the peak of live tensor bytes allocated inside the block, above the level at entry.
      method: "cuda.max_memory_allocated" or "profiler.memory_events".
    """

    peak_bytes: int = 0
    method: str = ""


@contextlib.contextmanager
def measure_peak_memory(device: torch.device | str = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak tensor memory of the enclosed block (see the module docstring).

    Example:
      with measure_peak_memory() as mem:
          estimator(loop, meta, tasks)
      print(mem.peak_bytes)
    """
    result = PeakMemory()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = int(torch.cuda.max_memory_allocated(device) - base)
        result.method = "cuda.max_memory_allocated"
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        yield result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    result.peak_bytes = int(peak)
    result.method = "profiler.memory_events"


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
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1
