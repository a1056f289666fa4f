#!/usr/bin/env bash
# The Omniglot runs behind README's CS330 table, one after another on one CPU thread each
# (the within-alphabet 20-way runs: experiments/omniglot_within_runs.sh):
#   bash experiments/omniglot_runs.sh [OUT_DIR] [META_STEPS_5WAY] [META_STEPS_20WAY]
# then: python experiments/omniglot_table.py runs=OUT_DIR
set -euo pipefail
out=${1:-outputs/omniglot}
steps5=${2:-1000}
steps20=${3:-400}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
run() {  # name, experiment, extra overrides...
  local name=$1 experiment=$2; shift 2
  if [ -f "$out/$name/metrics.json" ] && grep -q '"status": "ok"' "$out/$name/metrics.json"; then return; fi
  /usr/bin/time -f "$name: %e s wall" "$py" experiments/train.py "experiment=$experiment" progress=false \
    "hydra.run.dir=$out/$name" "$@"
}
# HW2's ProtoNet settings (5-way episodes, meta-batch 16, constant lr), not the 60-way default
run protonet_5way omniglot_protonet meta_steps="$steps5" task.n_way=5 task.k_query=5 meta_batch_size=16 \
  lr_schedule=null log_every=100
run maml_5way omniglot_maml meta_steps="$steps5"
run maml_learned_lr_5way omniglot_maml_learned_lr meta_steps="$steps5"
run fomaml_5way omniglot_fomaml meta_steps="$steps5"
run maml_20way omniglot_maml meta_steps="$steps20" task.n_way=20
