"""Benchmark: conv4 meta-gradients on the CPU by BatchNorm kind, weight layout and batching, same run.

Two Omniglot-shaped workloads (28x28 images; task contents do not change the cost):

  maml      MAML's second-order meta-gradient (`metaopt.Full()`) over a meta-batch of 16 20-way 1-shot
            tasks with 5 queries per class, one inner SGD step (lr 0.4): `experiment=omniglot_maml
            task.n_way=20`'s meta-step
  protonet  one 60-way 1-shot episode with 5 queries per class through `PrototypeLoop`:
            `experiment=omniglot_protonet`'s meta-step

Variants of the same Conv4-64 (same weights):

  primitive vmap   the reference: `metaopt.models.BatchNorm` (exact under vmap), tasks vmapped
  primitive loop   the same model, one task graph at a time
  primitive stacked  the tasks on their task axis (`batching=stacked`, `metaopt.stacked`: grouped
                   convolutions and one batch_norm over the tasks' channels, no vmap)
  fused loop       `model.norm=fused` (nn.BatchNorm2d; second-order estimators cannot vmap it)
  fused stacked    `model.norm=fused`, stacked (exact at second order: no vmap)
  fused+NHWC loop  `model.norm=fused model.channels_last=true`

Timings are interleaved (every variant once per round, in a freshly shuffled seeded order), medians over
rounds, with glibc's allocator told to keep freed memory (`allocator=keep`, as the Omniglot experiments run).
The meta-gradients are checked against the default's (`metaopt.compiled.gradient_errors`: relative to each
gradient's largest entry, floored at 1% of the largest of all).

    python experiments/bench_conv4.py [--threads 1] [--repeats 7] [--workloads maml protonet] [--channels 64]

The last line is `speedup_vs_default maml:<x> protonet:<x>`: the default's median over the fastest
variant's, same run.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

import metaopt as mo
from interleaved import begin_cpu_benchmark, interleaved_seconds
from metaopt.compiled import gradient_errors

VARIANTS = {
    "primitive vmap": ({}, "vmap"),
    "primitive loop": ({}, "loop"),
    "primitive stacked": ({}, "stacked"),
    "fused loop": ({"norm": "fused"}, "loop"),
    "fused stacked": ({"norm": "fused"}, "stacked"),
    "fused+NHWC loop": ({"norm": "fused", "channels_last": True}, "loop"),
}
WORKLOADS = {  # name -> (N-way, meta-batch, loop factory)
    "maml": (20, 16, lambda model, n: mo.InnerLoop(model, mo.optim.sgd(lr=0.4), mo.losses.cross_entropy)),
    "protonet": (60, 1, lambda model, n: mo.PrototypeLoop(model, n_way=n)),
}


def setups(workload: str, channels: int = 64, meta_batch: int | None = None, seed: int = 0) -> dict[str, Callable]:
    """Per variant: a call computing the meta-gradient (and nothing else), all from the same weights and tasks."""
    n_way, default_batch, make_loop = WORKLOADS[workload]
    out_features = 0 if workload == "protonet" else n_way
    torch.manual_seed(seed)
    reference = mo.Conv4(out_features=out_features, channels=channels)
    tasks = mo.RandomPatterns(n_way=n_way, k_shot=1, k_query=5).sample(meta_batch or default_batch, 1,
                                                                       torch.Generator().manual_seed(seed))
    calls = {}
    for name, (options, batching) in VARIANTS.items():
        if workload == "protonet" and batching in ("vmap", "stacked"):
            continue  # one task: vmapping it changes nothing
        model = mo.Conv4(out_features=out_features, channels=channels, **options)
        model.load_state_dict(reference.state_dict())
        loop, meta = make_loop(model, n_way), mo.meta_params(mo.Init(model))
        calls[name] = (lambda loop=loop, meta=meta, batching=batching: mo.Full()(loop, meta, tasks, batching=batching))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--channels", type=int, default=64, help="conv4 filters per block")
    parser.add_argument("--meta-batch", type=int, default=None, help="MAML's tasks per meta-step (default 16)")
    args = parser.parse_args()
    begin_cpu_benchmark(args.threads, args.repeats)
    speedups = {}
    for workload in args.workloads:
        calls = setups(workload, args.channels, args.meta_batch)
        default = next(iter(calls))
        reference = calls[default]().grads  # also the warm-up of every variant below
        errors = {name: max(gradient_errors(call().grads, reference).values()) for name, call in calls.items()}
        times = interleaved_seconds(calls, args.repeats)
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n{workload}: seconds per meta-gradient (median of {args.repeats})")
        print("| variant | s | vs default | gradient difference |\n|---|---|---|---|")
        for name, m in medians.items():
            print(f"| {name} | {m:.3f} | {medians[default] / m:.2f}x | {errors[name]:.1e} |")
        speedups[workload] = medians[default] / min(medians.values())
    print("speedup_vs_default " + " ".join(f"{w}:{x:.2f}" for w, x in speedups.items()))


if __name__ == "__main__":
    main()
