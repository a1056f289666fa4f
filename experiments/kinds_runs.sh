#!/usr/bin/env bash
# The learned-vs-baseline runs behind README's meta-parameter kinds table, one after another:
#   bash experiments/kinds_runs.sh [OUT_DIR]
# then: python experiments/compare_table.py OUT_DIR/distill_digits_1 OUT_DIR/distill_digits_10 \
#         OUT_DIR/learned_loss OUT_DIR/learned_augmentation
#       python experiments/compare_table.py --seeds OUT_DIR/learned_optimizer_lstm OUT_DIR/learned_optimizer_mlp
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
for seed in 0 1 2; do  # the learned optimizer over three meta-training seeds
  run learned_optimizer_lstm/$seed experiment=learned_optimizer seed=$seed
  run learned_optimizer_mlp/$seed experiment=learned_optimizer metaparam.optimizer.architecture=mlp seed=$seed
done
run learned_loss experiment=learned_loss
run learned_augmentation experiment=learned_augmentation
