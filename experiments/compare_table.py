"""Print learned-vs-baseline results (metrics.json with a `compare` section) as a markdown table.

    python experiments/compare_table.py outputs/kinds/*
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    args = parser.parse_args()
    print("| run | metric (inner steps) | learned | baseline | learned - baseline (paired) | baseline chosen "
          "| meta-steps | train wall-clock |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        path = run_dir / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        if "learned" not in m:
            continue
        for steps, r in m["at_inner_steps"].items():
            scale, digits = (100, 1) if m["metric"] == "test_accuracy" else (1, 3)

            def fmt(value: float, ci: float, sign: str = "") -> str:
                return f"{scale * value:{sign}.{digits}f} ± {scale * ci:.{digits}f}"

            print(f"| {run_dir.name} | {m['metric']} ({steps}; {m['metric_direction']}) "
                  f"| {fmt(r['learned'], r['learned_ci95'])} | {fmt(r['baseline'], r['baseline_ci95'])} "
                  f"| {fmt(r['difference'], r['difference_ci95'], '+')} | {m['baseline_name']} "
                  f"| {m['meta_steps']} | {m['train_seconds'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
