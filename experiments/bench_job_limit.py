"""Benchmark: does a job end within its `job_time_limit`, evaluation included? (CPU, wall clock.)

A job's wall clock (`job_time_limit`, `metaopt.deadline`) is kept by planning every evaluation that follows training
before it starts and keeping their predicted seconds x1.5: training stops where what is left is that reservation.
This bench runs `experiments/train.py` with a job limit on each problem, one after the other (each run alone, on
`--threads` threads), and prints, per run, the limit, when the job ended, how training stopped, what was predicted
for the work after training and what it measured. A problem whose evaluations cannot fit its limit is refused
before training: the row says so (a refusal is a correct outcome, and its metrics.json says why).

    python experiments/bench_job_limit.py [--threads 1] [--problems sinusoid omniglot_5way ...] [--data-root PATH]
        [--out DIR] [--limit SECONDS]

The last line is `job_within_limit <problem>:<job seconds / limit> ... (<k>/<n> within)`. Omniglot problems are
skipped, with a line saying so, where the data is not found. Wall-clock figures vary with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = {  # name -> (job_time_limit, overrides of conf/train.yaml)
    "sinusoid": ("30s", []),
    "omniglot_5way": ("3m", ["experiment=omniglot_maml"]),
    "omniglot_protonet": ("3m", ["experiment=omniglot_protonet", "ensemble=1", "task.split_by=alphabet",
                                 "task.val_alphabets=1"]),
    "omniglot_20way": ("4m", ["experiment=omniglot_maml", "task.n_way=20"]),  # its evaluations alone need ~6 min
    # a baselines comparison after training: a meta-trained baseline, 11 validations, meta-tests at 20 and 100 steps
    "learned_optimizer": ("5m", ["experiment=learned_optimizer"]),
}


def run_train(overrides: list[str], run_dir: Path, threads: int, record: str = "metrics.json") -> dict:
    """`experiments/train.py` with `overrides` in `run_dir` on `threads` threads, alone; its `record` (JSON)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), *overrides, "progress=false",
                    f"hydra.run.dir={run_dir}"], env=env, cwd=ROOT, capture_output=True, text=True)
    return json.loads((run_dir / record).read_text())


def data_root(overrides: list[str]) -> Path:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return Path(compose("train", overrides=overrides).data.root)


def runs_parser(doc: str, problems: list[str], prefix: str) -> argparse.ArgumentParser:
    """The arguments every run-by-run bench takes: --threads, --problems, --data-root, --out (default: a new
    temporary folder named `prefix`...)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--problems", nargs="+", choices=problems, default=problems)
    parser.add_argument("--data-root", default=None, help="Omniglot's folder (default: the config's data.root)")
    parser.add_argument("--out", default=None, type=Path, help="run directories (default: a temporary folder)")
    parser.set_defaults(prefix=prefix)
    return parser


def problem_overrides(name: str, overrides: list[str], args: argparse.Namespace) -> list[str] | None:
    """The problem's overrides with --data-root, or None (said in a table row) where its Omniglot data is missing."""
    overrides = overrides + ([f"data.root={args.data_root}"] if args.data_root else [])
    if name.startswith("omniglot") and not data_root(overrides).exists():
        print(f"| {name} | skipped: no Omniglot data at {data_root(overrides)} |")
        return None
    return overrides


def out_dir(args: argparse.Namespace) -> Path:
    """--out, or a new temporary folder; said on the first line."""
    out = args.out or Path(tempfile.mkdtemp(prefix=args.prefix))
    print(f"one run at a time, {args.threads} thread(s); run directories under {out}")
    return out


def _row(name: str, limit: str, metrics: dict) -> tuple[str, float | None]:
    """The table row of one run and its job seconds / limit (None: refused before training)."""
    if metrics.get("status") != "ok":
        error = str(metrics.get("error", ""))
        refused = "DeadlineExceeded" in error
        return (f"| {name} | {limit} | {'refused before training' if refused else 'failed'}: {error[:160]} |", None)
    seconds, after = metrics["job_seconds"], metrics.get("job_after_training_seconds")
    predicted = sum(metrics["job_reserved"].values())
    ratio = seconds / metrics["job_time_limit"]
    return (f"| {name} | {limit} | {seconds:.1f} s ({ratio:.2f}) | {metrics['meta_steps']} "
            f"({metrics['stopped_by'] or 'all asked'}) | {metrics['train_seconds']:.1f} | {predicted:.1f} | "
            f"{metrics['job_reserved_seconds']:.1f} | {after:.1f} | "
            f"{after / predicted if predicted else float('nan'):.2f} |", ratio)


def main() -> None:
    parser = runs_parser(__doc__ or "", list(PROBLEMS), "bench_job_limit.")
    parser.add_argument("--limit", default=None, help="one job_time_limit for every problem (e.g. 5s: a smoke run)")
    args = parser.parse_args()
    out = out_dir(args)
    print("| problem | job_time_limit | job ended (/ limit) | meta-steps (stopped by) | training s | "
          "predicted after training s | kept s (x1.5) | measured after training s | measured / predicted |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios: dict[str, float] = {}
    refused = 0
    for name in args.problems:
        limit, base = PROBLEMS[name]
        limit = args.limit or limit
        overrides = problem_overrides(name, base, args)
        if overrides is None:
            continue
        metrics = run_train([*overrides, "time_limit=null", f"job_time_limit={limit}"], out / name, args.threads)
        line, ratio = _row(name, limit, metrics)
        print(line, flush=True)
        if ratio is None:
            refused += 1
        else:
            ratios[name] = ratio
    within = sum(r <= 1.0 for r in ratios.values())
    print(f"job_within_limit {' '.join(f'{k}:{v:.3f}' for k, v in ratios.items())} "
          f"({within}/{len(ratios)} within; {refused} refused before training)")


if __name__ == "__main__":
    main()
