"""Benchmark: predicted vs measured peak memory of every estimator (metaopt.planning).

For each problem, T and estimator: the prediction (`Predictor.predict`: the estimator
measured on the task cut to a few inner steps, extrapolated with its growth law in T)
against the measured peak of the real call at T (`metaopt.memory.measure_peak_memory`,
after one warm-up call). Both are per task, task by task ("loop"); one row per problem
also checks a vmapped batch of 8 tasks under `full`.

"measured" on CPU is the process's peak resident set size above its level before the
call, after returning freed heap memory to the OS (malloc_trim) and resetting the peak
(see metaopt/memory.py; experiments/bench_memory.py checks it against fresh processes).
On CUDA it is torch.cuda.max_memory_allocated.

    OMP_NUM_THREADS=1 python experiments/bench_budget.py [--problems sinusoid conv4]
    OMP_NUM_THREADS=1 python experiments/bench_budget.py --problems conv4 --steps 10 1000 --estimators implicit forward
"""
from __future__ import annotations

import argparse

import torch

import metaopt as mo
from metaopt import estimators as E
from metaopt.guard import format_bytes
from metaopt.memory import measure_peak_memory
from metaopt.planning import Predictor, describe
from metaopt.train import task_to

PROBLEMS = {
    # name: (model, task distribution, inner lr, grid of T)
    "sinusoid": (lambda: mo.MLP(1, (40, 40), 1), lambda: mo.Sinusoid(k_shot=10), 0.01, [10, 100, 1000]),
    "conv4": (lambda: mo.Conv4(out_features=5, channels=32), lambda: mo.RandomPatterns(n_way=5, k_shot=1), 0.1,
              [10, 100]),
}


def estimators() -> list[E.AbstractEstimator]:
    return [E.Full(), E.Checkpoint(), E.Truncated(k=10), E.Implicit(), E.ForwardMode(mode="random"),
            E.FirstOrder(), E.Reptile(), E.EvolutionStrategies(population=4), E.PersistentES(population=4, k=10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, nargs="+", help="grid of T (default: the problem's)")
    parser.add_argument("--estimators", nargs="+", help="registry names to keep (default: all)")
    args = parser.parse_args()
    print(f"{'problem':<9} {'T':>5} {'estimator':<28} {'predicted':>10} {'measured':>10} {'pred/meas':>9}")
    for name in args.problems:
        make_model, make_tasks, lr, grid = PROBLEMS[name]
        torch.manual_seed(0)
        model = make_model().to(args.device)
        distribution = make_tasks()
        loop = mo.InnerLoop(model, mo.optim.sgd(lr=lr), distribution.loss_fn, proximal=1.0)
        meta = mo.meta_params(mo.Init(model))
        for steps in args.steps or grid:
            batch = distribution.sample(8, steps, torch.Generator().manual_seed(steps))
            batch = task_to(batch, args.device)
            predictor = Predictor(loop, meta, batch, args.device)
            one = mo.unstack_tasks(batch)[:1]
            rows = [(e, 1) for e in estimators()] + [(E.Full(), 8)]
            if args.estimators:
                rows = [(e, n) for e, n in rows if e.name in args.estimators]
            for estimator, n in rows:
                if n > 1 and steps > 100:
                    continue  # 8 full graphs of 1000 steps: minutes, and the per-task rows already show the law
                predicted = predictor.predict(estimator, n)
                tasks, batching = (one, "loop") if n == 1 else (batch, "vmap")
                estimator(loop, meta, tasks, batching=batching)  # warm-up
                with measure_peak_memory(args.device) as memory:
                    estimator(loop, meta, tasks, batching=batching)
                label = describe(estimator) + ("" if n == 1 else f" x{n} vmap")
                ratio = predicted / memory.peak_bytes if memory.peak_bytes else float("nan")
                print(f"{name:<9} {steps:>5} {label:<28} {format_bytes(predicted):>10} "
                      f"{format_bytes(memory.peak_bytes):>10} {ratio:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
