"""Benchmark: evolution strategies with their particles one unroll after another, or vmapped in one pass (CPU).

`es` and `pes` run `population` perturbed unrolls per task. `particles_per_pass=1` (the default) runs them one after
another; `particles_per_pass=population` runs them as one vmapped unroll, sharing the per-op cost (dispatch) at
`population` times the live state of one. Both draw the same noise, so the estimates agree to rounding. The
problems are `bench_stacking.py`'s (sinusoid: MLP 1-40-40-1, meta-batch 25, T=20; conv4: Conv4-32, 5-way 1-shot
15 queries, meta-batch 8, T=4), MAML's initialization as the meta-parameters, sigma 0.01, `pes`
with windows of k=5 steps; the tasks run vmapped and one at a time (ES does not stack: each task perturbs the
meta-parameters its own way). Timings are interleaved medians; the largest difference is relative to the
largest entry of the one-at-a-time gradient (`metaopt.compiled.gradient_errors`); tensor MB is the peak of live
tensor storage of one call (`torch.profiler`). `--allocator system` leaves glibc's default, which maps and unmaps
every buffer over 32 MB at each call (`metaopt.allocator`): one pass's buffers are `population` times larger.

    python experiments/bench_es.py [--threads 1] [--repeats 5] [--problems sinusoid conv4] [--population 16]
        [--batchings vmap loop] [--allocator keep]

The last line is `speedup_particles_in_one_pass <problem>/<estimator>/<batching>:<x> ...`: the one-at-a-time
median over the one-pass median, same run.
"""
from __future__ import annotations

import argparse
import statistics

import metaopt as mo
from bench_stacking import problem, tensor_peak_bytes
from interleaved import begin_cpu_benchmark, interleaved_seconds
from metaopt.compiled import gradient_errors

ESTIMATORS = {"es": None, "pes": 5}  # name -> k (None: one window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--problems", nargs="+", choices=["sinusoid", "conv4"], default=["sinusoid", "conv4"])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--batchings", nargs="+", choices=["vmap", "loop"], default=["vmap", "loop"])
    parser.add_argument("--allocator", choices=["keep", "system"], default="keep")
    args = parser.parse_args()
    population = args.population
    begin_cpu_benchmark(args.threads, args.repeats, args.allocator)
    speedups = {}
    for name in args.problems:
        loop, meta, tasks = problem(name)
        calls = {(e, b, n): (lambda e=e, b=b, n=n: mo.PersistentES(population, k=ESTIMATORS[e], particles_per_pass=n)(
            loop, meta, tasks, batching=b)) for e in ESTIMATORS for b in args.batchings for n in (1, population)}
        errors = {}
        for e in ESTIMATORS:  # also the warm-up of every variant
            for b in args.batchings:
                reference = calls[e, b, 1]().grads
                errors[e, b] = max(gradient_errors(calls[e, b, population]().grads, reference).values())
        times = interleaved_seconds(calls, args.repeats)
        ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        tensors = {key: tensor_peak_bytes(call) / 1e6 for key, call in calls.items()}
        print(f"\n{name} (T={tasks.inner_steps}, meta-batch {len(tasks.query.x)}, population {population}): ms per "
              f"meta-gradient, median of {args.repeats}")
        print("| estimator | tasks | one at a time | one pass | speedup | largest difference | tensor MB (one at a "
              "time, one pass) |\n|---|---|---|---|---|---|---|")
        for (e, b), error in errors.items():
            key = f"{name}/{e}/{b}"
            speedups[key] = ms[e, b, 1] / ms[e, b, population]
            label = e if ESTIMATORS[e] is None else f"{e} (k={ESTIMATORS[e]})"
            print(f"| {label} | {b} | {ms[e, b, 1]:.1f} | {ms[e, b, population]:.1f} | {speedups[key]:.2f}x | "
                  f"{error:.1e} | {tensors[e, b, 1]:.2f}, {tensors[e, b, population]:.2f} |")
    print("speedup_particles_in_one_pass " + " ".join(f"{k}:{x:.2f}" for k, x in speedups.items()))


if __name__ == "__main__":
    main()
