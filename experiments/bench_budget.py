"""Benchmark: predicted vs measured peak memory of every estimator, of chunked plans, and of `auto` under budgets.

Three memory tables and one of time (CPU: peak RSS above the level before the call, after returning freed heap
memory to the OS; CUDA: torch.cuda.max_memory_allocated; see metaopt/memory.py):

1. estimators: each estimator on one task (task by task) and `full` on a vmapped batch of 8:
   `Predictor.predict` (the estimator measured on the task cut to a few inner steps,
   extrapolated with its growth law in T) against the real call at T, after one warm-up call.
2. chunks: `full` on 25 tasks in vmapped chunks of 1, 6 and 25 (sinusoid T = 100 and 200,
   conv4 T = 10): the prediction of the whole chunked call against the call as it runs.
3. budgets: `meta_train` for 2 meta-steps under budgets of 1/2, 1/3 and 1/10 of full's
   measured need, with estimator=full and estimator=auto, in vmapped chunks (`--batching stacked`: stacked):
   the plan's prediction against the measured peak of the meta-steps (every chunk, forward and backward, the
   optimizer step), and whether the measured peak stayed under the budget (or the plan was refused before work).

4. seconds (on request): a chunk's predicted wall-clock seconds (`Predictor.predict_seconds`, what a time budget
   is planned by) against the median of 5 calls of it at T, for each estimator, one task alone and 8 tasks in one
   batched chunk (as `batching=auto` runs them).

    OMP_NUM_THREADS=1 python experiments/bench_budget.py [--tables estimators chunks budgets seconds] [--problems ...]
        [--batching vmap|stacked]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import metaopt as mo
from metaopt import estimators as E
from metaopt.guard import format_bytes
from metaopt.memory import measure_peak_memory
from metaopt.planning import Predictor, describe
from metaopt.train import task_to

PROBLEMS = {
    # name: (model, task distribution, inner lr, grid of T, T of the chunk and budget tables)
    "sinusoid": (lambda: mo.MLP(1, (40, 40), 1), lambda: mo.Sinusoid(k_shot=10), 0.01, [10, 100, 1000], [100, 200]),
    "conv4": (lambda: mo.Conv4(out_features=5, channels=32), lambda: mo.RandomPatterns(n_way=5, k_shot=1), 0.1,
              [10, 100], [10]),
}


def estimators() -> list[E.AbstractEstimator]:
    return [E.Full(), E.Checkpoint(), E.Truncated(k=10), E.Implicit(), E.ForwardMode(mode="random"),
            E.FirstOrder(), E.Reptile(), E.EvolutionStrategies(population=4), E.PersistentES(population=4, k=10)]


def _ratio(predicted: int, measured: int) -> str:
    return f"{predicted / measured:>9.2f}" if measured > 0 else f"{'nan':>9}"


def _setup(name: str, device: str):
    make_model, make_tasks, lr, _, _ = PROBLEMS[name]
    torch.manual_seed(0)
    model = make_model().to(device)
    distribution = make_tasks()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=lr), distribution.loss_fn, proximal=1.0)
    return model, distribution, loop, mo.meta_params(mo.Init(model))


def estimator_table(name: str, args: argparse.Namespace) -> None:
    _, distribution, loop, meta = _setup(name, args.device)
    for steps in args.steps or PROBLEMS[name][3]:
        batch = task_to(distribution.sample(8, steps, torch.Generator().manual_seed(steps)), args.device)
        predictor = Predictor(loop, meta, batch, args.device)
        one = mo.unstack_tasks(batch)[:1]
        rows = [(e, 1) for e in estimators()] + [(E.Full(), 8)]
        if args.estimators:
            rows = [(e, n) for e, n in rows if e.name in args.estimators]
        for estimator, n in rows:
            if n > 1 and steps > 100:
                continue  # 8 full graphs of 1000 steps: minutes, and the per-task rows already show the law
            predicted = predictor.predict(estimator, n, n)
            tasks, batching = (one, "loop") if n == 1 else (batch, "vmap")
            estimator(loop, meta, tasks, batching=batching)  # warm-up
            with measure_peak_memory(args.device) as memory:
                estimator(loop, meta, tasks, batching=batching)
            label = describe(estimator) + ("" if n == 1 else f" x{n} vmap")
            print(f"{name:<9} {steps:>5} {label:<28} {format_bytes(predicted):>10} "
                  f"{format_bytes(memory.peak_bytes):>10} {_ratio(predicted, memory.peak_bytes)}", flush=True)


def chunk_table(name: str, args: argparse.Namespace) -> None:
    _, distribution, loop, meta = _setup(name, args.device)
    for steps in PROBLEMS[name][4]:
        batch = task_to(distribution.sample(25, steps, torch.Generator().manual_seed(steps)), args.device)
        predictor = Predictor(loop, meta, batch, args.device)
        for chunk in (1, 6, 25):
            predicted = predictor.predict(E.Full(), 25, chunk)
            batching = "loop" if chunk == 1 else "vmap"
            E.Full()(loop, meta, batch, batching=batching, chunk_size=chunk)  # warm-up
            with measure_peak_memory(args.device) as memory:
                E.Full()(loop, meta, batch, batching=batching, chunk_size=chunk)
            print(f"{name:<9} {steps:>5} {f'full(), 25 tasks, chunks of {chunk}':<32} {format_bytes(predicted):>10} "
                  f"{format_bytes(memory.peak_bytes):>10} {_ratio(predicted, memory.peak_bytes)}", flush=True)


def seconds_table(name: str, args: argparse.Namespace) -> None:
    """`Predictor.predict_seconds` (a chunk timed at 16 and 64 inner steps, median of 3, extrapolated to T) against
    the median of 5 calls of that chunk at T (after a warm-up): one task alone, and 8 tasks in one batched chunk.
    Then the free figure the explorer prices time with, `Predictor.probed_seconds` (the memory probes' calls, timed
    once each), and its ratio to the same median."""
    _, distribution, loop, meta = _setup(name, args.device)
    for steps in args.steps or PROBLEMS[name][4]:
        batch = task_to(distribution.sample(8, steps, torch.Generator().manual_seed(steps)), args.device)
        predictor = Predictor(loop, meta, batch, args.device)
        tasks = mo.unstack_tasks(batch)
        for estimator in estimators():
            if args.estimators and estimator.name not in args.estimators:
                continue
            for chunk in (1, 8):
                predicted = predictor.predict_seconds(estimator, chunk)
                call_tasks = tasks[:1] if chunk == 1 else batch
                batching = "loop" if chunk == 1 else "auto"
                estimator(loop, meta, call_tasks, batching=batching)  # warm-up
                measured = statistics.median(_seconds(lambda: estimator(loop, meta, call_tasks, batching=batching),
                                                      args.device) for _ in range(5))
                label = describe(estimator) + ("" if chunk == 1 else f" x{chunk} {batching}")
                predictor.predict(estimator, chunk, chunk)  # the memory probes, timed as they run
                probed = predictor.probed_seconds(estimator, chunk, chunk) or math.nan
                print(f"{name:<9} {steps:>5} {label:<40} {predicted:>10.4f} {measured:>10.4f} "
                      f"{predicted / measured:>9.2f} {probed:>10.4f} {probed / measured:>9.2f}", flush=True)


def _seconds(call, device: str) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _train(name: str, args: argparse.Namespace, estimator, steps: int, budget: mo.Budget) -> dict:
    _, distribution, loop, meta = _setup(name, args.device)
    return mo.meta_train(loop, meta, estimator, distribution, outer_optimizer=torch.optim.Adam(meta.parameters()),
                         meta_steps=2, meta_batch_size=25, inner_steps=steps, budget=budget, eval_n_tasks=0,
                         progress=False, device=args.device,
                         batching=args.batching)  # chunk plans by memory alone: under "auto" the planner also times
                                                  # the tasks one at a time and may run them so (conv4 on the CPU)


def budget_table(name: str, args: argparse.Namespace) -> None:
    for steps in PROBLEMS[name][4]:
        need = _train(name, args, E.Full(), steps, mo.Budget())["measured_peak_bytes"]
        for fraction in (2, 3, 10):
            budget = mo.Budget(memory=need // fraction)
            for estimator in (E.Full(), mo.Auto()):
                try:
                    m = _train(name, args, estimator, steps, budget)
                except mo.BudgetExceeded as refused:
                    print(f"{name:<9} {steps:>5} {f'1/{fraction}':>6} {format_bytes(budget.memory):>9} "
                          f"{estimator.name:<6} refused before any work: {str(refused)[:70]}...", flush=True)
                    continue
                plan = f"{m['estimator_config']} {m['batching']} x{m['chunk_size']}"
                under = "yes" if m["measured_peak_bytes"] <= budget.memory else "NO"
                print(f"{name:<9} {steps:>5} {f'1/{fraction}':>6} {format_bytes(budget.memory):>9} "
                      f"{estimator.name:<6} {plan:<34} {format_bytes(m['predicted_peak_bytes']):>10} "
                      f"{format_bytes(m['measured_peak_bytes']):>10} "
                      f"{_ratio(m['predicted_peak_bytes'], m['measured_peak_bytes'])} {under:>6}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--tables", nargs="+", default=["estimators", "chunks", "budgets"],
                        choices=["estimators", "chunks", "budgets", "seconds"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batching", choices=["vmap", "stacked"], default="vmap",
                        help="the batched form of the budget table's plans (stacked: where the estimator stacks)")
    parser.add_argument("--steps", type=int, nargs="+",
                        help="grid of T of the estimator and seconds tables (default: the problem's)")
    parser.add_argument("--estimators", nargs="+", help="registry names to keep in the estimator table (default: all)")
    args = parser.parse_args()
    if "estimators" in args.tables:
        print(f"{'problem':<9} {'T':>5} {'estimator':<28} {'predicted':>10} {'measured':>10} {'pred/meas':>9}")
        for name in args.problems:
            estimator_table(name, args)
    if "chunks" in args.tables:
        print(f"\n{'problem':<9} {'T':>5} {'chunked call':<32} {'predicted':>10} {'measured':>10} {'pred/meas':>9}")
        for name in args.problems:
            chunk_table(name, args)
    if "seconds" in args.tables:
        print(f"\n{'problem':<9} {'T':>5} {'chunk':<40} {'predicted':>10} {'measured':>10} {'pred/meas':>9} "
              f"{'probed':>10} {'prob/meas':>9}  (seconds)")
        for name in args.problems:
            seconds_table(name, args)
    if "budgets" in args.tables:
        print(f"\n{'problem':<9} {'T':>5} {'budget':>6} {'bytes':>9} {'method':<6} {'plan':<34} {'predicted':>10} "
              f"{'measured':>10} {'pred/meas':>9} {'under':>6}")
        for name in args.problems:
            budget_table(name, args)


if __name__ == "__main__":
    main()
