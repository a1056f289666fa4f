"""Prefetching: the next meta-step's tasks drawn on a worker thread while this one computes.

On a GPU a meta-step's host work and device work can overlap, but `meta_train` draws each batch between
steps: the task sampler's host-side draws (Omniglot's took 3.5 ms for 16 tasks on an H200 machine beside a
~25 ms step, before `metaopt.tasks.ranking` cut its sort) wait for the last step to finish and the next step
waits for them. `Prefetcher` draws batch k+1 on one worker thread as soon
as batch k is handed out; torch's ops release the GIL, so the draw runs while the main thread launches and
waits for the step.

Exact: one thread at a time uses the generator, in the same order, so the batches are the ones drawn in
turn; and checkpoints see the generator as the steps taken so far left it (`rewound`), so a resumed run
draws what an uninterrupted one would. A batch drawn on CUDA is drawn on a side stream, after the work the
main stream had queued when it was asked for, and the main stream waits for it (events) before use. Not yet
measured on a GPU (no GPU was lent after it was written): `experiments/bench_gpu.py` times the whole step
with and without it.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Iterator

import torch
from torch import Tensor

from metaopt.types import Task

__all__ = ["Prefetcher"]


class Prefetcher:
    """`draw()` called one batch ahead on a worker thread.

    Args:
      draw: returns the next batch (it advances `generator`; no other state may change between its calls,
        which is why `meta_train` prefetches only distributions whose next batch ignores the last meta-step).
      generator: the random stream `draw` consumes (rewound for checkpoints and at `close`).
      device: where the batches end up; on CUDA each is drawn on a side stream.
    """

    def __init__(self, draw: Callable[[], Task], generator: torch.Generator, device: torch.device | str = "cpu"):
        self.draw, self.generator, self.device = draw, generator, torch.device(device)
        # One intra-op thread for the worker's torch ops (OpenMP's thread count is per thread): a second team of
        # all the cores beside the main thread's oversubscribes them. On 2 CPU cores a prefetched conv4 step took
        # 86.8 ms against 45.3 drawn in turn, and 37.9 against 38.1 with this (`python experiments/bench_gpu.py
        # --device cpu --meta-batch 4 --steps 1 --channels 8 --repeats 3 --only metaopt --train-steps 30`).
        # Where nothing runs beside the host, drawing ahead cannot gain: off by default on the CPU.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metaopt-prefetch",
                                       initializer=torch.set_num_threads, initargs=(1,))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending: tuple[Future, torch.Tensor] | None = None  # the draw ahead, the generator state before it

    def _draw(self, ready: torch.cuda.Event | None) -> tuple[Task, torch.cuda.Event | None]:
        if self.stream is None or ready is None:
            return self.draw(), None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)  # after whatever the main stream had queued when the draw was asked for
            batch = self.draw()
            event = torch.cuda.Event()
            event.record(self.stream)
        return batch, event

    def _submit(self) -> None:
        before = self.generator.get_state()  # read before the worker can advance it
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self.pending = (self.pool.submit(self._draw, ready), before)

    def __call__(self) -> Task:
        """The next batch (drawn ahead; the first one now), and the draw of the one after it started. A failed
        draw raises here, at the step that needed its batch."""
        if self.pending is None:
            self._submit()
        assert self.pending is not None
        batch, event = self.pending[0].result()
        self._submit()
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for tensor in torch.utils._pytree.tree_leaves(batch):  # allocated on the side stream, used on this one
                if isinstance(tensor, Tensor) and tensor.is_cuda:
                    tensor.record_stream(stream)
        return batch

    def next_state(self) -> Tensor:
        """The generator's state before the next batch handed out (whose draw may be under way)."""
        return self.pending[1] if self.pending is not None else self.generator.get_state()

    @contextlib.contextmanager
    def rewound(self) -> Iterator[None]:
        """The generator as the batches handed out so far left it (before the draw ahead), e.g. for a
        checkpoint; the draw ahead is kept."""
        if self.pending is None:
            yield
            return
        future, before = self.pending
        wait([future])  # not result(): a failed draw raises at its step
        after = self.generator.get_state()
        self.generator.set_state(before)
        try:
            yield
        finally:
            self.generator.set_state(after)

    def close(self) -> None:
        """Wait for the draw ahead, drop it and rewind the generator to before it; stop the worker."""
        if self.pending is not None:
            future, before = self.pending
            wait([future])
            self.generator.set_state(before)
            self.pending = None
        self.pool.shutdown(wait=True)
