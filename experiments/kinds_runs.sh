#!/usr/bin/env bash
# The learned-vs-baseline runs behind README's meta-parameter kinds table, one after another:
#   bash experiments/kinds_runs.sh [OUT_DIR]
# then: python experiments/compare_table.py OUT_DIR/*
set -euo pipefail
out=${1:-outputs/kinds}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
run() {  # name, overrides...
  local name=$1; shift
  if [ -f "$out/$name/metrics.json" ] && grep -q '"status": "ok"' "$out/$name/metrics.json"; then return; fi
  /usr/bin/time -f "$name: %e s wall" "$py" experiments/train.py progress=false "hydra.run.dir=$out/$name" "$@"
}
run distill_digits_1 experiment=distill_digits
run distill_digits_10 experiment=distill_digits metaparam.data.n_per_class=10
run learned_optimizer_lstm experiment=learned_optimizer
run learned_optimizer_mlp experiment=learned_optimizer metaparam.optimizer.architecture=mlp
run learned_loss experiment=learned_loss
run learned_augmentation experiment=learned_augmentation
