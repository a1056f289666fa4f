"""Meta-training: it learns, resumes exactly from a checkpoint, and stops clearly on NaN."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metaopt as mo
from metaopt.checkpoint import CorruptCheckpoint, load_checkpoint, save_atomic
from metaopt.train import mean_ci95


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = mo.MLP(1, (16, 16), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model), mo.LearningRates(model, granularity="tensor"))
    return loop, meta, torch.optim.Adam(meta.parameters(), lr=1e-2)


def _train(loop, meta, opt, steps, **kwargs):
    return mo.meta_train(loop, meta, mo.Full(), mo.Sinusoid(k_shot=5), outer_optimizer=opt, meta_steps=steps,
                         meta_batch_size=4, inner_steps=1, eval_n_tasks=50, progress=False, log_every=5, **kwargs)


def test_meta_training_lowers_the_meta_test_loss():
    loop, meta, opt = _parts()
    before = mo.evaluate(loop, meta, mo.Sinusoid(k_shot=5), n_tasks=200)["meta_test_loss"]
    metrics = _train(loop, meta, opt, 150, eval_tasks=mo.Sinusoid(k_shot=5))
    assert metrics["meta_test_loss"] < 0.7 * before
    assert metrics["meta_steps"] == 150 and metrics["estimator"] == "full"
    assert len(metrics["history"]) == 30


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    loop, meta, opt = _parts()
    straight = _train(loop, meta, opt, 10)
    final = {k: v.clone() for k, v in meta.state_dict().items()}

    loop, meta, opt = _parts()
    first = _train(loop, meta, opt, 6, checkpoint_path=tmp_path / "ckpt.pt", checkpoint_every=3)
    assert load_checkpoint(tmp_path / "ckpt.pt")["train_seconds"] >= first["train_seconds"]
    loop, meta, opt = _parts(seed=99)  # fresh objects, different initial values: all must come from the file
    resumed = _train(loop, meta, opt, 10, checkpoint_path=tmp_path / "ckpt.pt", checkpoint_every=3)
    for k, v in meta.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=1e-12, atol=1e-12)
    assert resumed["meta_test_loss"] == pytest.approx(straight["meta_test_loss"], rel=1e-9)
    # The interrupted run logged its last step (6); the resumed one goes on from there.
    assert [h["meta_step"] for h in resumed["history"]] == [5, 6, 10]
    assert resumed["train_seconds"] > first["train_seconds"]  # both sessions' training time


def test_nan_stops_with_the_meta_step_and_writes_no_non_finite_checkpoint(tmp_path):
    loop, meta, opt = _parts()
    with torch.no_grad():
        meta["optimizer"].lrs["net/0/weight"].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="meta-step 0, task 0: inner step 1: parameter 'net.0.weight' "
                                                 "becomes non-finite"):
        _train(loop, meta, opt, 5, checkpoint_path=tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()  # non-finite meta-parameters are never checkpointed


def test_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpoint, match="ckpt.pt"):
        load_checkpoint(path)


def test_save_atomic_leaves_no_temporary_files(tmp_path):
    save_atomic({"a": torch.ones(2)}, tmp_path / "x.pt")
    save_atomic({"a": torch.zeros(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "x.pt")["a"], torch.zeros(2))


def test_mean_ci95_matches_formula():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, ci = mean_ci95(values)
    assert mean == 2.5 and ci == pytest.approx(1.96 * values.std().item() / 2)
    assert math.isnan(mean_ci95(torch.tensor([1.0]))[1])


def test_collapse_guard_rolls_back_to_the_best_state_then_stops():
    from metaopt.collapse import CollapseGuard, TrainingCollapsed
    meta = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(meta.parameters(), lr=0.1)
    guard = CollapseGuard(chance_loss=2.302585, patience=2, rollbacks=1)
    guard.watch(100, 0.5, meta, opt)
    best = {k: v.clone() for k, v in meta.state_dict().items()}
    with torch.no_grad():
        meta.weight.add_(1.0)
    guard.watch(200, 2.3026, meta, opt)  # at chance: rolled back, lr halved
    assert torch.equal(meta.weight, best["weight"]) and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert "chance level" in guard.events[0]["reason"]
    guard.watch(300, 0.6, meta, opt)
    with pytest.raises(TrainingCollapsed, match="rose for 2 logging intervals"):
        guard.watch(400, 0.7, meta, opt)
    assert torch.equal(meta.weight, best["weight"])  # stopped at the best state
    with pytest.raises(TrainingCollapsed, match="is nan"):
        CollapseGuard(rollbacks=0).watch(1, float("nan"), meta, opt)


def test_meta_train_with_a_collapse_guard_records_its_rollbacks(tmp_path):
    from metaopt.collapse import CollapseGuard
    loop, meta, opt = _parts()
    guard = CollapseGuard(patience=1, rollbacks=50)  # any rise rolls back: some will in 40 noisy steps
    metrics = _train(loop, meta, opt, 60, callbacks=[guard])
    assert metrics["collapse_rollbacks"] == guard.events and guard.events
    assert any("rollback" in h for h in metrics["history"])


def test_callbacks_get_entries_in_order_when_due_and_add_to_the_metrics():
    calls = []

    class Every3(mo.Callback):
        def due(self, step):
            return step % 3 == 0

        def on_entry(self, state, entry, last):
            calls.append(("every3", state.step, last, "val_loss" in entry))

        def on_end(self, state):
            return {"every3_entries": len(calls)}

    loop, meta, opt = _parts()
    validated = []

    def validate(m):
        assert m is meta
        validated.append(len(calls))
        return {"val_loss": 1.0 / (1 + len(validated))}

    metrics = mo.meta_train(loop, meta, mo.Full(), mo.Sinusoid(k_shot=5), outer_optimizer=opt, meta_steps=10,
                            meta_batch_size=2, eval_n_tasks=0, progress=False, log_every=5,
                            callbacks=[mo.Validation(validate, every=4), Every3()])
    # Entries at the logging steps (5, 10), where a callback is due (3, 4, 6, 8, 9) and the last (10), in order.
    assert [h["meta_step"] for h in metrics["history"]] == [3, 4, 5, 6, 8, 9, 10]
    assert [c[1] for c in calls] == [3, 4, 5, 6, 8, 9, 10] and calls[-1][2] and not any(c[2] for c in calls[:-1])
    # Validation ran first (at 4, 8 and the last step), so the next callback saw its metrics in the entry.
    assert [c[1] for c in calls if c[3]] == [4, 8, 10] and len(validated) == 3
    assert metrics["every3_entries"] == 7 and metrics["val_loss"] == pytest.approx(1 / 4)


def test_cosine_and_step_decay_schedules():
    from metaopt.schedules import Cosine, StepDecay
    cosine = Cosine(total_steps=100, final=0.1, warmup_steps=10)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0) and cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.1 + 0.9 * 0.5) and cosine(100) == pytest.approx(0.1) == cosine(500)
    assert [StepDecay(every=2, gamma=0.5)(s) for s in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        Cosine(total_steps=10, warmup_steps=10)


def test_lr_schedule_sets_each_steps_lr_and_resumes_on_schedule(tmp_path):
    from metaopt.schedules import StepDecay
    seen = []

    class Recording(StepDecay):
        def __call__(self, step):
            seen.append(step)
            return super().__call__(step)

    loop, meta, opt = _parts()
    schedule = Recording(every=3, gamma=0.5)
    _train(loop, meta, opt, 4, lr_schedule=schedule, checkpoint_path=tmp_path / "ckpt.pt")
    assert seen == [0, 1, 2, 3] and opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)
    loop, meta, opt = _parts()
    _train(loop, meta, opt, 7, lr_schedule=schedule, checkpoint_path=tmp_path / "ckpt.pt")
    assert seen[4:] == [4, 5, 6] and opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert opt.param_groups[0]["initial_lr"] == 1e-2  # restored from the checkpoint, not the fresh optimizer's


def test_time_limit_stops_before_a_step_that_would_not_fit(tmp_path):
    loop, meta, opt = _parts()
    metrics = _train(loop, meta, opt, 50, time_limit=0.0, checkpoint_path=tmp_path / "ckpt.pt")
    assert metrics["meta_steps"] == 0 and metrics["meta_steps_asked"] == 50 and metrics["stopped_at_time_limit"]
    assert (tmp_path / "ckpt.pt").exists() and math.isfinite(metrics["meta_test_loss"])
    metrics = _train(loop, meta, opt, 5, time_limit=3600.0)
    assert metrics["meta_steps"] == 5 and not metrics["stopped_at_time_limit"]


def test_a_meta_step_reads_the_device_once_for_the_finiteness_flag_and_the_loss(monkeypatch):
    """On CUDA every read of a device number waits for the queued work: a meta-step reads one tensor (the flag
    and the mean outer loss together), not one per gradient or per number. Counted here as every host read of
    a tensor's values in `meta_step`: `.item()`/`bool()` (aten's _local_scalar_dense) and `.tolist()`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import metaopt.train as train

    reads: list[str] = []
    inside: list[bool] = []  # non-empty while a meta-step runs (evaluation's reads are not counted)

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append("item")
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (inside and reads.append("tolist")) or tolist(self))
    step = train.meta_step

    def counted(*args, **kwargs):
        inside.append(True)
        try:
            with ScalarReads():
                return step(*args, **kwargs)
        finally:
            inside.clear()
    monkeypatch.setattr(train, "meta_step", counted)
    loop, meta, _ = _parts()
    metrics = _train(loop, meta, torch.optim.SGD(meta.parameters(), lr=1e-3), 3)  # SGD: no step counter to read
    assert reads == ["tolist"] * 3
    assert all(math.isfinite(h["meta_train_loss"]) for h in metrics["history"])


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=5),
       bad=st.sampled_from([None, math.nan, math.inf, -math.inf]), where=st.integers(0, 10**6),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
def test_the_finiteness_flag_sees_one_non_finite_entry_anywhere(shapes, bad, where, dtype):
    """The meta-step's flag (each tensor's largest |entry|, two multi-tensor ops) is finite exactly when every
    entry of every tensor is, empty tensors and 0-d ones included; huge finite values stay finite."""
    from metaopt.step import _largest_magnitudes

    generator = torch.Generator().manual_seed(where)
    tensors = [torch.randn(shape, generator=generator).to(dtype) * torch.finfo(dtype).max / 4 for shape in shapes]
    sizes = [t.numel() for t in tensors]
    if bad is not None and sum(sizes):
        index = where % sum(sizes)
        owner = next(i for i in range(len(sizes)) if index < sum(sizes[:i + 1]))
        tensors[owner].view(-1)[index - sum(sizes[:owner])] = bad
    expected = all(bool(torch.isfinite(t).all()) for t in tensors)
    assert bool(torch.isfinite(torch.stack(_largest_magnitudes(tensors))).all()) == expected
