"""Check the CPU peak-memory figure (metaopt.memory) against an independent measure: peak RSS.

For each (estimator, T), two fresh child processes build the same sinusoid MAML problem and
run one warm-up meta-gradient at T=2. One then measures a meta-gradient at T with
`measure_peak_memory` (torch.profiler allocation events); the other resets its peak
resident set size (/proc/self/clear_refs), runs the same call, and reports
VmHWM - VmRSS-before. RSS also counts allocator overhead and fragmentation, so it should
be at least the profiler figure and close to it when tensors dominate.

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
    if method == "profiler":
        with measure_peak_memory() as memory:
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
    print(f"{'estimator':<11} {'T':>5} {'profiler MB':>12} {'peak RSS MB':>12} {'RSS / profiler':>15}")
    for steps in args.steps:
        for estimator in ESTIMATORS:
            profiled = run_child(estimator, steps, "profiler")
            rss = run_child(estimator, steps, "rss")
            ratio = f"{rss / profiled:.2f}" if profiled > 0 and rss >= 0 else "-"
            print(f"{estimator:<11} {steps:>5} {profiled / 1e6:>12.2f} {rss / 1e6:>12.2f} {ratio:>15}")


if __name__ == "__main__":
    main()
