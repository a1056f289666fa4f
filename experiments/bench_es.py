"""Benchmark: evolution strategies with their particles one unroll after another, or vmapped in one pass (CPU).

`es` and `pes` run `population` perturbed unrolls per task. `particles_per_pass=1` runs them one after
another (what the planner's choice, the default, falls back to without timing); `particles_per_pass=population` runs them as one vmapped unroll, sharing the per-op cost (dispatch) at
`population` times the live state of one. Both draw the same noise, so the estimates agree to rounding. The
problems are `bench_stacking.py`'s (sinusoid: MLP 1-40-40-1, meta-batch 25, T=20; conv4: Conv4-32, 5-way 1-shot
15 queries, meta-batch 8, T=4), MAML's initialization as the meta-parameters, sigma 0.01, `pes`
with windows of k=5 steps; the tasks run stacked (each row of the task axis at its own perturbed meta-values; one
pass of `population` particles is one unroll of population x meta-batch rows), vmapped and one at a time. Timings
are interleaved medians; the largest difference is relative to the
largest entry of the one-at-a-time gradient (`metaopt.compiled.gradient_errors`); tensor MB is the peak of live
tensor storage of one call (`torch.profiler`). `--allocator system` leaves glibc's default, which maps and unmaps
every buffer over 32 MB at each call (`metaopt.allocator`): one pass's buffers are `population` times larger.

`--problems learned_optimizer_online` times `online_pes` on `experiment=learned_optimizer_online` as configured
(the LSTM rule training permuted-digits MLPs, meta-batch 8, windows of 10 steps; `--population` particles): the
second window, every particle continuing from its carried state, tasks vmapped.

    python experiments/bench_es.py [--threads 1] [--repeats 5] [--problems sinusoid conv4 learned_optimizer_online]
        [--population 16] [--batchings stacked vmap loop] [--allocator keep]

With both stacked and vmap timed, the line before the last is `speedup_stacked_vs_vmap
<problem>/<estimator>/<particles per pass>:<x> ...` (vmapped median over stacked median, and the largest difference
of the stacked estimate from the vmapped one). The last line is `speedup_particles_in_one_pass
<problem>/<estimator>/<batching>:<x> ...`: the one-at-a-time median over the one-pass median, same run.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable

import torch

import metaopt as mo
from bench_stacking import problem, tensor_peak_bytes
from interleaved import begin_cpu_benchmark, interleaved_seconds
from metaopt.compiled import gradient_errors
from metaopt.types import Carry

PROBLEMS = ["sinusoid", "conv4", "learned_optimizer_online"]

ESTIMATORS = {"es": None, "pes": 5}  # name -> k (None: one window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=["sinusoid", "conv4"])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--batchings", nargs="+", choices=["stacked", "vmap", "loop"],
                        default=["stacked", "vmap", "loop"])
    parser.add_argument("--allocator", choices=["keep", "system"], default="keep")
    args = parser.parse_args()
    population = args.population
    begin_cpu_benchmark(args.threads, args.repeats, args.allocator)
    speedups, stacked_speedups = {}, {}
    for name in args.problems:
        if name == "learned_optimizer_online":
            calls, shape = online_calls(population)
        else:
            loop, meta, tasks = problem(name)
            batchings, shape = args.batchings, f"T={tasks.inner_steps}, meta-batch {len(tasks.query.x)}"
            calls = {(e, b, n): (lambda e=e, b=b, n=n: mo.PersistentES(
                population, k=ESTIMATORS[e], particles_per_pass=n)(loop, meta, tasks, batching=b))
                for e in ESTIMATORS for b in batchings for n in (1, population)}
        errors, grads = {}, {}
        for e, b, _ in list(calls)[::2]:  # also the warm-up of every variant
            grads[e, b, 1], grads[e, b, population] = calls[e, b, 1]().grads, calls[e, b, population]().grads
            errors[e, b] = max(gradient_errors(grads[e, b, population], grads[e, b, 1]).values())
        times = interleaved_seconds(calls, args.repeats)
        ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        for (e, b, n) in calls:
            if b == "stacked" and (e, "vmap", n) in calls:
                difference = max(gradient_errors(grads[e, b, n], grads[e, "vmap", n]).values())
                stacked_speedups[f"{name}/{e}/{n}"] = (ms[e, "vmap", n] / ms[e, b, n], difference)
        tensors = {key: tensor_peak_bytes(call) / 1e6 for key, call in calls.items()}
        print(f"\n{name} ({shape}, population {population}): ms per meta-gradient, median of {args.repeats}")
        print("| estimator | tasks | one at a time | one pass | speedup | largest difference | tensor MB (one at a "
              "time, one pass) |\n|---|---|---|---|---|---|---|")
        for (e, b), error in errors.items():
            key = f"{name}/{e}/{b}"
            speedups[key] = ms[e, b, 1] / ms[e, b, population]
            label = e if ESTIMATORS.get(e) is None else f"{e} (k={ESTIMATORS[e]})"
            print(f"| {label} | {b} | {ms[e, b, 1]:.1f} | {ms[e, b, population]:.1f} | {speedups[key]:.2f}x | "
                  f"{error:.1e} | {tensors[e, b, 1]:.2f}, {tensors[e, b, population]:.2f} |")
    if stacked_speedups:
        print("speedup_stacked_vs_vmap " + " ".join(f"{k}:{x:.2f}" for k, (x, _) in stacked_speedups.items())
              + f" (largest difference {max(d for _, d in stacked_speedups.values()):.1e})")
    print("speedup_particles_in_one_pass " + " ".join(f"{k}:{x:.2f}" for k, x in speedups.items()))


def online_calls(population: int) -> tuple[dict[tuple[str, str, int], Callable[[], mo.MetaGrad]], str]:
    """`online_pes` on experiment=learned_optimizer_online: each variant's second window, its particles continuing
    from the first window's carried states (what every meta-step after the first runs); and the shape in words."""
    from hydra import compose, initialize_config_dir

    from metaopt_hydra.build import build
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=learned_optimizer_online"])
    parts = build(cfg)
    tasks = parts.tasks.sample(cfg.meta_batch_size, cfg.inner_steps, torch.Generator().manual_seed(0))
    calls = {}
    for n in (1, population):
        estimator = mo.estimators.OnlinePES(population, cfg.estimator.sigma, particles_per_pass=n)
        carry = estimator(parts.loop, parts.meta, tasks, batching="vmap").carry
        window = tasks._replace(carry=Carry(torch.zeros(cfg.meta_batch_size, dtype=torch.bool), carry))
        calls["online_pes", "vmap", n] = (lambda e=estimator, w=window: e(parts.loop, parts.meta, w, batching="vmap"))
    return calls, f"T={cfg.inner_steps} per window, meta-batch {cfg.meta_batch_size}"


if __name__ == "__main__":
    main()
