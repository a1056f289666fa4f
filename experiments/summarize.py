"""Summarize a sweep: python experiments/summarize.py DIR

Reads every run under DIR (a Hydra multirun directory, or an explore directory), prints a
Markdown table (one row per run: overrides, status, metrics, error) and writes DIR/summary.csv.
Failed or missing runs are listed with their error; a run whose process still lives, as "running". Runs that
differ only in `seed=` are also summarized over their seeds (mean ± standard deviation), one line per group. A
sweep of dry runs (`-m ... dry_run=true`) is listed as "planned", with a last line that sums its price.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaopt_hydra.summary import (collect_runs, dry_run_totals, launcher_parallelism, markdown_table, over_seeds,
                                   write_csv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    if not args.dir.is_dir():
        print(f"summarize: {args.dir} is not a directory", file=sys.stderr)
        return 2
    rows = collect_runs(args.dir)
    if not rows:
        print(f"summarize: no runs (no metrics.json or .hydra folder) under {args.dir}", file=sys.stderr)
        return 1
    print(markdown_table(rows))
    write_csv(rows, args.dir / "summary.csv")
    seeds = over_seeds(rows)
    if seeds:
        print("\nover seeds (mean ± std of the runs that ended ok):\n" + seeds)
    ok = sum(r["status"] == "ok" for r in rows)
    planned = sum(r["status"] == "planned" for r in rows)
    running = sum(r["status"] in ("running", "running?") for r in rows)
    priced = f"{planned} planned (dry runs), " if planned else ""
    live = f"{running} running, " if running else ""
    print(f"\n{len(rows)} run(s): {ok} ok, {live}{priced}{len(rows) - ok - planned - running} not ok -> "
          f"{args.dir / 'summary.csv'}")
    first = next((r for r in rows if r["status"] == "planned"), None)
    totals = dry_run_totals(rows, launcher_parallelism(args.dir / first["run"]) if first else 1)
    if totals:
        print(totals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
