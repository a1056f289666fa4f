"""Print learned-vs-baseline results (runs whose metrics.json has a `compare` section) as a markdown table.

    python experiments/compare_table.py outputs/kinds

Reads every run under the given directories (`metaopt_hydra.summary.collect_runs`); runs that
failed or have no comparison are listed below the table, never dropped silently.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from metaopt_hydra.summary import collect_runs


def _fmt(metric: str, value: float, ci: float, sign: str = "") -> str:
    scale, digits = (100, 1) if metric == "test_accuracy" else (1, 3)
    return f"{scale * value:{sign}.{digits}f} ± {scale * ci:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+")
    args = parser.parse_args()
    print("| run | metric (inner steps) | learned | baseline | learned - baseline (paired) | baseline chosen "
          "| meta-steps | train wall-clock |")
    print("|---|---|---|---|---|---|---|---|")
    others = []
    for root in args.dirs:
        for row in collect_runs(root):
            m, name = row["_metrics"], f"{root.name}/{row['run']}".rstrip("/.")
            if row["status"] != "ok" or "learned" not in m:
                others.append(f"{name}: {row['status']}" + (f": {row['error']}" if row["error"] else ": no comparison"))
                continue
            for steps, r in m["at_inner_steps"].items():
                metric = m["metric"]
                print(f"| {name} | {metric} ({steps}; {m['metric_direction']}) "
                      f"| {_fmt(metric, r['learned'], r['learned_ci95'])} "
                      f"| {_fmt(metric, r['baseline'], r['baseline_ci95'])} "
                      f"| {_fmt(metric, r['difference'], r['difference_ci95'], '+')} | {m['baseline_name']} "
                      f"| {m['meta_steps']} | {m['train_seconds'] / 60:.1f} min |")
    for line in others:
        print(f"- {line}")


if __name__ == "__main__":
    main()
