"""Prefetching (`metaopt.prefetch`): meta-training that draws each batch a step ahead on a worker thread trains on
the same tasks as without, checkpoints and resumes as without, and says where it cannot."""
from __future__ import annotations

import threading

import pytest
import torch

import metaopt as mo
from metaopt.checkpoint import load_checkpoint
from metaopt.online import OnlineTasks
from metaopt.types import Task


class RecordingSinusoid(mo.Sinusoid):
    """Sinusoid tasks that note the thread of every draw, and fail at draw number `fail_at` (1-based)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(k_shot=5)
        self.threads: list[str] = []
        self.torch_threads: list[int] = []  # torch's intra-op threads in the drawing thread
        self.fail_at = fail_at

    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        self.threads.append(threading.current_thread().name)
        self.torch_threads.append(torch.get_num_threads())
        if len(self.threads) == self.fail_at:
            raise RuntimeError(f"draw {self.fail_at} failed")
        return super().sample(n_tasks, inner_steps, generator)


def _train(steps: int, tasks: mo.Sinusoid, seed: int = 0, **kwargs):
    """`steps` meta-steps of Meta-SGD on the tasks. The batching is pinned: "auto" times vmap against one task at a
    time on a loaded machine and may choose differently in two runs, which differ in rounding (bitwise checks)."""
    torch.manual_seed(seed)
    model = mo.MLP(1, (16, 16), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model), mo.LearningRates(model, granularity="tensor"))
    metrics = mo.meta_train(loop, meta, mo.Full(), tasks, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2),
                            meta_steps=steps, meta_batch_size=4, inner_steps=1, eval_n_tasks=0, progress=False,
                            log_every=1, batching="stacked", **kwargs)
    return meta, metrics


def _losses(metrics) -> list[float]:
    return [entry["meta_train_loss"] for entry in metrics["history"]]


def test_prefetching_trains_on_the_same_tasks_on_a_worker_thread():
    tasks = RecordingSinusoid()
    meta, metrics = _train(6, tasks, prefetch=True)
    reference_tasks = RecordingSinusoid()
    reference, expected = _train(6, reference_tasks, prefetch=False)
    assert _losses(metrics) == _losses(expected)
    for k, v in reference.state_dict().items():
        assert torch.equal(meta.state_dict()[k], v), k
    main = threading.current_thread().name
    assert tasks.threads[0] == main  # the planner's batch (its own generator), before training
    # one batch per step and the one drawn ahead, dropped at the end
    assert len(tasks.threads) == 1 + 7 and all(name.startswith("metaopt-prefetch") for name in tasks.threads[1:])
    assert reference_tasks.threads == [main] * (1 + 6)  # sequential: on the caller's thread


def test_the_worker_draws_on_one_torch_thread_and_leaves_the_callers_count():
    """OpenMP's thread count is per thread: the worker sets its own to one (a second team of every core beside
    the training thread's oversubscribed the cores, 2x slower steps on 2 cores), the caller keeps its count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tasks = RecordingSinusoid()
        _train(3, tasks, prefetch=True)
        assert tasks.torch_threads == [2] + [1] * 4  # the planner's draw on the caller's thread, then the worker's
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_on_the_cpu_prefetching_is_off_unless_asked_for():
    tasks = RecordingSinusoid()
    _train(2, tasks)
    assert tasks.threads == [threading.current_thread().name] * (1 + 2)


def test_a_prefetched_run_checkpoints_the_generator_of_the_steps_taken_and_resumes_exactly(tmp_path):
    """A checkpoint written while the next batch is already drawn holds the generator before that draw: a run
    resumed from it (with or without prefetching) ends where an uninterrupted sequential run does."""
    straight, expected = _train(8, RecordingSinusoid(), prefetch=False)
    _train(5, RecordingSinusoid(), prefetch=True, checkpoint_path=tmp_path / "ckpt.pt", checkpoint_every=2)
    assert load_checkpoint(tmp_path / "ckpt.pt")["meta_step"] == 5
    for prefetch, path in ((True, tmp_path / "ckpt.pt"), (False, tmp_path / "copy.pt")):
        if not prefetch:
            _train(5, RecordingSinusoid(), prefetch=True, checkpoint_path=path, checkpoint_every=2)
        meta, resumed = _train(8, RecordingSinusoid(), seed=99, prefetch=prefetch, checkpoint_path=path)
        for k, v in straight.state_dict().items():
            assert torch.equal(meta.state_dict()[k], v), (prefetch, k)
        assert _losses(resumed)[-3:] == _losses(expected)[-3:]


def test_a_failed_draw_raises_at_the_step_that_needed_it_and_keeps_the_steps_before(tmp_path):
    tasks = RecordingSinusoid(fail_at=5)  # the batch of step 4 (draw 1 is the planner's), drawn during step 3
    with pytest.raises(RuntimeError, match="draw 5 failed"):
        _train(6, tasks, prefetch=True, checkpoint_path=tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path / "ckpt.pt")["meta_step"] == 3
    meta, _ = _train(6, RecordingSinusoid(), seed=99, prefetch=True, checkpoint_path=tmp_path / "ckpt.pt")
    straight, _ = _train(6, RecordingSinusoid(), prefetch=False)
    for k, v in straight.state_dict().items():
        assert torch.equal(meta.state_dict()[k], v), k


@pytest.mark.parametrize("option", ["prefetch", "overlap"])
def test_a_distribution_whose_next_batch_depends_on_the_last_step_is_not_prefetched_or_overlapped(option):
    torch.manual_seed(0)
    model = mo.MLP(1, (8,), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    online = OnlineTasks(mo.Sinusoid(k_shot=5, k_query=5), horizon=4)
    with pytest.raises(ValueError, match=f"{option}=True, but .*depends on the last meta-step"):
        mo.meta_train(loop, meta, mo.get_estimator("online_pes", population=2, sigma=0.01), online, meta_steps=2,
                      outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2), meta_batch_size=2, inner_steps=2,
                      eval_n_tasks=0, progress=False, **{option: True})
