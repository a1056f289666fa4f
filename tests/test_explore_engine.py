"""The explorer's engine on tiny objectives with an injected clock: packing, deadline, pruning, front, queue."""
from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaopt.explore import (
    Price,
    RungTimes,
    Candidate,
    CandidateQueue,
    Explorer,
    Rung,
    TrialRecord,
    dominates,
    hypervolume,
    non_dominated_ranks,
    pareto_front,
)
from metaopt.explore.scheduler import Message, _Running


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += 1.0  # each scheduler round is one second


class FakeRunner:
    """A trial's rung r takes `seconds` x (r + 1) fake seconds; its loss is (x - 0.3)^2 + 1 / (r + 1)."""

    def __init__(self, clock: FakeClock, seconds: float = 3.0, guard_trips: set[str] = frozenset(),
                 measured_factor: float = 1.0):
        self.clock, self.seconds, self.guard_trips = clock, seconds, guard_trips
        self.measured_factor = measured_factor  # a rung's measured peak: the prediction x this
        self.started: list[int] = []

    def price(self, candidate, memory_share, excluded):
        cost = candidate.params["cost"]
        ladder = [("full", cost), ("checkpoint", cost // 4), ("first_order", cost // 16)]
        for name, peak in ladder:
            if name not in excluded and peak <= memory_share:
                return peak, name
        return f"nothing fits {memory_share} bytes"

    def start(self, candidate, rung_steps):
        self.started.append(candidate.trial)
        return {"c": candidate, "rung": 0, "due": self.clock() + self.seconds, "waiting": False, "steps": rung_steps,
                "tripped": candidate.estimator_chosen in self.guard_trips}

    def poll(self, h):
        if h["waiting"] or self.clock() < h["due"]:
            return []
        if h["tripped"]:
            return [Message("error", error="BudgetExceeded: past its memory budget", budget=True)]
        r = h["rung"]
        x = h["c"].params["x"]
        rung = Rung(r, h["steps"][r], (x - 0.3) ** 2 + 1 / (r + 1), self.seconds * (r + 1) * h["c"].params["cost"]
                    / 1e6, int(h["c"].predicted_peak_bytes * self.measured_factor))
        if r + 1 == len(h["steps"]):
            return [Message("rung", rung), Message("done")]
        h["waiting"] = True
        return [Message("rung", rung)]

    def resume(self, h):
        h["rung"] += 1
        h["waiting"] = False
        h["due"] = self.clock() + self.seconds * (h["rung"] + 1)

    def stop(self, h):
        h["waiting"] = True


class FakeStudy:
    def __init__(self, seed=0):
        self.rng = random.Random(seed)
        self.count = itertools.count()
        self.told: dict[int, TrialRecord] = {}
        self.children: list[tuple[int, int, float]] = []

    def ask(self):
        return next(self.count), {"x": self.rng.random(), "cost": self.rng.choice([100, 300, 600, 2000])}

    def ask_child(self, params, parent, priority):
        trial = next(self.count)
        self.children.append((trial, parent, priority))
        return trial

    def tell(self, record):
        self.told[record.trial] = record


def perturb(params, rng):
    return {**params, "x": min(1.0, max(0.0, params["x"] + rng.gauss(0, 0.05)))}


def _explorer(clock, runner=None, study=None, **kwargs):
    options = dict(memory=1000, time_budget=60, max_parallel=3, rung_steps=10, eta=2, rungs=3, queue_size=6,
                   children=2, perturb=perturb, clock=clock, sleep=clock.sleep)
    options.update(kwargs)
    return Explorer(runner or FakeRunner(clock), study or FakeStudy(), **options)


def test_packing_never_exceeds_memory_and_the_deadline_holds():
    clock = FakeClock()
    explorer = _explorer(clock)
    records = explorer.run()
    assert clock.now <= 60 + 1
    assert all(e["running_predicted_bytes"] <= 1000 for e in explorer.events)
    starts = [e for e in explorer.events if e["event"] == "start"]
    assert len(starts) >= 5 and max(e["running_predicted_bytes"] for e in starts) > 300  # trials ran side by side
    assert sum(e["event"] == "start" for e in explorer.events) <= 3 + sum(e["event"] == "stop" for e in explorer.events)
    assert all(r.status in ("complete", "pruned", "infeasible", "failed") for r in records)
    assert all(r.predicted_peak_bytes <= 1000 // 3 for r in records if r.status != "infeasible")


def test_a_measured_peak_above_its_prediction_counts_in_the_front_and_in_the_packing():
    clock = FakeClock()
    explorer = _explorer(clock, runner=FakeRunner(clock, measured_factor=1.5))
    ran = [r for r in explorer.run() if r.rungs]
    assert ran and all(r.peak_bytes == r.objectives()[2] == int(1.5 * r.predicted_peak_bytes) for r in ran)
    starts = [e for e in explorer.events if e["event"] == "start"]
    assert all(e["running_predicted_bytes"] <= e["running_reserved_bytes"] <= 1000 for e in starts)
    assert any(e["running_predicted_bytes"] < e["running_reserved_bytes"] for e in starts)
    lower = [r for r in _explorer(clock, runner=FakeRunner(clock, measured_factor=0.5)).run() if r.rungs]
    assert lower and all(r.peak_bytes == r.objectives()[2] == r.predicted_peak_bytes for r in lower)
    # A running trial reserves its measured peak once that is higher than its prediction.
    record = TrialRecord(0, {}, predicted_peak_bytes=200, rungs=[Rung(0, 10, 1.0, 1.0, 450)])
    candidate = Candidate(0.0, {}, 0)
    candidate.predicted_peak_bytes = 200
    explorer.running = {0: _Running(candidate, record, None, 0.0)}
    assert explorer.reserved_bytes == 450 and explorer.running_predicted_bytes == 200


def test_a_candidate_that_does_not_fit_its_share_goes_down_the_ladder_or_is_infeasible():
    clock = FakeClock()
    explorer = _explorer(clock, memory=90, max_parallel=1)  # share 90: cost 600 -> first_order (37); 2000 -> none
    records = explorer.run()
    chosen = {r.params["cost"]: r.estimator_chosen for r in records if r.status != "infeasible" and r.estimator_chosen}
    assert chosen.get(100) in (None, "checkpoint") and chosen.get(600, "first_order") == "first_order"
    infeasible = [r for r in records if r.status == "infeasible"]
    assert infeasible and all(r.params["cost"] >= 2000 and "nothing fits" in r.error for r in infeasible)
    assert all(r.trial not in [e["trial"] for e in explorer.events] for r in infeasible)  # never started


class SlowPricing(FakeRunner):
    """Pricing takes 4 fake seconds (the planner measures and times real calls)."""

    def __init__(self, clock):
        super().__init__(clock)
        self.priced_at: list[float] = []

    def price(self, candidate, memory_share, excluded):
        self.priced_at.append(self.clock())
        self.clock.now += 4.0
        return super().price(candidate, memory_share, excluded)


def test_the_queue_is_not_priced_past_the_deadline():
    """Admission prices the queue in order while slots are free; past the deadline it stops (before: a 60-s
    sinusoid search's last event came 3.5 s past its deadline, and 20 s past with a slower pricing tried once)."""
    clock = FakeClock()
    runner = SlowPricing(clock)
    explorer = _explorer(clock, runner=runner, time_budget=20, memory=10)  # nothing fits: every candidate is priced
    explorer.started, explorer.deadline, clock.now = 0.0, 20.0, 15.0
    for trial in range(5):
        explorer._push(Candidate(1.0, {"x": 0.5, "cost": 100}, trial))
    explorer._admit()
    assert runner.priced_at == [15.0, 19.0] and len(explorer.queue) == 3


def test_dominated_trials_are_pruned_at_a_rung():
    clock = FakeClock()
    explorer = _explorer(clock, time_budget=200)
    records = explorer.run()
    pruned = [r for r in records if r.status == "pruned" and r.rungs]
    assert pruned, "some trial should have been dominated at a rung"
    dominated = [r for r in pruned if r.error.startswith("dominated")]
    assert dominated
    for record in dominated:
        rung = len(record.rungs) - 1
        peers = [r for r in records if r.at(rung) is not None]
        assert any(dominates(p.objectives(rung), record.objectives(rung)) for p in peers if p is not record)


def test_past_eta_trials_only_the_top_fraction_of_the_front_continues():
    """Once more than eta trials reached a rung, a non-dominated trial also needs a place in the top
    ceil(n / eta) of the front by validation loss; up to eta trials, being non-dominated is enough."""
    explorer = _explorer(FakeClock(), eta=3)
    trade_off = [(float(k), float(6 - k)) for k in range(7)]  # 7 non-dominated (loss, seconds) points
    for trial, (loss, seconds) in enumerate(trade_off):
        explorer.records[trial] = TrialRecord(trial, {}, predicted_peak_bytes=100,
                                              rungs=[Rung(0, 10, loss, seconds, 100)])
    reasons = {t: explorer._pruning_reason(explorer.records[t], explorer.records[t].rungs[0]) for t in range(7)}
    assert [t for t, reason in reasons.items() if reason is None] == [0, 1, 2]  # the lowest losses
    assert all(reasons[t].startswith("outside the top 3 of 7 at rung 0") for t in (3, 4, 5, 6))
    for trial in range(3, 7):
        del explorer.records[trial]
    assert all(explorer._pruning_reason(explorer.records[t], explorer.records[t].rungs[0]) is None for t in range(3))
    explorer.records[9] = TrialRecord(9, {}, predicted_peak_bytes=100, rungs=[Rung(0, 10, 1.5, 5.5, 100)])
    assert explorer._pruning_reason(explorer.records[9], explorer.records[9].rungs[0]) == "dominated at rung 0"


def test_children_inherit_their_parents_rank_as_priority():
    clock = FakeClock()
    study = FakeStudy()
    explorer = _explorer(clock, study=study, time_budget=120)
    explorer.run()
    assert study.children
    for trial, parent, priority in study.children:
        assert priority == 0.0  # only front members breed; their rank is 0
        assert explorer.records[trial].parent == parent
    starts = [explorer.records[e["trial"]] for e in explorer.events if e["event"] == "start"]
    fresh = sum(r.parent is None for r in starts)
    assert fresh >= len(starts) // 2 - 1  # starts alternate: children never crowd out the sampler


def test_guard_trip_retries_one_step_down_the_ladder():
    clock = FakeClock()
    runner = FakeRunner(clock, guard_trips={"full"})
    explorer = _explorer(clock, runner=runner, max_trials=3, memory=3000)
    records = explorer.run()
    retried = [r for r in records if r.retries]
    assert retried and all("full" in r.excluded and r.estimator_chosen != "full" for r in retried)


def test_queue_is_bounded_and_drops_the_lowest_priority():
    queue = CandidateQueue(2)
    assert queue.push(Candidate(1.0, {}, 0)) is None
    assert queue.push(Candidate(0.0, {}, 1)) is None
    dropped = queue.push(Candidate(2.0, {}, 2))
    assert dropped.trial == 2 and [c.trial for c in queue] == [1, 0]
    dropped = queue.push(Candidate(0.0, {}, 3))
    assert dropped.trial == 0 and [c.trial for c in queue] == [1, 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(*(st.integers(0, 5) for _ in range(3))), min_size=1, max_size=25))
def test_front_equals_brute_force(points):
    brute = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    assert pareto_front(points) == brute
    ranks = non_dominated_ranks(points)
    for i, p in enumerate(points):
        assert all(ranks[j] < ranks[i] for j, q in enumerate(points) if dominates(q, p))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12))
def test_hypervolume_matches_a_grid_count(points):
    n = 200
    covered = sum(any(p[0] <= (i + 0.5) / n and p[1] <= (j + 0.5) / n for p in points)
                  for i in range(n) for j in range(n))
    assert hypervolume(points, (1.0, 1.0)) == pytest.approx(covered / n ** 2, abs=0.02)


def test_hypervolume_of_a_box_and_of_points_outside_the_reference():
    assert hypervolume([(0.5, 0.5, 0.5)], (1, 1, 1)) == pytest.approx(0.125)
    assert hypervolume([(2.0, 0.1)], (1, 1)) == 0.0
    assert math.isclose(hypervolume([(0.0, 0.5), (0.5, 0.0)], (1, 1)), 0.75)


class TimedRunner(FakeRunner):
    """A trial's rung ends its meta-steps x its true seconds per meta-step (`params["step"]`) after it was started or
    resumed; admission predicts half of that per meta-step (`predicts=False`: no prediction)."""

    def __init__(self, clock: FakeClock, predicts: bool = True):
        super().__init__(clock)
        self.predicts = predicts

    def price(self, candidate, memory_share, excluded):
        return Price(10, "full", candidate.params["step"] / 2 if self.predicts else None)

    def start(self, candidate, rung_steps):
        self.started.append(candidate.trial)
        return {"c": candidate, "rung": 0, "steps": rung_steps, "waiting": False,
                "due": self.clock() + rung_steps[0] * candidate.params["step"]}

    def poll(self, h):
        if h["waiting"] or self.clock() < h["due"]:
            return []
        r, steps, params = h["rung"], h["steps"][h["rung"]], h["c"].params
        rung = Rung(r, steps, params["x"] + 1 / (r + 1), steps * params["step"], 10)
        h["waiting"] = True
        return [Message("rung", rung)] + ([Message("done")] if r + 1 == len(h["steps"]) else [])

    def resume(self, h):
        h["rung"] += 1
        h["waiting"] = False
        h["due"] = self.clock() + (h["steps"][h["rung"]] - h["steps"][h["rung"] - 1]) * h["c"].params["step"]


class TimedStudy(FakeStudy):
    def ask(self):
        return next(self.count), {"x": self.rng.random(), "step": self.rng.choice([0.1, 0.5, 2.0])}


def _timed_search(predicts: bool) -> tuple[list[TrialRecord], Explorer]:
    clock = FakeClock()
    explorer = _explorer(clock, runner=TimedRunner(clock, predicts), study=TimedStudy(), time_budget=120,
                         max_parallel=2, rung_steps=10, eta=2, rungs=3, children=0)
    return explorer.run(), explorer


def test_a_trial_predicted_to_reach_its_rung_past_the_deadline_does_not_take_a_slot():
    """Admission's seconds per meta-step (here half the truth) are calibrated by the first rungs (ratio 2), so near
    the deadline a candidate whose first rung would end past it is held back and a cheaper one runs instead. Without
    predictions, trials are started that the deadline then stops before their first rung."""
    records, explorer = _timed_search(predicts=True)
    assert explorer.times.ratio == pytest.approx(2.0)
    cut = [r for r in records if "stopped at the deadline before its first rung" in r.error]
    held = [r for r in records if "its first rung was predicted" in r.error]
    assert not cut and held and all(r.status == "pruned" and not r.rungs for r in held)
    late = [e for e in explorer.events if e["event"] == "late"]
    assert late and any(e["event"] == "start" and e["time"] > late[0]["time"] for e in explorer.events)
    unpredicted, _ = _timed_search(predicts=False)
    assert any("stopped at the deadline before its first rung" in r.error for r in unpredicted)


def test_every_rung_reached_is_priced_and_the_report_says_how_well():
    """The fake runner's rung takes its meta-steps x its true seconds per meta-step, nothing else: a later rung
    (priced with the trial's own measured seconds) is predicted exactly; a first rung is predicted at half before
    the first rungs calibrate the ratio, exactly after."""
    from metaopt_hydra.explore.report import rung_price_summary
    _, explorer = _timed_search(predicts=True)
    later = [p.measured_seconds / p.predicted_seconds for p in explorer.rung_prices if not p.first]
    first = [p.measured_seconds / p.predicted_seconds for p in explorer.rung_prices if p.first]
    assert later and all(r == pytest.approx(1.0) for r in later)
    assert first and all(r == pytest.approx(2.0) or r == pytest.approx(1.0) for r in first)
    assert first[0] == pytest.approx(2.0) and first[-1] == pytest.approx(1.0)
    line = rung_price_summary(explorer.rung_prices)
    assert line.startswith("seconds to a rung, measured / predicted: first rungs median ")
    assert f"later rungs median 1.00 (1.00-1.00) over {len(later)}, {len(later)} within 1.25x" in line
    assert rung_price_summary([]).endswith("first rungs: none priced; later rungs: none priced")


def test_admission_holds_back_by_the_calibrated_prediction():
    clock = FakeClock()
    explorer = _explorer(clock, rung_steps=10)
    explorer.started, explorer.deadline = 0.0, 100.0
    explorer.times.observe(1.0, 10, 20.0)  # a trial ran at 2 s per meta-step where 1 s was predicted
    candidate = Candidate(1.0, {}, 0, predicted_peak_bytes=1, predicted_step_seconds=1.0)
    clock.now = 85.0  # 15 s left: its first rung (10 x 1 s x 2) is predicted 20 s away
    assert explorer._first_rung_late(candidate) == pytest.approx((20.0, 15.0))
    clock.now = 75.0
    assert explorer._first_rung_late(candidate) is None
    clock.now = 85.0
    assert explorer._first_rung_late(Candidate(1.0, {}, 1, predicted_peak_bytes=1)) is None  # no prediction


def test_rung_times_calibrate_by_medians():
    times = RungTimes()
    assert times.to_first_rung(None, 10) is None and times.to_first_rung(0.5, 10) == pytest.approx(5.0)
    for predicted, measured, wall in ((1.0, 20.0, 23.0), (1.0, 30.0, 31.0), (2.0, 80.0, 90.0)):
        times.observe(predicted, 10, measured, wall)  # ratios 2, 3, 4; overheads 3, 1, 10
    times.observe(1.0, 30, 100.0, 65.0, train_seconds_before=40.0, first=False)  # a later rung: overhead 5 only
    assert times.ratio == pytest.approx(3.0) and len(times.ratios) == 3
    assert times.to_first_rung(0.5, 10) == pytest.approx(3.0 + 10 * 0.5 * 3.0)
    assert times.to_next_rung(2.0, 20) == pytest.approx(5.0 + 40.0)


def test_a_trials_next_rung_is_priced_with_its_own_validation():
    """Two trials with the same training and start-up but validations of 1 s and 9 s (a 5-way and a 60-way model):
    each one's next rung is priced with its own validation, a new trial's first rung with the median."""
    times = RungTimes()
    times.observe(1.0, 10, 10.0, 14.0, validation_seconds=1.0)
    times.observe(1.0, 10, 10.0, 22.0, validation_seconds=9.0)
    assert times.first_overheads == [3.0, 3.0]  # the validation is not start-up
    assert times.to_first_rung(1.0, 10) == pytest.approx(3.0 + 5.0 + 10.0)
    assert times.to_next_rung(1.0, 10, 1.0) == pytest.approx(3.0 + 1.0 + 10.0)
    assert times.to_next_rung(1.0, 10, 9.0) == pytest.approx(3.0 + 9.0 + 10.0)
    assert times.to_next_rung(1.0, 10) == pytest.approx(3.0 + 5.0 + 10.0)  # no validation of its own: the median


def test_a_trial_whose_next_rung_would_end_past_the_deadline_stops_at_its_rung_as_complete():
    clock = FakeClock()
    runner = TimedRunner(clock)
    explorer = _explorer(clock, runner=runner, rung_steps=10, eta=2, rungs=3)
    explorer.started, explorer.deadline, clock.now = 0.0, 100.0, 50.0
    for trial, left in ((0, 50.0), (1, 15.0)):  # 2 s per meta-step: its next rung (10 more) takes 20 s
        clock.now = explorer.deadline - left
        candidate = Candidate(1.0, {"x": 0.1, "step": 2.0}, trial, predicted_peak_bytes=10)
        record = TrialRecord(trial, candidate.params, status="running", predicted_peak_bytes=10,
                             predicted_step_seconds=1.0)
        explorer.records[trial] = record
        explorer.running[trial] = _Running(candidate, record, runner.start(candidate, explorer.rung_steps),
                                           clock.now - 20.0)
        explorer._handle(trial, Message("rung", Rung(0, 10, 0.1, 20.0, 10)))
    assert 0 in explorer.running and explorer.records[0].status == "running"
    assert 1 not in explorer.running and explorer.records[1].status == "complete"
    assert "its next rung (20 meta-steps) was predicted 20 s away with 15 s left" in explorer.records[1].error
