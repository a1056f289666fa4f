"""Print learned-vs-baseline results (runs whose metrics.json has a `compare` section) as a markdown table.

    python experiments/compare_table.py outputs/kinds
    python experiments/compare_table.py --seeds outputs/learned_optimizer_seeds   # one row per directory

Reads every run under the given directories (`metaopt_hydra.summary.collect_runs`); runs that
failed or have no comparison are listed below the table, never dropped silently. With
`--seeds`, each directory's runs (e.g. seeds 0, 1, 2 of one config) become one row per unroll
length: the mean and the standard deviation over runs of learned, baseline and the paired
difference, and on how many runs the learned method beats its baseline.
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from metaopt_hydra.summary import collect_runs


def _fmt(metric: str, value: float, ci: float, sign: str = "") -> str:
    scale, digits = (100, 1) if metric == "test_accuracy" else (1, 3)
    return f"{scale * value:{sign}.{digits}f} ± {scale * ci:.{digits}f}"


def _spread(values: list[float], metric: str) -> str:
    scale, digits = (100, 1) if metric == "test_accuracy" else (1, 3)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * std:.{digits}f}"


def _comparisons(m: dict) -> dict[tuple[str, str], dict]:
    """{(against, inner steps): figures} of one run: its baseline, and each ablation (`compare.ablations`)."""
    out = {("baseline", steps): r for steps, r in m["at_inner_steps"].items()}
    for name, entry in (m.get("ablations") or {}).items():
        out.update({(name, steps): r for steps, r in entry["at_inner_steps"].items()})
    return out


def seeds_table(dirs: list[Path]) -> None:
    """One row per directory, baseline and unroll length: mean ± std over its runs, and wins."""
    print("| runs | against | metric (inner steps) | learned (mean ± std) | baseline (mean ± std) | learned - baseline "
          "(mean ± std) | learned better on | meta-steps | train wall-clock (mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes: list[str] = []
    for root in dirs:
        runs = [r["_metrics"] for r in collect_runs(root) if r["status"] == "ok" and "learned" in r["_metrics"]]
        failed = [r for r in collect_runs(root) if r["status"] != "ok"]
        grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for m in runs:
            for key, r in _comparisons(m).items():
                grouped[key].append({**r, "metric": m["metric"], "direction": m["metric_direction"]})
        for (against, steps), rows in grouped.items():
            metric, lower = rows[0]["metric"], rows[0]["direction"].startswith("lower")
            wins = sum((r["difference"] < 0) == lower and r["difference"] != 0 for r in rows)
            print(f"| {root.name} ({len(rows)} runs{f', {len(failed)} not ok' if failed else ''}) | {against} "
                  f"| {metric} ({steps}; {rows[0]['direction']}) | {_spread([r['learned'] for r in rows], metric)} "
                  f"| {_spread([r['baseline'] for r in rows], metric)} "
                  f"| {_spread([r['difference'] for r in rows], metric)} | {wins}/{len(rows)} "
                  f"| {runs[0]['meta_steps']} | {statistics.fmean(m['train_seconds'] for m in runs) / 60:.1f} min |")
        if runs:
            chosen = sorted({m["baseline_name"] for m in runs})
            notes.append(f"- {root.name}: baseline chosen on validation tasks: {'; '.join(chosen)}")
            for name in dict.fromkeys(a for m in runs for a in (m.get("ablations") or {})):
                labels = sorted({m["ablations"][name]["label"] for m in runs if name in m.get("ablations", {})})
                notes.append(f"- {root.name}: ablation {name} chosen on validation tasks: {'; '.join(labels)}")
        notes.extend(f"- {root.name}/{r['run']}: {r['status']}: {r['error']}" for r in failed)
    if notes:
        print()
        print("\n".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+")
    parser.add_argument("--seeds", action="store_true", help="one row per directory: mean and spread over its runs")
    args = parser.parse_args()
    if args.seeds:
        seeds_table(args.dirs)
        return
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
