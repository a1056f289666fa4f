"""Print the sinusoid table (Li et al. 2017, Table 1) beside what a multirun measured.

    python experiments/train.py --multirun experiment=sinusoid_maml,sinusoid_metasgd \\
        task.k_shot=5,10,20 hydra.sweep.dir=multirun/sinusoid_table
    python experiments/sinusoid_table.py multirun/sinusoid_table
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# Li et al. 2017 (Meta-SGD), Table 1: MSE after one inner step, mean ± 95% CI.
PAPER = {
    ("MAML", 5): "1.13 ± 0.18", ("MAML", 10): "0.85 ± 0.14", ("MAML", 20): "0.71 ± 0.12",
    ("Meta-SGD", 5): "0.90 ± 0.16", ("Meta-SGD", 10): "0.53 ± 0.09", ("Meta-SGD", 20): "0.31 ± 0.05",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    rows = {}
    for path in sorted(args.sweep_dir.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        method = "Meta-SGD" if "optimizer" in (m["config"]["metaparam"] or {}) else "MAML"
        k = m["config"]["task"]["k_shot"]
        rows[(method, k)] = (f"{m['meta_test_loss']:.2f} ± {m['meta_test_loss_ci95']:.2f}",
                             f"{m['train_seconds'] / 60:.1f} min")
    print("| method | K | paper MSE | metaopt MSE | meta-train wall-clock |")
    print("|---|---|---|---|---|")
    for (method, k), paper in PAPER.items():
        ours, wall = rows.get((method, k), ("not run", "-"))
        print(f"| {method} | {k} | {paper} | {ours} | {wall} |")


if __name__ == "__main__":
    main()
