"""Lake et al.'s 20-way one-shot classification runs, on a trained checkpoint.

    python experiments/eval_omniglot_runs.py checkpoint=DIR runs_dir=PATH [support_views=9] [query_views=9]
        [support_tuning_steps=20] [support_tuning_lr=1e-4]

DIR is a training run's directory (experiments/train.py). MAML-style runs adapt on the
20 training images and classify the 20 test items: `inner_steps=N` inner steps; unset, the run's eval.inner_steps,
and at least 20 for a MAML run with a fixed head (`DEFAULT_MAML_INNER_STEPS`). ProtoNets classify by the nearest
prototype. The model must produce 20-way outputs:
a MAML run trained 5-way has a 5-way head and is refused (train it with task.n_way=20);
ProtoNets and Proto-MAML (a head made per task) work at any N. Prints the error per run and, last, `error_rate=<percent>`.
`support_views=V` (1 to 9) classifies with test-time views of each training image, as `Omniglot(support_views=V)`
does for sampled tasks: the image and its V - 1 nearest one-pixel shifts. `query_views=V` likewise shifts every
test item and averages its predictions over the views (`Omniglot(query_views=V)`,
`metaopt.tasks.augment.pooled_views`). Unset: 9 and 9 for every model (`DEFAULT_VIEWS`; a MAML-style run adapts
on the 9 views of each training image); `support_views=1 query_views=1` scores the images alone.
`support_tuning_steps=S` (ProtoNets and their ensembles) fine-tunes the embedding on each run's training images
(their views included) for S Adam steps before it answers (`metaopt.support_tuning`); unset: 20 for a ProtoNet
(`DEFAULT_SUPPORT_TUNING_STEPS`, ~8.5 min for an ensemble of two on one CPU thread), none for other models;
`support_tuning_steps=0` scores without it.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from metaopt import losses, unroll
from metaopt.checkpoint import load_checkpoint
from metaopt.support_tuning import SupportTuning, with_support_tuning
from metaopt.tasks.augment import VIEW_OFFSETS, pooled_views, with_views
from metaopt.tasks.omniglot import load_one_shot_runs
from metaopt_hydra.build import build

WAYS = 20
DEFAULT_VIEWS = 9
"""The views of every image a run is scored with unless told: the image and its 8 one-pixel shifts. A ProtoNet's
prototype and test item are each the mean embedding of theirs (README: +0.9 to +2.4 points within alphabets on
every held-out fold); a MAML-style run adapts on the support's views and averages a test item's logits over its
views (README: +3.4 for MAML, +3.9 for Proto-MAML on the proxy)."""

DEFAULT_SUPPORT_TUNING_STEPS = 20
"""Adam steps (lr `support_tuning_lr`, 1e-4) of test-time support tuning for a ProtoNet or an ensemble of them
unless told (`metaopt.support_tuning`; README: +0.9 points within alphabets on average over the four held-out folds,
-0.2 to +2.0, with the views and the ensemble); models that adapt by their own inner steps are not tuned."""


DEFAULT_MAML_INNER_STEPS = 20
"""The fewest inner steps a run with a fixed N-way head (MAML, FOMAML, MAML with learned inner lrs) adapts with
unless told (`inner_steps=`), at its own inner lr, as Finn et al. (2017) took more steps at test than in training.
README (the MAML contract's recipe on the proxy, trained with one step): 60.5% within alphabets at 1 step, 64.4 at 5,
66.7 at 10, 67.3 at 20 (200 tasks); MAML with learned inner lrs 58.3 at 1, 62.5 at 20. Proto-MAML (a head made per
task) keeps its run's eval.inner_steps: not measured."""


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval_runs")
def main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.checkpoint)
    config_path, checkpoint_path = run_dir / ".hydra" / "config.yaml", run_dir / "checkpoint.pt"
    for path in (config_path, checkpoint_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: checkpoint= must be a run directory of experiments/train.py")
    train_cfg = OmegaConf.load(config_path)
    OmegaConf.resolve(train_cfg)  # freeze the trained shapes (a MAML head keeps its N)
    if "n_way" in train_cfg.loop:
        with open_dict(train_cfg):
            train_cfg.loop.n_way = WAYS  # a ProtoNet (or Proto-MAML) classifies any number of classes
    parts = build(train_cfg, load_tasks=False)
    views = {name: int(cfg[name]) if cfg.get(name) is not None else DEFAULT_VIEWS
             for name in ("support_views", "query_views")}
    for name, count in views.items():
        if not 1 <= count <= len(VIEW_OFFSETS):
            raise ValueError(f"{name}={count} must be between 1 and {len(VIEW_OFFSETS)} (the image and its "
                             "one-pixel shifts)")
    tuning_steps = cfg.support_tuning_steps
    if tuning_steps is None:  # the default: tune where the loop can (ProtoNets and their ensembles)
        tuning_steps = DEFAULT_SUPPORT_TUNING_STEPS if hasattr(parts.loop, "with_support_tuning") else 0
    tuning = SupportTuning(steps=int(tuning_steps), lr=float(cfg.support_tuning_lr))
    loop = with_support_tuning(parts.loop, tuning)  # before any work: a MAML checkpoint cannot tune
    parts.meta.load_state_dict(load_checkpoint(checkpoint_path)["meta"])
    fixed_head = "n_way" not in train_cfg.loop  # MAML; ProtoNets and Proto-MAML make their head per task
    steps = int(cfg.inner_steps if cfg.inner_steps is not None else
                max(train_cfg.eval.inner_steps, DEFAULT_MAML_INNER_STEPS) if fixed_head else train_cfg.eval.inner_steps)
    if steps < 1:
        raise ValueError(f"inner_steps={steps} must be >= 1: the model adapts to (or, a ProtoNet, embeds) each run's "
                         "training images in its inner steps")
    print(f"test-time views: {views['support_views']} of each training image, {views['query_views']} of each test item"
          + (f"; {tuning.steps} steps of support tuning (lr {tuning.lr})" if tuning.steps else "")
          + (f"; inner steps: {steps}" if fixed_head else ""))
    size = train_cfg.task.get("size", 28)
    runs = load_one_shot_runs(cfg.runs_dir, size=size)
    errors = []
    with torch.no_grad():
        if fixed_head:
            start = loop.init(parts.meta)
            outputs = loop.predict(start, runs[0][1].query.x[:1]).shape[-1]
            if outputs != WAYS:
                raise ValueError(f"the checkpoint's model gives {outputs} outputs but the runs are {WAYS}-way: "
                                 f"train it with task.n_way={WAYS} (or use a ProtoNet or Proto-MAML)")
        for name, task in runs:
            support, query = (with_views(task.support[0], views["support_views"]),
                              with_views(task.query, views["query_views"]))
            state = unroll(loop, loop.init(parts.meta), (support,) * steps, parts.meta,
                           create_graph=False)
            logits, answers = pooled_views(loop.predict(state, query.x), query.y, views["query_views"])
            error = 100 * (1 - losses.accuracy(logits, answers).item())
            errors.append(error)
            print(f"{name}: error {error:.1f}%")
    print(f"error_rate={sum(errors) / len(errors):.2f}")


if __name__ == "__main__":
    main()
