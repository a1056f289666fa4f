"""Overlapped meta-steps (`metaopt.overlap`, `meta_train(overlap=True)`): the optimizer steps before the flag is
read and the next step is launched before that read, yet the run equals the synchronous loop's bit for bit,
non-finite tasks, errors, checkpoints and resumes included. On the CPU the device work is synchronous, so these
tests check the bookkeeping; what overlapping saves is measured on a GPU (`experiments/bench_gpu.py`)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import metaopt as mo
from metaopt.callbacks import Callback
from metaopt.schedules import Cosine
from metaopt.checkpoint import load_checkpoint
from metaopt.online import OnlineTasks
from metaopt.overlap import HostCopy, OptimizerUndo, undo_bytes
from metaopt.step import RandomState
from metaopt.types import Batch, Task


class Sinusoid(mo.Sinusoid):
    """Float64 sinusoid tasks whose draw number `n` (1-based; draw 1 is the planner's) has task 1's query targets set to
    NaN for every n in `nan_at`, and which raise KeyboardInterrupt at draw `interrupt_at`."""

    def __init__(self, nan_at: tuple[int, ...] = (), interrupt_at: int | None = None):
        super().__init__(k_shot=5)
        self.nan_at, self.interrupt_at, self.draws = nan_at, interrupt_at, 0

    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        self.draws += 1
        if self.draws == self.interrupt_at:
            raise KeyboardInterrupt(f"draw {self.draws}")
        task = super().sample(n_tasks, inner_steps, generator)
        task = Task(tuple(Batch(b.x.double(), b.y.double()) for b in task.support),
                    Batch(task.query.x.double(), task.query.y.double()))
        if self.draws in self.nan_at:
            y = task.query.y.clone()
            y[1] = math.nan
            task = task._replace(query=Batch(task.query.x, y))
        return task


def _train(steps: int, tasks: mo.Sinusoid, seed: int = 0, **kwargs):
    """`steps` meta-steps of Meta-SGD in float64 with Adam, a cosine schedule and clipping (the optimizer's state,
    groups and step counts all have to be undone exactly); logging only at the end, so that the steps between
    overlap. The batching is pinned ("auto" times its options on a loaded machine; bitwise checks)."""
    torch.manual_seed(seed)
    model = mo.MLP(1, (16, 16), 1).double()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model), mo.LearningRates(model, granularity="tensor"))
    kwargs = {"log_every": steps, "max_grad_norm": 1.0, "lr_schedule": Cosine(steps), **kwargs}
    metrics = mo.meta_train(loop, meta, mo.Full(), tasks, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2),
                            meta_steps=steps, meta_batch_size=4, inner_steps=1, eval_n_tasks=0, progress=False,
                            batching="stacked", **kwargs)
    return meta, metrics


def _assert_same(meta, reference) -> None:
    for k, v in reference.state_dict().items():
        assert torch.equal(meta.state_dict()[k], v), k


def _summary(metrics) -> tuple:
    return (metrics["meta_steps"], metrics["tasks_nan_skipped"], [e["meta_train_loss"] for e in metrics["history"]])


def test_an_overlapped_run_equals_the_synchronous_one_bit_for_bit():
    reference, expected = _train(9, Sinusoid(), overlap=False)
    for prefetch in (False, True):
        meta, metrics = _train(9, Sinusoid(), overlap=True, prefetch=prefetch)
        _assert_same(meta, reference)
        assert _summary(metrics) == _summary(expected)


def test_a_non_finite_step_found_late_is_undone_and_its_bad_tasks_dropped_as_without_overlap():
    """Draws 4 and 5 (steps 2 and 3) have a NaN task; step 2's is found after step 3 was launched and optimized
    on top of it: both are undone, step 2 is computed again without its bad task, step 3 launched again."""
    reference, expected = _train(9, Sinusoid(nan_at=(4, 5)), overlap=False, on_nan="skip")
    assert expected["tasks_nan_skipped"] == 2
    meta, metrics = _train(9, Sinusoid(nan_at=(4, 5)), overlap=True, on_nan="skip")
    _assert_same(meta, reference)
    assert _summary(metrics) == _summary(expected)


def test_a_non_finite_step_found_late_raises_as_without_overlap_and_checkpoints_the_state_before_it(tmp_path):
    with pytest.raises(FloatingPointError) as synchronous:
        _train(9, Sinusoid(nan_at=(6,)), overlap=False, checkpoint_path=tmp_path / "sync.pt")
    with pytest.raises(FloatingPointError) as overlapped:
        _train(9, Sinusoid(nan_at=(6,)), overlap=True, checkpoint_path=tmp_path / "overlap.pt")
    assert str(overlapped.value) == str(synchronous.value) and "meta-step 4, task 1" in str(overlapped.value)
    sync, ahead = load_checkpoint(tmp_path / "sync.pt"), load_checkpoint(tmp_path / "overlap.pt")
    assert sync["meta_step"] == ahead["meta_step"] == 4
    for k, v in sync["meta"].items():
        assert torch.equal(ahead["meta"][k], v), k
    # The overlapped checkpoint holds the generator before the bad batch (resumed, the run meets it again), as a
    # run that stopped after meta-step 4 does; the synchronous one holds it after.
    _train(4, Sinusoid(), overlap=False, checkpoint_path=tmp_path / "four.pt")
    four = load_checkpoint(tmp_path / "four.pt")
    assert torch.equal(ahead["generator"], four["generator"]) and not torch.equal(sync["generator"], four["generator"])


def test_an_interrupted_overlapped_run_resumes_to_the_uninterrupted_run(tmp_path):
    """An interrupt while a step runs ahead: the checkpoint keeps the steps that completed, and the resumed run
    (overlapped or not) ends where the uninterrupted synchronous run does."""
    straight, _ = _train(10, Sinusoid(), overlap=False)
    for resume_overlapped in (True, False):
        path = tmp_path / f"{resume_overlapped}.pt"
        with pytest.raises(KeyboardInterrupt):
            _train(10, Sinusoid(interrupt_at=7), overlap=True, checkpoint_path=path)
        assert load_checkpoint(path)["meta_step"] == 5  # draws 2-6 are steps 0-4
        meta, metrics = _train(10, Sinusoid(), seed=99, overlap=resume_overlapped, checkpoint_path=path)
        _assert_same(meta, straight)
        assert metrics["meta_steps"] == 10


def test_entries_checkpoints_and_callbacks_see_the_state_of_their_step(tmp_path):
    """Steps with a history entry, a checkpoint or a memory measurement settle before the next one launches: a
    callback sees the meta-parameters after its step, and a checkpoint resumes exactly."""
    seen: dict[str, list] = {}

    class Snapshot(Callback):
        def __init__(self, key: str):
            self.key = key

        def due(self, step: int) -> bool:
            return step % 3 == 0

        def on_entry(self, state, entry, last) -> None:
            seen.setdefault(self.key, []).append((state.step, [p.clone() for p in state.meta.parameters()]))

    constant = {"lr_schedule": None}  # a cosine's length is the run's: the 8 steps would not be the 12's first 8
    _train(8, Sinusoid(), overlap=False, callbacks=[Snapshot("sync")], **constant)
    _train(8, Sinusoid(), overlap=True, callbacks=[Snapshot("overlap")], checkpoint_every=4,
           checkpoint_path=tmp_path / "ckpt.pt", **constant)
    assert [s for s, _ in seen["overlap"]] == [s for s, _ in seen["sync"]] == [3, 6, 8]
    for (_, a), (_, b) in zip(seen["overlap"], seen["sync"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    straight, _ = _train(12, Sinusoid(), overlap=False, **constant)
    meta, _ = _train(12, Sinusoid(), seed=99, overlap=True, checkpoint_path=tmp_path / "ckpt.pt", **constant)
    _assert_same(meta, straight)


def test_optimizer_undo_restores_parameters_state_and_groups_exactly():
    torch.manual_seed(0)
    params = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True), torch.randn(4, requires_grad=True)]
    for make in (lambda: torch.optim.Adam(params, lr=0.1), lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
                 lambda: torch.optim.AdamW(params, lr=0.1, amsgrad=True)):
        optimizer = make()

        def step(lr: float) -> None:
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.param_groups[0]["lr"] = lr
            optimizer.step()
        first = OptimizerUndo(optimizer)  # before any state exists
        step(0.05)
        before = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
        undo = OptimizerUndo(optimizer)
        step(0.2)
        step(0.3)
        undo.restore()
        assert all(torch.equal(p, q) for p, q in zip(params, before[0]))
        assert optimizer.param_groups[0]["lr"] == 0.05
        restored = optimizer.state_dict()["state"]
        for i, saved in before[1]["state"].items():
            for key, value in saved.items():
                assert torch.equal(torch.as_tensor(restored[i][key]), torch.as_tensor(value)), (i, key)
        first.restore()
        assert not optimizer.state and optimizer.param_groups[0]["lr"] == 0.1


def test_random_state_and_host_copy():
    torch.manual_seed(3)
    saved = RandomState()
    a = torch.rand(4)
    saved.restore()
    assert torch.equal(torch.rand(4), a)
    copy = HostCopy(torch.tensor([1.0, 2.5]))
    assert copy.read() == [1.0, 2.5] and copy.read() is copy.read()


def test_overlap_adds_the_undo_copy_and_one_meta_gradient_to_the_planned_peak():
    params = [torch.zeros(10, dtype=torch.float64, requires_grad=True),
              torch.zeros(3, dtype=torch.float32, requires_grad=True)]
    optimizer = torch.optim.Adam(params)
    assert undo_bytes(optimizer, 1000) == 2 * (80 + 12) + 1000
    loop_args = dict(meta_batch_size=4, inner_steps=1, budget=mo.Budget(), batching="stacked",
                     meter=lambda estimator, tasks, batching: 1000)
    torch.manual_seed(0)
    model = mo.MLP(1, (8,), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    adam = torch.optim.Adam(meta.parameters())
    from metaopt.train import optimizer_state_bytes, plan_training
    plans = [plan_training(mo.Full(), loop, meta, mo.Sinusoid(), adam, overlap=overlap, **loop_args)
             for overlap in (False, True)]
    state = optimizer_state_bytes(adam)
    assert plans[1].predicted_peak_bytes - plans[0].predicted_peak_bytes == undo_bytes(adam, state)


def test_overlap_is_off_on_the_cpu_by_default_and_on_on_cuda():
    """(Refused where a step depends on the last one: tests/test_prefetch.py.)"""
    from metaopt.train import _overlaps
    assert not _overlaps(None, mo.Sinusoid(), mo.Full(), "cpu") and _overlaps(None, mo.Sinusoid(), mo.Full(), "cuda")
    assert not _overlaps(None, OnlineTasks(mo.Sinusoid(), horizon=4), mo.Full(), "cuda")


def test_a_time_limit_stop_settles_the_step_ahead(tmp_path, monkeypatch):
    """The loop stops at the time limit (here: before the 7th step) with a step running ahead: that step is
    settled and kept, and the run equals a synchronous run of as many steps."""
    import metaopt.train as train
    asked = [0]

    def time_left(self) -> float:
        asked[0] += 1
        return math.inf if asked[0] <= 6 else 0.0
    monkeypatch.setattr(train._Checkpointer, "time_left", time_left)
    meta, metrics = _train(12, Sinusoid(), overlap=True, lr_schedule=None, checkpoint_path=tmp_path / "ckpt.pt")
    monkeypatch.undo()
    assert metrics["meta_steps"] == 6 and metrics["stopped_at_time_limit"]
    assert load_checkpoint(tmp_path / "ckpt.pt")["meta_step"] == 6
    reference, _ = _train(6, Sinusoid(), overlap=False, lr_schedule=None)
    _assert_same(meta, reference)


def test_an_error_in_the_optimizer_step_ahead_undoes_it(tmp_path):
    """The outer optimizer fails on its 7th step (meta-step 5, run ahead; the first step is the planner's, on a
    copy, to measure the optimizer's state) after updating the parameters: the update is undone, the checkpoint
    holds 5 steps, and the resumed run ends where the uninterrupted one does."""
    steps = [0]

    class FailingAdam(torch.optim.Adam):
        def step(self, closure=None):  # type: ignore[override]
            loss = super().step(closure)
            steps[0] += 1
            if steps[0] == 7:
                raise KeyboardInterrupt("optimizer")
            return loss

    def train_with(optimizer: type, steps_: int, **kwargs):
        torch.manual_seed(kwargs.pop("seed", 0))
        model = mo.MLP(1, (16, 16), 1).double()
        loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)
        meta = mo.meta_params(mo.Init(model), mo.LearningRates(model, granularity="tensor"))
        mo.meta_train(loop, meta, mo.Full(), Sinusoid(), outer_optimizer=optimizer(meta.parameters(), 1e-2),
                      meta_steps=steps_, meta_batch_size=4, inner_steps=1, eval_n_tasks=0, progress=False,
                      batching="stacked", log_every=steps_, **kwargs)
        return meta

    with pytest.raises(KeyboardInterrupt):
        train_with(FailingAdam, 10, overlap=True, checkpoint_path=tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path / "ckpt.pt")["meta_step"] == 5
    resumed = train_with(torch.optim.Adam, 10, seed=99, overlap=True, checkpoint_path=tmp_path / "ckpt.pt")
    _assert_same(resumed, train_with(torch.optim.Adam, 10, overlap=False))
