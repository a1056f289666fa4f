"""Benchmark: how well does `dry_run=true` price a run? (CPU, wall clock.)

For each problem, `experiments/train.py ... dry_run=true` prices the run (`metaopt_hydra.dry_run`: a few timed
meta-steps, the evaluations planned), then the same run trains for real, one after the other, each alone on
`--threads` threads. Printed per problem: the predicted and the measured seconds of training, of the evaluations
after it and of the whole run (the dry run's set-up included), and measured / predicted.

    python experiments/bench_dry_run.py [--threads 1] [--problems sinusoid omniglot_5way omniglot_protonet]
        [--data-root PATH] [--out DIR]   (also: learned_optimizer, with a baselines comparison)

The last line is `dry_run_measured_over_predicted <problem>:<whole run's ratio> ...`. Omniglot problems are
skipped, with a line saying so, where the data is not found. Wall-clock figures vary with the machine's load.
"""
from __future__ import annotations

from bench_job_limit import out_dir, problem_overrides, run_train, runs_parser

PROBLEMS = {  # name -> overrides of conf/train.yaml (sized to minutes)
    "sinusoid": [],
    "omniglot_5way": ["experiment=omniglot_maml", "meta_steps=200"],
    "omniglot_protonet": ["experiment=omniglot_protonet", "ensemble=1", "task.split_by=alphabet",
                          "task.val_alphabets=1", "meta_steps=300"],
    # compare: 10 untrained baselines validated, one meta-trained; the learned and the selected one meta-tested
    "learned_optimizer": ["experiment=learned_optimizer", "meta_steps=100"],
}


def main() -> None:
    parser = runs_parser(__doc__ or "", list(PROBLEMS), "bench_dry_run.")
    parser.add_argument("--meta-steps", type=int, default=None, help="every problem's meta_steps (a smoke run)")
    args = parser.parse_args()
    out = out_dir(args)
    print("| problem | meta-steps | training s (predicted / measured) | after training s (predicted / measured) | "
          "whole run s (predicted / measured) | measured / predicted |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for name in args.problems:
        overrides = problem_overrides(name, PROBLEMS[name] + ([f"meta_steps={args.meta_steps}"] if args.meta_steps
                                                               else []), args)
        if overrides is None:
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
