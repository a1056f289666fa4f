"""The Hydra edge of metaopt: configs in, library objects out, and the records a run leaves behind.

`metaopt` itself never imports Hydra, OmegaConf or wandb; everything that does lives
here, importable (so every launcher, submitit included, finds it) and shared by the
apps under `experiments/`:

  build.py      instantiate tasks, model, loop, meta-parameters, estimator, budget from a config
  checks.py     clear errors before any work (dtype/device, task/model shapes)
  app.py        one training run: threads, resume check, logger, training, records, curves
  records.py    metrics.json (atomic), failure records, what a checkpoint must match to resume
  loggers.py    loggers built from `logger._target_` (none, wandb)
  curves.py     curves.png: meta-train loss and validation metric against meta-step
  baselines.py  learned vs baseline(s) on the same meta-test tasks
  callbacks.py  Hydra callbacks: every failed sweep job with its error
  summary.py    one table for any multirun or explore directory
"""
