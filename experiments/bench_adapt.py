"""Benchmark: what adapting fewer parameters in the inner loop costs, against MAML, same run.

One conv4-64 Omniglot-shaped workload (28x28 images, 5-way 1-shot, 5 queries per class, meta-batch 16: what
`experiment=omniglot_maml` meta-trains on) at T inner SGD steps (lr 0.4), the meta-gradient of the
initialization by `metaopt.Full()` (second order), tasks stacked (`batching=stacked`, what `auto` runs):

  maml     every parameter adapts (`adapt: null`)
  anil     only the head adapts (`adapt: [head]`; Raghu et al. 2020), the body held in the inner loop
  boil     only the body adapts (`adapt: [features]`; Oh et al. 2021), the head held
  fomaml   every parameter adapts, first-order (`metaopt.FirstOrder()`): the usual cheap approximation

Timings are interleaved (every variant once per round, in a freshly shuffled seeded order), medians over rounds,
glibc's allocator told to keep freed memory (as the Omniglot experiments run). Per variant also the peak of live
tensor storage during one call (`torch.profiler`, exact) and, as a check that the stacked meta-gradient is the
loop's, the largest difference from the same variant run one task at a time (relative to the gradient's largest
entry).

    python experiments/bench_adapt.py [--threads 1] [--repeats 7] [--steps 1 5] [--channels 64]

The last line is `speedup_anil_vs_maml T=1:<x> T=5:<x>`: MAML's median over ANIL's, same run.
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

VARIANTS: dict[str, tuple[list[str] | None, Callable[[], mo.AbstractEstimator]]] = {
    "maml": (None, mo.Full),
    "anil": (["head"], mo.Full),
    "boil": (["features"], mo.Full),
    "fomaml": (None, mo.FirstOrder),
}
N_WAY, META_BATCH = 5, 16


def setups(steps: int, channels: int = 64, seed: int = 0) -> dict[str, Callable[[str], mo.MetaGrad]]:
    """Per variant: `call(batching)` computes its meta-gradient, all variants from the same weights and tasks."""
    torch.manual_seed(seed)
    model = mo.Conv4(out_features=N_WAY, channels=channels)
    tasks = mo.RandomPatterns(n_way=N_WAY, k_shot=1, k_query=5).sample(META_BATCH, steps,
                                                                       torch.Generator().manual_seed(seed))
    meta = mo.meta_params(mo.Init(model))
    calls = {}
    for name, (adapt, estimator) in VARIANTS.items():
        loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.4), mo.losses.cross_entropy, adapt=adapt)
        calls[name] = (lambda batching, loop=loop, estimator=estimator():
                       estimator(loop, meta, tasks, batching=batching))
    return calls


def tensor_peak_megabytes(call: Callable[[], object]) -> float:
    """The peak of live tensor storage during one `call()`, above the level at its start (MB, exact)."""
    with measure_peak_memory("cpu", "profiler") as peak:
        call()
    return peak.peak_bytes / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="inner steps T")
    parser.add_argument("--channels", type=int, default=64, help="conv4 filters per block")
    args = parser.parse_args()
    begin_cpu_benchmark(args.threads, args.repeats)
    speedups = {}
    for steps in args.steps:
        calls = setups(steps, args.channels)
        errors = {name: max(gradient_errors(call("stacked").grads, call("loop").grads).values())
                  for name, call in calls.items()}  # also the warm-up
        peaks = {name: tensor_peak_megabytes(lambda call=call: call("stacked")) for name, call in calls.items()}
        times = interleaved_seconds({name: (lambda call=call: call("stacked")) for name, call in calls.items()},
                                    args.repeats)
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"\nT={steps}: seconds per meta-gradient (median of {args.repeats}), conv4-{args.channels}, "
              f"{META_BATCH} tasks of {N_WAY}-way 1-shot, 5 queries per class, stacked")
        print("| variant | s | MAML over it | live tensor peak (MB) | stacked vs one task at a time |")
        print("|---|---|---|---|---|")
        for name, m in medians.items():
            print(f"| {name} | {m:.3f} | {medians['maml'] / m:.2f}x | {peaks[name]:.0f} | {errors[name]:.1e} |")
        speedups[steps] = medians["maml"] / medians["anil"]
    print("speedup_anil_vs_maml " + " ".join(f"T={t}:{x:.2f}" for t, x in speedups.items()))


if __name__ == "__main__":
    main()
