"""Benchmark: each estimator's meta-gradient stacked, vmapped and task by task, same run (CPU).

`batching="stacked"` runs a chunk's tasks as ordinary batched tensor code on their task axis (`metaopt.stacked`),
`"vmap"` runs the per-task function under `torch.func.vmap`, `"loop"` one task graph at a time; all three compute
the same meta-gradient. Under `batching="auto"` an estimator that declares `stacks` runs stacked (the planner
then times it against one task at a time). Problems:

  sinusoid  MAML on sinusoid regression: MLP 1-40-40-1, meta-batch 25, K=10, inner SGD lr 0.01, T=20
  conv4     MAML on 5-way 1-shot 28x28 tasks with 15 queries per class: Conv4 with 32 channels, meta-batch 8,
            inner SGD lr 0.4, T=4 (the configuration `search=omniglot_maml` explores; the images are
            `RandomPatterns`: contents do not change the cost)

Estimators: full, checkpoint (segments of ceil(sqrt(T)) steps) and first_order, of an initialization (MAML);
truncated (k = T/4) and forward (exact: one jvp per meta-parameter scalar) of per-tensor learned inner learning
rates (Meta-SGD's per-tensor form: 6 scalars for the MLP, 18 for Conv4; an initialization gets no gradient from
truncated with k < T, and forward's use is a few hyperparameters);
implicit (conjugate gradient, 20 iterations) of an initialization with iMAML's proximal term (lambda = 1); on
request (`--estimators forward_passes`), forward exact with all of its one-hot tangents in one pass
(`tangents_per_pass=32`).
Timings are interleaved (every variant once per round, in a freshly shuffled seeded order), medians over
rounds; every variant's gradient is checked against the vmapped one (`metaopt.compiled.gradient_errors`:
relative to each gradient's largest entry, floored at 1% of the largest of all). The planner's predicted peak of
the whole batch in one graph, stacked and vmapped (`metaopt.planning.plan`, no budget), is printed beside: on the
CPU it comes from RSS probes in this process, coarse at tens of MB, and counts autograd's bookkeeping and the
allocator's slack too; so is the peak of live tensor storage of one call of each (`torch.profiler`'s memory
events, `metaopt.memory`'s "profiler" method: tensors only, exact to the byte).

    python experiments/bench_stacking.py [--threads 1] [--repeats 7] [--problems sinusoid conv4]
        [--estimators full checkpoint truncated first_order] [--allocator keep]

`--allocator system` keeps glibc's default (freed memory returned, large buffers page-faulted in again: slower
conv4 rows, but a lower RSS where `keep`'s fragmented heap would not fit, e.g. conv4 `forward_passes`).

The last line is `speedup_stacked_vs_vmap <problem>/<estimator>:<x> ...`: the vmapped median over the stacked
one, same run.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

import metaopt as mo
from interleaved import begin_cpu_benchmark, interleaved_seconds
from metaopt.compiled import gradient_errors
from metaopt.memory import measure_peak_memory
from metaopt.planning import plan
from metaopt.prediction import describe

BATCHINGS = ("stacked", "vmap", "loop")
ESTIMATORS: dict[str, Callable[[int], mo.AbstractEstimator]] = {
    "full": lambda steps: mo.Full(),
    "checkpoint": lambda steps: mo.Checkpoint(),
    "truncated": lambda steps: mo.Truncated(k=max(1, steps // 4)),
    "first_order": lambda steps: mo.FirstOrder(),
    "forward": lambda steps: mo.ForwardMode(mode="exact", tangents_per_pass=1),
    "implicit": lambda steps: mo.Implicit(),
    "forward_passes": lambda steps: mo.ForwardMode(mode="exact", tangents_per_pass=32),  # on request only
}
DEFAULT = [e for e in ESTIMATORS if e != "forward_passes"]
LEARNED_LRS = {"forward", "forward_passes", "truncated"}  # timed on per-tensor learned inner lrs (an initialization: no forward
# gradient; truncated k < T: zero)
PROXIMAL = {"implicit": 1.0}  # iMAML's term (an initialization has an implicit gradient only with it)


def problem(name: str) -> tuple[mo.InnerLoop, mo.MetaParams, mo.Task]:
    """The inner loop, the meta-parameters (an initialization) and a seeded batch of tasks."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if name == "sinusoid":
        model: torch.nn.Module = mo.MLP(1, (40, 40), 1)
        loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)
        tasks = mo.Sinusoid(k_shot=10).sample(25, 20, generator)
    else:
        model = mo.Conv4(1, 5, channels=32)
        loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.4), mo.losses.cross_entropy)
        tasks = mo.RandomPatterns(n_way=5, k_shot=1, k_query=15).sample(8, 4, generator)
    return loop, mo.meta_params(mo.Init(model)), tasks


def tensor_peak_bytes(call: Callable[[], object]) -> int:
    """The peak of live tensor storage during one `call()`, above the level at its start (bytes, exact)."""
    with measure_peak_memory("cpu", "profiler") as peak:
        call()
    return peak.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--problems", nargs="+", choices=["sinusoid", "conv4"], default=["sinusoid", "conv4"])
    parser.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS), default=DEFAULT)
    parser.add_argument("--allocator", choices=["keep", "system"], default="keep")
    args = parser.parse_args()
    begin_cpu_benchmark(args.threads, args.repeats, args.allocator)
    speedups = {}
    for name in args.problems:
        loop, init, tasks = problem(name)
        lrs = mo.meta_params(mo.LearningRates(loop.model, init=loop.optimizer.defaults["lr"], granularity="tensor"))
        metas = {e: lrs if e in LEARNED_LRS else init for e in args.estimators}
        loops = {e: mo.InnerLoop(loop.model, loop.optimizer, loop.loss_fn, proximal=PROXIMAL.get(e, 0.0))
                 for e in args.estimators}
        calls = {(e, b): (lambda e=e, b=b: ESTIMATORS[e](tasks.inner_steps)(loops[e], metas[e], tasks, batching=b))
                 for e in args.estimators for b in BATCHINGS}
        errors = {}
        for e in args.estimators:  # also the warm-up of every variant
            reference = calls[e, "vmap"]().grads
            errors.update({(e, b): max(gradient_errors(calls[e, b]().grads, reference).values()) for b in BATCHINGS})
        times = interleaved_seconds(calls, args.repeats)
        ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
        predicted = {(e, b): plan(ESTIMATORS[e](tasks.inner_steps), loops[e], metas[e], tasks, mo.Budget(), batching=b)
                     .predicted_peak_bytes / 1e6 for e in args.estimators for b in ("stacked", "vmap")}
        tensors = {key: tensor_peak_bytes(call) / 1e6 for key, call in calls.items() if key[1] != "loop"}
        print(f"\n{name} (T={tasks.inner_steps}, meta-batch {len(tasks.query.x)}): ms per meta-gradient, median of "
              f"{args.repeats}")
        print("| estimator | stacked | vmap | loop | stacked vs vmap | largest difference (stacked, loop) "
              "| predicted MB (stacked, vmap) | tensor MB (stacked, vmap) |\n|---|---|---|---|---|---|---|---|")
        for e in args.estimators:
            speedups[f"{name}/{e}"] = ms[e, "vmap"] / ms[e, "stacked"]
            label = describe(ESTIMATORS[e](tasks.inner_steps)) + (" of learned lrs" if e in LEARNED_LRS else "") + (
                f", proximal {PROXIMAL[e]}" if e in PROXIMAL else "")
            print(f"| {label} | {ms[e, 'stacked']:.1f} | {ms[e, 'vmap']:.1f} | "
                  f"{ms[e, 'loop']:.1f} | {speedups[f'{name}/{e}']:.2f}x | "
                  f"{errors[e, 'stacked']:.1e}, {errors[e, 'loop']:.1e} | "
                  f"{predicted[e, 'stacked']:.1f}, {predicted[e, 'vmap']:.1f} | "
                  f"{tensors[e, 'stacked']:.2f}, {tensors[e, 'vmap']:.2f} |")
    print("speedup_stacked_vs_vmap " + " ".join(f"{k}:{x:.2f}" for k, x in speedups.items()))


if __name__ == "__main__":
    main()
