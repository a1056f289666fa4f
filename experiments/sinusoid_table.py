"""Print the sinusoid table (Li et al. 2017, Table 1) beside what a multirun measured.

    python experiments/train.py --multirun experiment=sinusoid_maml,sinusoid_metasgd \\
        task.k_shot=5,10,20 hydra.sweep.dir=multirun/sinusoid_table
    python experiments/sinusoid_table.py multirun/sinusoid_table

Runs are read with `metaopt_hydra.summary.collect_runs`: one row per (method, estimator, K);
several seeds of one row are averaged (the CI column is then the spread of the seeds' means);
failed runs are listed below the table with their error.
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from metaopt_hydra.summary import collect_runs

# Li et al. 2017 (Meta-SGD), Table 1: MSE after one inner step, mean ± 95% CI.
PAPER = {("MAML", 5): "1.13 ± 0.18", ("MAML", 10): "0.85 ± 0.14", ("MAML", 20): "0.71 ± 0.12",
         ("Meta-SGD", 5): "0.90 ± 0.16", ("Meta-SGD", 10): "0.53 ± 0.09", ("Meta-SGD", 20): "0.31 ± 0.05"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    failed = []
    for row in collect_runs(args.sweep_dir):
        m = row["_metrics"]
        if row["status"] != "ok":
            failed.append(f"{row['run']} ({row['overrides']}): {row['status']}: {row['error']}")
            continue
        method = "Meta-SGD" if "optimizer" in (m["config"]["metaparam"] or {}) else "MAML"
        groups[(method, m["estimator"], m["config"]["task"]["k_shot"])].append(m)
    print("| method | estimator | K | paper MSE | metaopt MSE | seeds | meta-train wall-clock |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted(set(groups) | {(method, "full", k) for method, k in PAPER})
    for method, estimator, k in keys:
        runs = groups.get((method, estimator, k), [])
        paper = PAPER.get((method, k), "—") if estimator == "full" else "—"
        if not runs:
            print(f"| {method} | {estimator} | {k} | {paper} | not run | 0 | - |")
            continue
        losses = [r["meta_test_loss"] for r in runs]
        spread = runs[0]["meta_test_loss_ci95"] if len(runs) == 1 else statistics.stdev(losses)
        wall = statistics.fmean(r["train_seconds"] for r in runs) / 60
        print(f"| {method} | {estimator} | {k} | {paper} | {statistics.fmean(losses):.2f} ± {spread:.2f} "
              f"| {len(runs)} | {wall:.1f} min |")
    for line in failed:
        print(f"- not ok: {line}")


if __name__ == "__main__":
    main()
