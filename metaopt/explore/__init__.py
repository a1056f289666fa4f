"""The budgeted explorer's engine: what no search library does (Optuna supplies sampling and storage).

  pareto.py     dominance, non-dominated ranks, the front, hypervolume
  queue.py      the bounded priority queue (a child inherits its parent's rank as its priority)
  scheduler.py  admission by predicted memory (first fit), rungs of meta-steps with multi-objective
                successive halving, the global deadline, and the event log; trials run through an
                injected `TrialRunner`, so tests drive it with tiny objectives and a fake clock
  timing.py     seconds to a trial's next rung: the planner's timed probes, calibrated by the rungs run

No Hydra and no Optuna imports here: `metaopt_hydra.explore` connects them.
"""
from metaopt.explore.pareto import dominates, hypervolume, non_dominated_ranks, pareto_front
from metaopt.explore.queue import Candidate, CandidateQueue
from metaopt.explore.scheduler import Explorer, Price, Rung, TrialRecord, TrialRunner
from metaopt.explore.timing import RungTimes

__all__ = ["dominates", "non_dominated_ranks", "pareto_front", "hypervolume", "Candidate", "CandidateQueue",
           "Explorer", "TrialRunner", "TrialRecord", "Rung", "Price", "RungTimes"]
