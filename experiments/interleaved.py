"""Interleaved timing for the benchmarks: every call once per round, in a freshly shuffled seeded order, so that
drift on a shared machine hits all calls alike and no call always runs right after another."""
from __future__ import annotations

import random
import time
from typing import Callable, Hashable, Literal, Mapping, TypeVar

import torch

from metaopt.allocator import set_allocator

K = TypeVar("K", bound=Hashable)


def interleaved_seconds(calls: Mapping[K, Callable[[], object]], repeats: int, seed: int = 0) -> dict[K, list[float]]:
    """Wall-clock seconds of each call in each of `repeats` rounds (perf_counter; the caller takes medians)."""
    times: dict[K, list[float]] = {key: [] for key in calls}
    order = random.Random(seed)
    for _ in range(repeats):
        keys = list(calls)
        order.shuffle(keys)
        for key in keys:
            start = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - start)
    return times


def begin_cpu_benchmark(threads: int, repeats: int, allocator: Literal["system", "keep"] = "keep") -> None:
    """Set torch's thread count and glibc's allocator (by default to keep freed memory, `allocator=keep`, as the
    Omniglot experiments run), and print the header line that says so."""
    torch.set_num_threads(threads)
    set_allocator(allocator)
    print(f"torch {torch.__version__}, {threads} thread(s), {repeats} interleaved rounds, allocator={allocator}")
