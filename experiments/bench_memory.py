"""Check metaopt's CPU peak-memory figure against an independent measure: a fresh process's peak RSS.

For each (estimator, T), fresh child processes build the same sinusoid MAML problem
(one task, MLP 1-40-40-1) and run one warm-up meta-gradient at T=2, then:
  in-process  metaopt.memory.measure_peak_memory() (method "rss"), in a process that first ran
              other meta-gradients (T = 1000, 300, 50) to dirty its heap, as in training;
  fresh       a process that did nothing else: VmHWM after the call minus VmRSS before it;
  tensors     the "profiler" method: tensor storage only, for scale.

    python experiments/bench_memory.py [--steps 300 1000 3000]
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

ESTIMATORS = ["full", "checkpoint", "truncated", "forward"]


def child(estimator_name: str, steps: int, method: str) -> None:
    import torch

    import metaopt as mo
    from metaopt.memory import measure_peak_memory, peak_rss_bytes, reset_peak_rss

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = mo.MLP(1, (40, 40), 1)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.01), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    kwargs = {"truncated": {"k": 10}, "forward": {"mode": "random"}}.get(estimator_name, {})
    estimator = mo.get_estimator(estimator_name, **kwargs)
    tasks = mo.Sinusoid(k_shot=10).sample(1, steps, torch.Generator().manual_seed(0))
    estimator(loop, meta, mo.Sinusoid(k_shot=10).sample(1, 2, torch.Generator().manual_seed(1)))  # warm-up
    gc.collect()
    if method in ("profiler", "in-process"):
        if method == "in-process":
            for other in (1000, 300, 50):
                mo.Full()(loop, meta, mo.Sinusoid(k_shot=10).sample(4, other, torch.Generator().manual_seed(2)))
        with measure_peak_memory(method="profiler" if method == "profiler" else "rss") as memory:
            estimator(loop, meta, tasks)
        print(json.dumps({"bytes": memory.peak_bytes}))
    else:
        with open("/proc/self/status") as f:
            before = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        if not reset_peak_rss():
            print(json.dumps({"bytes": -1}))
            return
        estimator(loop, meta, tasks)
        print(json.dumps({"bytes": peak_rss_bytes() - before}))


def run_child(estimator: str, steps: int, method: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", estimator, str(steps), method],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000, 3000])
    parser.add_argument("--child", nargs=3, metavar=("ESTIMATOR", "T", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    print(f"{'estimator':<11} {'T':>5} {'in-process MB':>14} {'fresh RSS MB':>13} {'in-process/fresh':>17} "
          f"{'tensors MB':>11}")
    for steps in args.steps:
        for estimator in ESTIMATORS:
            ours = run_child(estimator, steps, "in-process")
            fresh = run_child(estimator, steps, "rss")
            tensors = run_child(estimator, steps, "profiler")
            ratio = f"{ours / fresh:.2f}" if fresh > 0 else "-"
            print(f"{estimator:<11} {steps:>5} {ours / 1e6:>14.2f} {fresh / 1e6:>13.2f} {ratio:>17} "
                  f"{tensors / 1e6:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
