"""The budgeted explorer's Hydra and Optuna side (the engine is `metaopt.explore`).

  search.py   search spaces (conf/search/*.yaml) as Optuna distributions; children
  study.py    the Optuna study (journal file by default, any storage URL) behind the engine's `Study`
  runner.py   pricing trials with the planner, and running them in worker processes, rung by rung
  worker.py   the worker process: one trial's rungs, reported through a pipe
  report.py   pareto.csv, front.md, pareto.png, best/*.yaml
  app.py      `experiments/explore.py`: one explorer worker from a config
"""
