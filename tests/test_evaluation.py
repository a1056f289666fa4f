"""Evaluation is planned as training is: vmapped pieces sized to memory, then vmap or one task at a time by time."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import metaopt as mo
from metaopt import evaluation
from metaopt.evaluation import EvalPlan, plan_evaluation
from tests.problems import tiny_model


CONF = Path(__file__).resolve().parents[1] / "conf"


def _problem():
    model = tiny_model()  # float64 (conftest)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
    return loop, mo.meta_params(mo.Init(model)), mo.Sinusoid(k_shot=5)


def timer_of(per_task_ms, calls: list):
    """A stand-in for one timed call of n tasks at once: n x per_task_ms(n) milliseconds ("loop": n = 1)."""
    def timer(form: str, n_tasks: int) -> float:
        assert (form == "loop") == (n_tasks == 1)
        calls.append(n_tasks)
        return n_tasks * per_task_ms(n_tasks) * 1e-3
    return timer


@pytest.mark.parametrize("per_task_ms, sizes, chosen", [
    (lambda n: 1 / n, [1, 2, 4, 8, 16, 20], 20),  # dispatch-bound (the sinusoid MLP): the largest piece
    (lambda n: 1 + 0.1 * n, [1, 2], 1),  # the cost per task grows with the tasks at once (conv4 on the CPU)
    (lambda n: 1 / n + 0.05 * n, [1, 2, 4, 8], 4),  # a best size in between
])
def test_auto_times_doubling_pieces_until_one_is_no_faster_and_runs_the_fastest(per_task_ms, sizes, chosen):
    loop, meta, tasks = _problem()
    calls: list = []
    found = plan_evaluation(loop, meta, tasks, mo.Budget(memory="1GB"), inner_steps=2, batch_size=20,
                            timer=timer_of(per_task_ms, calls))
    assert calls == sizes and found.piece == chosen
    assert found.batching == ("loop" if chosen == 1 else "stacked")  # an InnerLoop on an MLP stacks
    assert found.task_seconds == pytest.approx(per_task_ms(chosen) * 1e-3)
    assert "per task at 1, 2, 4, ... at once" in found.reason


def test_the_pieces_timed_stop_at_what_fits_the_memory(monkeypatch):
    loop, meta, tasks = _problem()
    monkeypatch.setattr(evaluation, "_batched_piece", lambda *args: (6, "6 of 20 at once fit"))
    calls: list = []
    found = plan_evaluation(loop, meta, tasks, mo.Budget(memory="1GB"), inner_steps=2, batch_size=20,
                            timer=timer_of(lambda n: 1 / n, calls))
    assert calls == [1, 2, 4, 6] and (found.batching, found.piece) == ("stacked", 6)
    monkeypatch.setattr(evaluation, "_batched_piece", lambda *args: (1, "1 of 20 at once fits"))
    calls.clear()
    found = plan_evaluation(loop, meta, tasks, mo.Budget(memory="1GB"), inner_steps=2, batch_size=20,
                            timer=timer_of(lambda n: 1 / n, calls))
    assert calls == [1] and (found.batching, found.piece) == ("loop", 1)


@pytest.mark.parametrize("n_tasks, sizes, chosen", [
    (None, [1, 2, 4, 8, 16, 20], 20),  # no count known: up to the piece
    (3, [1, 2, 3], 3),  # no size above the tasks it plans for: an evaluation never runs more at once
    (1000, [1, 2, 4, 8, 16, 20], 20),  # the whole ladder costs little of 1000 tasks
    (200, [1, 2, 4, 8], 8),  # timing 16 at once would take the ladder past half of a 200-task evaluation
    (40, [1, 2, 4], 4),  # 1, 2 and 4 at once (4 warm from the memory probes) cost 0.8 of a 40-task evaluation
])
def test_the_ladder_costs_at_most_a_share_of_the_evaluation_it_plans(n_tasks, sizes, chosen):
    loop, meta, tasks = _problem()
    calls: list = []
    found = plan_evaluation(loop, meta, tasks, mo.Budget(memory="1GB"), inner_steps=2, batch_size=20,
                            n_tasks=n_tasks, timer=timer_of(lambda n: 1 / n, calls))
    assert calls == sizes and found.piece == chosen
    assert ("not timed (its timing would cost over 0.5 of the evaluation)" in found.reason) == (n_tasks in (40, 200))


@pytest.mark.parametrize("asked, form, piece, timed", [("vmap", "vmap", 20, 4), ("stacked", "stacked", 20, 4),
                                                       ("loop", "loop", 1, 1)])
def test_an_explicit_batching_is_kept_and_timed_for_the_prediction_alone(asked, form, piece, timed):
    loop, meta, tasks = _problem()
    calls: list = []
    found = plan_evaluation(loop, meta, tasks, mo.Budget(memory="1GB"), inner_steps=2, batch_size=20,
                            batching=asked, timer=timer_of(lambda n: 1 + n, calls))
    assert (found.batching, found.piece) == (form, piece) and calls == [timed]
    assert found.task_seconds == pytest.approx((1 + timed) * 1e-3)


def test_the_plan_predicts_drawing_and_scoring_per_task():
    assert EvalPlan("vmap", 10, "", task_seconds=0.002, sample_seconds=0.001).predicted_seconds(600) == \
        pytest.approx(1.8)
    assert EvalPlan("loop", 1, "").predicted_seconds(600) is None


@pytest.mark.parametrize("batching", ["stacked", "vmap", "loop"])
def test_every_form_scores_the_same_tasks_the_same(batching):
    """The plan changes how tasks run, never which tasks or their scores: stacked or vmapped pieces of 3 and one
    task at a time give the same per-task losses (float64) as a reference computed task by task with `unroll`,
    here."""
    loop, meta, tasks = _problem()
    plan = EvalPlan(batching, 3, "given")
    got = mo.evaluate(loop, meta, tasks, n_tasks=7, batch_size=5, inner_steps=2, seed=3, plan=plan,
                      return_per_task=True)
    generator = torch.Generator().manual_seed(3)
    drawn = [tasks.sample(5, 2, generator), tasks.sample(2, 2, generator)]
    reference = []
    for batch in drawn:
        for task in mo.unstack_tasks(batch):
            state = mo.unroll(loop, loop.init(meta, task.init), task.support, meta, create_graph=False)
            reference.append(loop.outer_loss_fn(loop.predict(state, task.query.x), task.query.y).detach())
    torch.testing.assert_close(got["task_losses"], torch.stack(reference), rtol=1e-10, atol=1e-12)
    assert got["eval_batching"] == batching and got["eval_plan"] == "given"
    assert got["eval_seconds"] > 0 and got["predicted_eval_seconds"] is None


def test_a_real_plan_is_timed_and_predicts_the_evaluation():
    loop, meta, tasks = _problem()
    metrics = mo.evaluate(loop, meta, tasks, n_tasks=20, batch_size=10, inner_steps=2)
    assert metrics["eval_batching"] in ("stacked", "loop")
    assert "per task at 1, 2, 4, ... at once" in metrics["eval_plan"]
    assert metrics["predicted_eval_seconds"] > 0 and metrics["eval_plan_seconds"] > 0


def test_validation_plans_once_and_reuses_the_plan(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from metaopt_hydra import build as build_module

    calls: list = []
    real = build_module.plan_ahead
    monkeypatch.setattr(build_module, "plan_ahead", lambda *a, **k: calls.append(1) or real(*a, **k))
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=["debug=tiny", "eval.val_n_tasks=4", "eval.batching=loop"])
    parts = build_module.build(cfg)
    validate = build_module.validation(cfg, parts)
    assert validate is not None
    first, second = validate(parts.meta), validate(parts.meta)
    assert first == second and len(calls) == 1
    assert validate.predicted_seconds(parts.meta) > 0 and len(calls) == 1  # a deadline's price: the same plan


def _meta_train(tmp_path, **kwargs):
    loop, meta, tasks = _problem()
    return mo.meta_train(loop, meta, mo.Full(), tasks, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-3),
                         meta_steps=3, meta_batch_size=4, inner_steps=2, eval_n_tasks=8, eval_batch_size=4,
                         progress=False, checkpoint_path=tmp_path / "ckpt.pt", **kwargs)


def test_a_run_records_its_predicted_and_measured_seconds(tmp_path):
    metrics = _meta_train(tmp_path)
    assert metrics["predicted_call_seconds"] > 0 and metrics["seconds_per_meta_step"] > 0
    assert metrics["predicted_eval_seconds"] > 0 and metrics["eval_seconds"] > 0
    assert metrics["eval_batch_size"] in (1, 2, 4) and metrics["eval_batching"] in ("stacked", "loop")


def test_an_evaluation_that_cannot_run_fails_before_training(tmp_path, monkeypatch):
    """The final evaluation is planned before the first meta-step: its error comes before any training work."""
    from metaopt import train as train_module

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation cannot run")

    steps: list = []
    monkeypatch.setattr(train_module, "plan_ahead", broken)
    monkeypatch.setattr(train_module, "_loop", lambda *args, **kwargs: steps.append(1))
    with pytest.raises(RuntimeError, match="evaluation cannot run"):
        _meta_train(tmp_path)
    assert not steps and not (tmp_path / "ckpt.pt").exists()


def test_a_loop_that_does_not_stack_evaluates_vmapped_and_a_stacked_conv4_scores_as_one_at_a_time():
    """A ProtoNet's loop has methods of its own: evaluation vmaps it. A conv4 classifier with BatchNorm (per-task
    statistics) and two inner steps stacks: its per-task losses and accuracies equal one task at a time's (float64)."""
    model = mo.Conv4(in_channels=1, out_features=3, channels=4, image_size=8, pools=2)
    tasks = mo.RandomPatterns(n_way=3, k_shot=2, k_query=3, size=8)
    proto = mo.PrototypeLoop(model)
    assert evaluation.evaluation_form(proto, mo.meta_params(mo.Init(model)))[0] == "vmap"
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model), mo.LearningRates(model))
    assert evaluation.evaluation_form(loop, meta)[0] == "stacked"
    got = {form: mo.evaluate(loop, meta, tasks, n_tasks=5, batch_size=5, inner_steps=2, plan=EvalPlan(form, 5, ""),
                             return_per_task=True) for form in ("stacked", "loop")}
    for key in ("task_losses", "task_accuracies"):
        torch.testing.assert_close(got["stacked"][key], got["loop"][key], rtol=1e-10, atol=1e-12)
    assert got["loop"]["task_accuracies"].unique().numel() > 1 or got["loop"]["task_losses"].std() > 0
