#!/usr/bin/env bash
# The Omniglot runs behind README's table, one after another on one CPU thread each:
#   bash experiments/omniglot_runs.sh [OUT_DIR] [META_STEPS_5WAY]
# then: python experiments/omniglot_table.py OUT_DIR
# ProtoNets: the config's 60-way episodes (~20 min); 5-way MAML-style runs: META_STEPS_5WAY meta-steps;
# 20-way MAML-style runs (the heads the within-alphabet 20-way protocol needs): the config's time_limit (55 min).
# A finished run (metrics.json with status ok) is skipped, so the script resumes where it stopped.
set -euo pipefail
out=${1:-outputs/omniglot}
steps5=${2:-1000}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
run() {  # name, experiment, extra overrides...
  local name=$1 experiment=$2; shift 2
  if [ -f "$out/$name/metrics.json" ] && grep -q '"status": "ok"' "$out/$name/metrics.json"; then return; fi
  /usr/bin/time -f "$name: %e s wall" "$py" experiments/train.py "experiment=$experiment" progress=false \
    "hydra.run.dir=$out/$name" "$@"
}
run protonet omniglot_protonet
run maml_5way omniglot_maml meta_steps="$steps5"
run maml_learned_lr_5way omniglot_maml_learned_lr meta_steps="$steps5"
run fomaml_5way omniglot_fomaml meta_steps="$steps5"
run maml_20way omniglot_maml task.n_way=20
run maml_learned_lr_20way omniglot_maml_learned_lr task.n_way=20
run fomaml_20way omniglot_fomaml task.n_way=20
