"""An estimator's repetitions per pass (forward's tangents, ES's particles) left to the planner: `None` makes them
the planner's choice, timed under `batching="auto"` like the batching, fitted to the memory budget, and kept by a
resumed run. Stand-in meter and timer: no test depends on wall-clock speed."""
from __future__ import annotations

import pytest
import torch

import metaopt as mo
from metaopt import estimators as E
from metaopt.planning import plan
from metaopt.train import _per_pass, _with_resumed_per_pass
from metaopt.types import Carry
from test_budget_enforcement import _problem


def _per_pass_of(estimator) -> int:
    return getattr(estimator, estimator.per_pass) or 1


def meter(estimator, tasks, batching) -> int:
    """Bytes: 1000 per repetition in a pass (a task's, or a vmapped chunk's, graph)."""
    return 1000 * _per_pass_of(estimator)


def timer_where(faster: float):
    """Seconds of a call: 1 s at one repetition per pass, 1 / `faster` s with more."""
    def timer(estimator, tasks, batching) -> float:
        return 1.0 if _per_pass_of(estimator) == 1 else 1.0 / faster
    return timer


def test_left_to_the_planner_the_counts_are_one_doublings_and_all():
    loop, meta, _ = _problem()  # 6-6 MLP init: 61 scalars
    n = sum(p.numel() for p in meta.parameters())
    assert [e.particles_per_pass for e in E.EvolutionStrategies(population=8).pass_variants(loop, meta)] == [1, 2, 4, 8]
    assert [e.particles_per_pass for e in E.PersistentES(population=6, k=2).pass_variants(loop, meta)] == [1, 2, 4, 6]
    assert [e.tangents_per_pass for e in E.ForwardMode().pass_variants(loop, meta)] == [1, 2, 4, 8, 16, 32, n]
    variant = E.PersistentES(population=4, sigma=0.1, k=2, seed=3).pass_variants(loop, meta)[1]
    assert (variant.population, variant.sigma, variant.k, variant.seed) == (4, 0.1, 2, 3)  # the rest kept
    for chosen in (E.EvolutionStrategies(particles_per_pass=2), E.ForwardMode(tangents_per_pass=1),
                   E.ForwardMode(mode="random"), E.Full(), E.OnlinePES()):
        assert chosen.pass_variants(loop, meta) == []  # set by the user, or nothing to choose


@pytest.mark.parametrize("faster, expected", [(1.5, 8), (1.1, 1)])
def test_the_planner_runs_the_variant_measured_faster_by_a_margin(faster, expected):
    loop, meta, tasks = _problem()
    found = plan(E.EvolutionStrategies(population=8), loop, meta, tasks, mo.Budget(memory=10**6), meter=meter,
                 timer=timer_where(faster))
    assert found.estimator.particles_per_pass == expected
    assert f"particles_per_pass={expected} (1 per pass 1 s, 8 per pass {1 / faster:.3g} s" in found.reason


def test_more_per_pass_runs_only_where_it_fits_and_only_when_timed():
    loop, meta, tasks = _problem()
    tight = plan(E.EvolutionStrategies(population=8), loop, meta, tasks, mo.Budget(memory=4000), meter=meter,
                 timer=timer_where(10.0))  # 8 per pass: 8000 bytes > 3600
    assert tight.estimator.particles_per_pass == 2 and "8, 4 per pass do not fit" in tight.reason
    none_fits = plan(E.EvolutionStrategies(population=8), loop, meta, tasks, mo.Budget(memory=2000), meter=meter,
                     timer=timer_where(10.0))  # 2 per pass: 2000 bytes > 1800
    assert none_fits.estimator.particles_per_pass == 1 and "more per pass does not fit" in none_fits.reason
    for batching in ("vmap", "loop"):  # an explicit batching: nothing is timed, the least memory runs
        found = plan(E.EvolutionStrategies(population=8), loop, meta, tasks, mo.Budget(memory=10**6), meter=meter,
                     timer=timer_where(10.0), batching=batching)
        assert found.estimator.particles_per_pass == 1
    forward = plan(E.ForwardMode(), loop, meta, tasks, mo.Budget(memory=10**8), meter=meter, timer=timer_where(3.0))
    assert forward.estimator.tangents_per_pass == sum(p.numel() for p in meta.parameters())


@pytest.mark.parametrize("faster, expected", [(1.5, 8), (1.1, 1)])
def test_where_all_do_not_fit_the_largest_doubling_that_fits_is_timed_against_one(faster, expected):
    """Population 16 under a budget for 8 per pass (9000 of 10000 bytes at 1000 per particle): 8 per pass is timed
    against one and runs where it is faster by the margin (before, one per pass ran whenever all did not fit)."""
    loop, meta, tasks = _problem()
    found = plan(E.EvolutionStrategies(population=16), loop, meta, tasks, mo.Budget(memory=10000), meter=meter,
                 timer=timer_where(faster))
    assert found.estimator.particles_per_pass == expected
    assert f"(1 per pass 1 s, 8 per pass {1 / faster:.3g} s" in found.reason
    assert "16 per pass does not fit" in found.reason


def test_none_runs_one_per_pass_when_called_directly():
    loop, meta, tasks = _problem(steps=4)
    direct = E.EvolutionStrategies(population=4, seed=1)(loop, meta, tasks)
    one = E.EvolutionStrategies(population=4, seed=1, particles_per_pass=1)(loop, meta, tasks)
    assert all(torch.equal(direct.grads[k], one.grads[k]) for k in one.grads)
    windows = tasks._replace(carry=Carry(torch.ones(tasks.query.x.shape[0], dtype=torch.bool), None))
    online = [E.OnlinePES(population=4, particles_per_pass=n)(loop, meta, windows) for n in (None, 1)]
    assert all(torch.equal(online[0].grads[k], online[1].grads[k]) for k in online[1].grads)  # (never planned)


def test_a_resumed_run_keeps_the_repetitions_per_pass_its_checkpoint_recorded():
    chosen = E.EvolutionStrategies(population=8, particles_per_pass=8)
    assert _per_pass(chosen) == 8 and _per_pass(E.Full()) is None
    resumed = _with_resumed_per_pass(E.EvolutionStrategies(population=8), {"per_pass": 8})
    assert resumed.particles_per_pass == 8 and resumed.population == 8
    kept = E.EvolutionStrategies(population=8, particles_per_pass=2)  # the user's own count wins
    assert _with_resumed_per_pass(kept, {"per_pass": 8}) is kept
    fresh = E.EvolutionStrategies(population=8)
    assert _with_resumed_per_pass(fresh, None) is fresh and _with_resumed_per_pass(fresh, {"per_pass": None}) is fresh


def test_a_resumed_session_timed_otherwise_keeps_the_first_sessions_choice(tmp_path):
    """Stand-in timers make the first session run ES's 2 particles in one pass, the second one at a time; resumed,
    it keeps 2 per pass (the checkpoint's "per_pass") and continues the uninterrupted run bit for bit."""
    def run(steps: int, path, one_pass_seconds: float) -> tuple[dict[str, torch.Tensor], dict]:
        torch.manual_seed(0)
        model = mo.MLP(1, (8,), 1)
        loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
        meta = mo.meta_params(mo.Init(model))

        def timer(estimator, tasks, batching) -> float:
            return 10.0 if batching == "loop" else (1.0 if _per_pass_of(estimator) == 1 else one_pass_seconds)
        metrics = mo.meta_train(loop, meta, E.EvolutionStrategies(population=2), mo.Sinusoid(k_shot=5),
                                outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-2), meta_steps=steps,
                                meta_batch_size=3, inner_steps=2, eval_n_tasks=0, progress=False,
                                checkpoint_path=path, timer=timer)
        return {k: v.clone() for k, v in meta.state_dict().items()}, metrics

    straight, first = run(6, None, one_pass_seconds=0.1)
    assert "particles_per_pass=2" in first["estimator_config"]
    assert "particles_per_pass=1" in run(1, None, one_pass_seconds=10.0)[1]["estimator_config"]
    run(3, tmp_path / "ckpt.pt", one_pass_seconds=0.1)
    resumed, metrics = run(6, tmp_path / "ckpt.pt", one_pass_seconds=10.0)
    assert "particles_per_pass=2" in metrics["estimator_config"]
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k
