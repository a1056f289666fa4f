"""Benchmark: the budgeted explorer against sequential Optuna TPE (no pruning) and random search, same time and memory.

    OMP_NUM_THREADS=1 python experiments/bench_explore.py --time 240 --memory 1GB [--search sinusoid_maml]

Each method gets the same wall-clock time on the same search space (conf/search/NAME.yaml):

- explorer: `experiments/explore.py` (parallel trials packed by predicted memory, rungs of
  meta-steps with dominance pruning, children around the front), in a subprocess;
- tpe: Optuna's multi-objective TPE, one trial at a time, each trained to the explorer's full
  length (its last rung) with no pruning, in this process (no process start per trial);
- random: the same with Optuna's RandomSampler.

Every trial is scored like the explorer's: (validation loss, training seconds, peak bytes:
predicted, or measured where higher); a trial counts if it finished before the deadline. The table
gives the trials evaluated, the best validation loss, and the hypervolume of each method's final front against a
fixed reference point (`--reference`: validation loss, seconds, MB), then the explorer's ratios. Before it, the
explorer's own line on its time predictions (`metaopt_hydra.explore.report.time_summary`). `--methods explorer`
runs the explorer alone.
"""
from __future__ import annotations

import argparse
import csv
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metaopt.budget import parse_bytes
from metaopt.explore import hypervolume, pareto_front
from metaopt_hydra.build import build, train_from_config, validation
from metaopt_hydra.explore.search import SearchSpace

ROOT = Path(__file__).resolve().parents[1]


def _space(search: str) -> tuple[SearchSpace, list[str], dict]:
    spec = OmegaConf.load(ROOT / "conf" / "search" / f"{search}.yaml")
    base = [str(o) for o in OmegaConf.to_container(spec.base, resolve=True)]  # type: ignore[union-attr]
    return SearchSpace(spec.params), base, OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "explore.yaml"))


def run_explorer(args: argparse.Namespace, out: Path) -> list[tuple[float, float, float]]:
    run_dir = out / "explorer"
    if run_dir.exists():  # explore.py resumes a study it finds in its run directory: the bench needs a fresh one
        shutil.rmtree(run_dir)
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "explore.py"), f"search={args.search}",
                    f"explore.time={args.time}s", f"explore.memory={args.memory}",
                    f"explore.max_parallel={args.max_parallel}", f"explore.rung_steps={args.rung_steps}",
                    f"explore.seed={args.seed}",
                    f"hydra.run.dir={run_dir}"], check=True, cwd=ROOT, capture_output=True, text=True)
    print(f"explorer: {done.stdout.strip().splitlines()[-1]}", flush=True)  # its time predictions
    with open(run_dir / "pareto.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val_loss"]]
    return [(float(r["val_loss"]), float(r["train_seconds"]),
             max(int(r["predicted_peak_bytes"]), int(r["measured_peak_bytes"])) / 1e6) for r in rows]


def run_sequential(args: argparse.Namespace, sampler: optuna.samplers.BaseSampler) -> list[tuple[float, float, float]]:
    space, base, explore = _space(args.search)
    steps = args.rung_steps * explore["explore"]["eta"] ** (explore["explore"]["rungs"] - 1)
    study = optuna.create_study(directions=["minimize"] * 3, sampler=sampler)
    points: list[tuple[float, float, float]] = []
    failures: dict[str, int] = {}
    deadline = time.monotonic() + args.time
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"), \
            tempfile.TemporaryDirectory() as tmp:
        while time.monotonic() < deadline:
            trial = study.ask(space.distributions)
            cfg = compose(config_name="train", overrides=base + space.overrides(trial.params) + [f"meta_steps={steps}"])
            try:
                parts = build(cfg)
                metrics = train_from_config(cfg, parts, Path(tmp) / str(trial.number), evaluate=False)
                validate = validation(cfg, parts)
                val = validate(parts.meta)["val_loss"] if validate else metrics["meta_train_loss"]
            except Exception as error:  # a failed trial counts as nothing (counted, so a broken baseline shows)
                failures[type(error).__name__] = failures.get(type(error).__name__, 0) + 1
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            if time.monotonic() > deadline or not math.isfinite(val):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            peak = max(metrics["predicted_peak_bytes"], metrics["measured_peak_bytes"])  # as the explorer scores it
            point = (val, metrics["train_seconds"], peak / 1e6)
            study.tell(trial, list(point))
            points.append(point)
    if failures:
        print(f"{type(sampler).__name__}: failed trials {failures}", file=sys.stderr)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", default="sinusoid_maml")
    parser.add_argument("--time", type=float, default=240.0, help="seconds per method")
    parser.add_argument("--memory", default="1GB")
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--rung-steps", type=int, default=200)
    parser.add_argument("--reference", type=float, nargs=3, default=[4.0, 120.0, 100.0],
                        help="hypervolume reference: validation loss, training seconds, predicted peak MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_explore"))
    parser.add_argument("--methods", nargs="+", choices=["explorer", "tpe", "random"],
                        default=["explorer", "tpe", "random"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parse_bytes(args.memory)  # a bad value fails here, before minutes of work
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tpe = "tpe (sequential, no pruning)"
    methods = {"explorer": ("explorer", lambda: run_explorer(args, args.out)),
               "tpe": (tpe, lambda: run_sequential(args, optuna.samplers.TPESampler(seed=args.seed))),
               "random": ("random (sequential)",
                          lambda: run_sequential(args, optuna.samplers.RandomSampler(seed=args.seed)))}
    results = {methods[m][0]: methods[m][1]() for m in args.methods}
    print(f"search={args.search}, {args.time:.0f} s and {args.memory} per method, reference point {args.reference}")
    print("| method | trials evaluated | best val_loss | front size | hypervolume |")
    print("|---|---|---|---|---|")
    volumes = {}
    for name, points in results.items():
        front = [points[i] for i in pareto_front(points)]
        volumes[name] = hypervolume(front, args.reference)
        best = min((p[0] for p in points), default=math.nan)
        print(f"| {name} | {len(points)} | {best:.4g} | {len(front)} | {volumes[name]:.4g} |")
    trials = {name: len(points) for name, points in results.items()}
    if "explorer" not in results or tpe not in results:
        return
    print(f"explorer_vs_tpe trials:{trials['explorer'] / max(trials[tpe], 1):.2f}x "
          f"hypervolume:{volumes['explorer'] / volumes[tpe] if volumes[tpe] else math.inf:.2f}x")


if __name__ == "__main__":
    main()
