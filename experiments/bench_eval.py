"""Benchmark: evaluation planned by time (vmapped pieces or one task at a time) against always vmapped (CPU).

A meta-test evaluation adapts each task and scores its queries: no meta-gradient, but on Omniglot it is a large
share of a run (600 tasks, the 20-way protocols, validation at every explorer rung). `metaopt.evaluation` plans it
as training is planned: vmapped pieces sized to memory, then a vmapped call timed against the same tasks one at
a time, the faster kept (`eval.batching=auto`, the default through `batching: auto`). This bench builds each
problem from its experiment config, plans it both ways (`vmap`: the pieces alone; `auto`: the planner's choice),
and runs the same `--tasks` seeded meta-test tasks with each plan, interleaved, `--repeats` rounds: it prints each
plan's median seconds, the prediction the auto plan made before running, and the speed-up. The per-task losses of
the two plans are compared (largest difference; the same tasks, the same arithmetic up to float rounding).

    python experiments/bench_eval.py [--threads 1] [--repeats 3] [--tasks 100]
        [--problems sinusoid omniglot_5way omniglot_20way omniglot_protonet] [--data-root PATH]

The last line is `speedup_auto_vs_vmap <problem>:<x> ...` (the vmapped plan's median over the auto plan's, same
run). Omniglot problems are skipped, with a line saying so, where the data is not found.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir

from interleaved import begin_cpu_benchmark, interleaved_seconds
from metaopt.evaluation import evaluate, plan_evaluation
from metaopt_hydra.build import build

CONF = Path(__file__).resolve().parents[1] / "conf"
PROBLEMS = {  # name -> overrides of conf/train.yaml (the meta-test as the experiment configures it)
    "sinusoid": ["inner_steps=5"],
    "omniglot_5way": ["experiment=omniglot_maml"],
    "omniglot_20way": ["experiment=omniglot_maml", "task.n_way=20"],
    "omniglot_protonet": ["experiment=omniglot_protonet", "ensemble=1", "task.split_by=alphabet"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--data-root", default=None, help="Omniglot's folder (default: the config's data.root, "
                        "../shared/data/omniglot from the repository root)")
    args = parser.parse_args()
    begin_cpu_benchmark(args.threads, args.repeats)
    print(f"{args.tasks} meta-test tasks per evaluation")
    print(f"| problem | auto's plan | vmapped s | auto s | predicted s (auto) | measured / predicted | speed-up | "
          f"largest loss difference |")
    print("|---|---|---|---|---|---|---|---|")
    speedups = {}
    for name in args.problems:
        root = [f"data.root={args.data_root}"] if args.data_root else []
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            cfg = compose("train", overrides=[*PROBLEMS[name], *root])
        if name.startswith("omniglot") and not Path(cfg.data.root).exists():
            print(f"| {name} | skipped: no Omniglot data at {cfg.data.root} |")
            continue
        parts = build(cfg)
        assert parts.eval_tasks is not None
        common = dict(inner_steps=cfg.eval.inner_steps, batch_size=cfg.eval.batch_size)
        plans = {form: plan_evaluation(parts.loop, parts.meta, parts.eval_tasks, parts.budget, batching=form,
                                       **common) for form in ("vmap", "auto")}
        results = {}

        def run(form: str) -> None:
            results[form] = evaluate(parts.loop, parts.meta, parts.eval_tasks, n_tasks=args.tasks, seed=cfg.eval.seed,
                                     plan=plans[form], return_per_task=True, **common)

        times = interleaved_seconds({form: (lambda f=form: run(f)) for form in plans}, args.repeats)
        vmap_s, auto_s = (statistics.median(times[form]) for form in ("vmap", "auto"))
        predicted = plans["auto"].predicted_seconds(args.tasks) or float("nan")
        gap = (results["vmap"]["task_losses"] - results["auto"]["task_losses"]).abs().max().item()
        speedups[name] = vmap_s / auto_s
        auto = plans["auto"]
        print(f"| {name} | {auto.batching} ({auto.piece} at once) | {vmap_s:.3g} | {auto_s:.3g} | {predicted:.3g} | "
              f"{auto_s / predicted:.2f} | {speedups[name]:.2f}x | {gap:.1e} |", flush=True)
        print(f"  auto: {auto.reason}", flush=True)
    print("speedup_auto_vs_vmap " + " ".join(f"{name}:{x:.2f}" for name, x in speedups.items()))


if __name__ == "__main__":
    main()
