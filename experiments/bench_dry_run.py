"""Benchmark: how well does `dry_run=true` price a run? (CPU, wall clock.)

For each problem, `experiments/train.py ... dry_run=true` prices the run (`metaopt_hydra.dry_run`: a few timed
meta-steps, the evaluations planned), then the same run trains for real, one after the other, each alone on
`--threads` threads. Printed per problem: the predicted and the measured seconds of training, of the evaluations
after it and of the whole run (the dry run's set-up included), and measured / predicted.

    python experiments/bench_dry_run.py [--threads 1] [--problems sinusoid omniglot_5way omniglot_protonet]
        [--data-root PATH] [--out DIR]

The last line is `dry_run_measured_over_predicted <problem>:<whole run's ratio> ...`. Omniglot problems are
skipped, with a line saying so, where the data is not found. Wall-clock figures vary with the machine's load.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_job_limit import data_root, run_train

PROBLEMS = {  # name -> overrides of conf/train.yaml (sized to minutes)
    "sinusoid": [],
    "omniglot_5way": ["experiment=omniglot_maml", "meta_steps=200"],
    "omniglot_protonet": ["experiment=omniglot_protonet", "ensemble=1", "task.split_by=alphabet",
                          "task.val_alphabets=1", "meta_steps=300"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--data-root", default=None, help="Omniglot's folder (default: the config's data.root)")
    parser.add_argument("--out", default=None, help="run directories (default: a temporary folder)")
    parser.add_argument("--meta-steps", type=int, default=None, help="every problem's meta_steps (a smoke run)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_dry_run."))
    print(f"one run at a time, {args.threads} thread(s); run directories under {out}")
    print("| problem | meta-steps | training s (predicted / measured) | after training s (predicted / measured) | "
          "whole run s (predicted / measured) | measured / predicted |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for name in args.problems:
        overrides = PROBLEMS[name] + ([f"data.root={args.data_root}"] if args.data_root else []) + \
            ([f"meta_steps={args.meta_steps}"] if args.meta_steps else [])
        if name.startswith("omniglot") and not data_root(overrides).exists():
            print(f"| {name} | skipped: no Omniglot data at {data_root(overrides)} |")
            continue
        priced = run_train([*overrides, "dry_run=true"], out / f"{name}_dry", args.threads, "dry_run.json")
        ran = run_train([*overrides, "job_time_limit=1d"], out / name, args.threads)  # the limit records the times
        after = sum(s for s in priced["predicted_evaluations"].values() if s is not None)
        whole = ran["job_seconds"]
        ratios[name] = whole / priced["predicted_run_seconds"]
        print(f"| {name} | {ran['meta_steps']} | {priced['predicted_train_seconds']:.1f} / {ran['train_seconds']:.1f} "
              f"| {after:.1f} / {ran['job_after_training_seconds']:.1f} | {priced['predicted_run_seconds']:.1f} / "
              f"{whole:.1f} | {ratios[name]:.2f} |", flush=True)
    print("dry_run_measured_over_predicted " + " ".join(f"{k}:{v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
