"""The Omniglot table: trained runs on three protocols beside the published numbers.

    bash experiments/omniglot_runs.sh outputs/omniglot        # the training runs (one CPU thread each)
    python experiments/omniglot_table.py outputs/omniglot [--n-tasks 600] [--data-root PATH] [--folds]
        [--protocols "20-way within alphabet"] [--support-views 9] [--query-views 9] [--support-tuning-steps 20]

Every run directory under the given folder (its .hydra/config.yaml and checkpoint.pt) is
evaluated on the held-out alphabets at 1 shot, 600 seeded tasks (95% CI over tasks), on:
random 5-way and 20-way tasks (15 queries per class), and Lake et al.'s within-alphabet
20-way protocol (all 20 characters from one alphabet, unrotated, support and queries drawn
by different people; 5 queries per class). MAML-style runs are scored where their head
has the protocol's N; ProtoNets on all three. On the same tasks, a non-learned reference:
nearest neighbour on pixels (Euclidean). Prints a markdown table. With --folds (runs that hold out
different alphabets, experiments/omniglot_folds_runs.sh), a row per fold with the pixel reference on
that fold's own tasks, and the mean and standard deviation over folds. --protocols scores some columns only;
--support-views V evaluates with test-time views (every support image with its V - 1 nearest one-pixel shifts,
`Omniglot(support_views=V)`: the same seeded tasks otherwise, so columns compare task by task); --query-views V
shifts every query alike and averages its predictions over the views (`Omniglot(query_views=V)`);
--support-tuning-steps S fine-tunes a ProtoNet's embedding on each task's support for S Adam steps before it
answers (`metaopt.support_tuning`; ~0.5 s per step and task on one thread with 9 views; other runs are skipped);
--inner-steps N adapts every task with N inner steps instead of the run's eval.inner_steps (MAML-style runs);
--support-tuning-gain prints, instead of the table, each run without and with it on the same tasks and the paired gain.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import cast

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from metaopt.checkpoint import load_checkpoint
from metaopt.support_tuning import SupportTuning, with_support_tuning
from metaopt.tasks import TaskDistribution
from metaopt.tasks.augment import pooled_views
from metaopt.train import evaluate, mean_ci95
from metaopt_hydra.build import Parts, build, eval_batching

# Published full-background results (30 background alphabets), 5-way / 20-way 1-shot accuracy in %.
PUBLISHED = {
    "omniglot_maml": (98.7, 95.8),            # Finn et al. 2017
    "omniglot_fomaml": (98.3, 89.4),          # Finn et al. 2017
    "omniglot_protonet": (98.8, 96.0),        # Snell et al. 2017
    "omniglot_maml_learned_lr": (None, None),  # CS330 HW2's option; no published figure
    "omniglot_protomaml": (None, None),        # Triantafillou et al. 2020 report Meta-Dataset, not these tasks
}


def pixel_nearest_neighbour(tasks: TaskDistribution, n_tasks: int, seed: int,
                            batch_size: int) -> tuple[float, float]:
    """Accuracy (mean, 95% CI over tasks) of 1-nearest-neighbour on raw pixels, on the seeded tasks
    that `metaopt.train.evaluate` draws with the same seed and batch size: a query goes to the class of its
    nearest support image (with query views, the class whose nearest support image is nearest on average over
    the query's views, `pooled_views`)."""
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for start in range(0, n_tasks, batch_size):
        batch = tasks.sample(min(batch_size, n_tasks - start), 1, generator)
        support, query = batch.support[0], batch.query
        distances = torch.cdist(query.x.flatten(2), support.x.flatten(2))  # [B, n_query, n_support]
        classes = int(support.y.max()) + 1
        nearest = torch.full((*distances.shape[:2], classes), torch.inf, dtype=distances.dtype)
        nearest = nearest.scatter_reduce(2, support.y.unsqueeze(1).expand_as(distances), distances, "amin")
        closeness, answers = pooled_views(-nearest, query.y, tasks.query_views)  # [B, Q, classes], [B, Q]
        scores.append((closeness.argmax(-1) == answers).to(torch.float64).mean(-1))
    return mean_ci95(torch.cat(scores))


PROTOCOLS = {  # column -> overrides of the run's eval.task
    "5-way": {"n_way": 5, "k_shot": 1, "k_query": 15},
    "20-way": {"n_way": 20, "k_shot": 1, "k_query": 15},
    "20-way within alphabet": {"n_way": 20, "k_shot": 1, "k_query": 5, "rotations": False, "within_alphabet": True,
                               "drawer_split": True},
}


def load_run(run_dir: Path, overrides: dict, data_root: str | None,
             inner_steps: int | None = None) -> tuple[DictConfig, Parts]:
    """The trained run's config and parts (its meta-parameters loaded), its meta-test tasks given `overrides`
    (a loop that knows its number of classes widened to theirs), `inner_steps` at meta-test if given (else the
    run's eval.inner_steps)."""
    cfg = cast(DictConfig, OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    OmegaConf.resolve(cfg)
    with open_dict(cfg):
        if data_root:
            cfg.data.root = cfg.task.root = data_root
        cfg.eval.task = {**cfg.eval.task, **overrides}
        cfg.eval.val_task = cfg.eval.task
        cfg.eval.n_tasks = max(int(cfg.eval.n_tasks), 1)  # trained with eval.n_tasks=0: still scored here
        if inner_steps is not None:
            cfg.eval.inner_steps = inner_steps
        if "n_way" in cfg.loop:
            cfg.loop.n_way = max(int(cfg.loop.n_way), overrides["n_way"])
    parts = build(cfg)
    if parts.eval_tasks is None:
        raise LookupError(f"{run_dir}: no held-out tasks to score ({parts.meta_test_skipped}); train it with "
                          "held-out alphabets (task.split_by=alphabet) or pass --data-root with images_evaluation")
    parts.meta.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["meta"])
    return cfg, parts


def evaluate_run(run_dir: Path, overrides: dict, n_tasks: int, data_root: str | None,
                 tuning: SupportTuning | None = None,
                 inner_steps: int | None = None) -> tuple[tuple[float, float], TaskDistribution, int, int]:
    """The run's accuracy (mean, CI) on eval tasks with `overrides`, the tasks it used, their seed and batch size;
    a ProtoNet (or an ensemble of them) fine-tuned on each task's support first with `tuning`; `inner_steps`
    adaptation steps per task if given (else the run's eval.inner_steps)."""
    cfg, parts = load_run(run_dir, overrides, data_root, inner_steps)
    assert parts.eval_tasks is not None
    batch_size = cfg.eval.get("batch_size", 20)
    try:
        loop = with_support_tuning(parts.loop, tuning)
    except ValueError as error:
        raise LookupError(f"{run_dir}: {error}") from None
    batching = "loop" if loop is not parts.loop else eval_batching(cfg)  # a tuning conv4 is faster task by task
    metrics = evaluate(loop, parts.meta, parts.eval_tasks, n_tasks=n_tasks, inner_steps=cfg.eval.inner_steps,
                       seed=cfg.eval.seed, batching=batching, batch_size=batch_size)
    return (metrics["test_accuracy"], metrics["test_accuracy_ci95"]), parts.eval_tasks, cfg.eval.seed, batch_size


def tuning_gain(run_dir: Path, overrides: dict, n_tasks: int, data_root: str | None,
                tuning: SupportTuning) -> dict[str, tuple[float, float]]:
    """A ProtoNet run's accuracy on the same seeded tasks without and with support `tuning` (both task by task)
    and the gain, paired: {"untuned", "tuned", "gain"} -> (mean, 95% CI; the gain's over per-task differences)."""
    cfg, parts = load_run(run_dir, overrides, data_root)
    accuracies = [evaluate(loop, parts.meta, parts.eval_tasks, n_tasks=n_tasks, inner_steps=cfg.eval.inner_steps,
                           seed=cfg.eval.seed, batching="loop", batch_size=cfg.eval.get("batch_size", 20),
                           return_per_task=True)["task_accuracies"]
                  for loop in (parts.loop, with_support_tuning(parts.loop, tuning))]
    return {"untuned": mean_ci95(accuracies[0]), "tuned": mean_ci95(accuracies[1]),
            "gain": mean_ci95(accuracies[1] - accuracies[0])}


def finished_runs(runs: Path) -> list[Path]:
    """The run directories under `runs` that finished: their config, checkpoint.pt and metrics.json."""
    return [config.parents[1] for config in sorted(runs.glob("*/.hydra/config.yaml"))
            if (config.parents[1] / "checkpoint.pt").exists() and (config.parents[1] / "metrics.json").exists()]


def score_runs(runs: Path, n_tasks: int, data_root: str | None, per_run_reference: bool,
               protocols: dict[str, dict] = PROTOCOLS, tuning: SupportTuning | None = None,
               inner_steps: int | None = None) -> tuple[list, dict]:
    """Every finished run under `runs` on the protocols: rows (name, trained N, meta-steps, training minutes,
    threads, {column: (mean, CI)}, test alphabets, {column: pixel-NN (mean, CI)}) and pixel nearest neighbour on
    the first run's tasks ({column: (mean, CI)}; with `per_run_reference`, on every run's own tasks, in its row)."""
    rows, nn_ref = [], {}
    for run_dir in finished_runs(runs):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        name = next((o.split("=", 1)[1] for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
                     if o.startswith("experiment=")), "?")
        prototypes = "n_way" in cfg.loop
        results, own_ref, alphabets = {}, {}, []
        try:
            for column, overrides in protocols.items():
                if not prototypes and overrides["n_way"] != int(cfg.task.n_way):
                    continue  # a MAML head answers its own N only
                results[column], tasks, seed, batch_size = evaluate_run(run_dir, overrides, n_tasks, data_root, tuning,
                                                                      inner_steps)
                alphabets = sorted(set(alphabets) | set(getattr(tasks, "alphabets", [])))
                if per_run_reference:
                    own_ref[column] = pixel_nearest_neighbour(tasks, n_tasks, seed, batch_size)
                elif column not in nn_ref:  # the same seeded tasks as the runs (same split settings assumed)
                    nn_ref[column] = pixel_nearest_neighbour(tasks, n_tasks, seed, batch_size)
        except LookupError as skipped:
            print(f"skipped: {skipped}", file=sys.stderr)
            continue
        rows.append((f"{name} ({run_dir.name})", int(cfg.task.n_way), metrics.get("meta_steps"),
                     metrics.get("train_seconds", 0) / 60, metrics.get("threads", "?"), results, alphabets, own_ref))
    if not rows:
        raise SystemExit(f"no finished runs (checkpoint.pt + metrics.json) under {runs}")
    return rows, nn_ref


def cell(value: tuple[float, float] | None) -> str:
    return "—" if value is None else f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"


def error(value: tuple[float, float] | None) -> str:
    return "—" if value is None else f"{100 * (1 - value[0]):.1f}"


WITHIN = "20-way within alphabet"


def print_table(rows: list, nn_ref: dict) -> None:
    print("| run | trained N-way | meta-steps | training (threads) | 5-way (%) | 20-way (%) | 20-way within alphabet "
          "(%) | within-alphabet error (%) | published 5 / 20 (30 alphabets) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, trained, steps, minutes, threads, results, _, _ in rows:
        published = PUBLISHED.get(name.split(" ")[0], (None, None))
        pub = " / ".join("—" if p is None else f"{p}" for p in published)
        print(f"| {name} | {trained} | {steps} | {minutes:.0f} min ({threads}) | {cell(results.get('5-way'))} | "
              f"{cell(results.get('20-way'))} | {cell(results.get(WITHIN))} | {error(results.get(WITHIN))} | {pub} |")
    print(f"| pixel nearest neighbour | — | 0 | 0 | {cell(nn_ref.get('5-way'))} | {cell(nn_ref.get('20-way'))} | "
          f"{cell(nn_ref.get(WITHIN))} | {error(nn_ref.get(WITHIN))} | — |")


def print_folds(rows: list) -> None:
    """One row per fold (its own test alphabets and pixel nearest neighbour on its own tasks), then the mean
    and the standard deviation over folds of each column."""
    print("| fold (test alphabets) | meta-steps | training (threads) | 5-way (%) | 20-way (%) | 20-way within alphabet "
          "(%) | within-alphabet error (%) | pixel NN within-alphabet error (%) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _, steps, minutes, threads, results, alphabets, own_ref in rows:
        print(f"| {name.split(' ')[-1].strip('()')} ({', '.join(alphabets)}) | {steps} | {minutes:.0f} min "
              f"({threads}) | {cell(results.get('5-way'))} | {cell(results.get('20-way'))} | "
              f"{cell(results.get(WITHIN))} | {error(results.get(WITHIN))} | {error(own_ref.get(WITHIN))} |")

    def spread(values: list[float]) -> str:
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else float("nan")
        return f"{100 * mean:.1f} (sd {100 * std:.1f})"

    def column(key: str, of: int = 5, errors: bool = False) -> str:
        values = [(1 - r[of][key][0]) if errors else r[of][key][0] for r in rows if key in r[of]]
        return spread(values) if values else "—"

    print(f"| **mean over {len(rows)} folds** | | | {column('5-way')} | {column('20-way')} | {column(WITHIN)} | "
          f"{column(WITHIN, errors=True)} | {column(WITHIN, of=7, errors=True)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--n-tasks", type=int, default=600)
    parser.add_argument("--data-root", default=None, help="override the runs' data.root")
    parser.add_argument("--folds", action="store_true",
                        help="the runs are cross-validation folds (different test alphabets): a row per fold with "
                             "its own pixel nearest neighbour, then the mean and sd over folds")
    parser.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS),
                        help="the columns to score (default: all)")
    parser.add_argument("--support-views", type=int, default=1,
                        help="test-time views of every support image: itself and its nearest one-pixel shifts "
                             "(1 to 9; Omniglot's support_views; default 1: none)")
    parser.add_argument("--query-views", type=int, default=1,
                        help="test-time views of every query, its predictions averaged over them (1 to 9; "
                             "Omniglot's query_views; default 1: none)")
    parser.add_argument("--support-tuning-steps", type=int, default=0,
                        help="ProtoNets: Adam steps of test-time fine-tuning on each task's support "
                             "(metaopt.support_tuning; default 0: none; other runs are skipped)")
    parser.add_argument("--support-tuning-lr", type=float, default=SupportTuning.lr)
    parser.add_argument("--inner-steps", type=int, default=None,
                        help="adaptation steps per task at meta-test (MAML-style runs; default: each run's "
                             "eval.inner_steps)")
    parser.add_argument("--support-tuning-gain", action="store_true",
                        help="instead of the table: each ProtoNet run on each protocol without and with the support "
                             "tuning, on the same tasks, and the paired gain")
    args = parser.parse_args()
    tuning = SupportTuning(steps=args.support_tuning_steps, lr=args.support_tuning_lr)
    protocols = {name: {**PROTOCOLS[name], "support_views": args.support_views, "query_views": args.query_views}
                 for name in args.protocols}
    if args.support_tuning_gain:
        if not tuning.steps:
            raise SystemExit("--support-tuning-gain needs --support-tuning-steps > 0")
        print("| run | protocol | untuned (%) | tuned (%) | gain, paired (points) |\n|---|---|---|---|---|")
        for run_dir in finished_runs(args.runs):
            for name, overrides in protocols.items():
                result = tuning_gain(run_dir, overrides, args.n_tasks, args.data_root, tuning)
                print(f"| {run_dir.name} | {name} | {cell(result['untuned'])} | {cell(result['tuned'])} | "
                      f"{100 * result['gain'][0]:+.2f} ± {100 * result['gain'][1]:.2f} |", flush=True)
        return
    rows, nn_ref = score_runs(args.runs, args.n_tasks, args.data_root, per_run_reference=args.folds,
                              protocols=protocols, tuning=tuning, inner_steps=args.inner_steps)
    if args.folds:
        print_folds(rows)
    else:
        print_table(rows, nn_ref)


if __name__ == "__main__":
    main()
