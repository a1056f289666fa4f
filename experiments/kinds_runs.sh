#!/usr/bin/env bash
# The learned-vs-baseline runs behind README's meta-parameter kinds tables: every kind over meta-training
# seeds 0, 1, 2 on one CPU thread (the learned optimizer also on two), one run after another, resumable:
#   bash experiments/kinds_runs.sh [OUT_DIR]
# then: python experiments/compare_table.py --seeds OUT_DIR/distill_digits_1 OUT_DIR/distill_digits_10 \
#         OUT_DIR/learned_loss OUT_DIR/learned_augmentation
#       python experiments/compare_table.py --seeds OUT_DIR/learned_optimizer_lstm OUT_DIR/learned_optimizer_mlp \
#         OUT_DIR/learned_optimizer_lstm_2threads OUT_DIR/learned_optimizer_mlp_2threads
#       python experiments/compare_table.py --seeds OUT_DIR/learned_optimizer_online
# ONLY=regex runs only the groups whose tag matches it (tags: distill, learned_loss, learned_optimizer,
# augmentation, 2threads, 2threads_mlp, online; e.g. ONLY=distill).
set -euo pipefail
out=${1:-outputs/kinds}
source "$(dirname "$0")/runs_lib.sh"
pick() { [[ -z "${ONLY:-}" || "$1" =~ $ONLY ]]; }
for seed in 0 1 2; do
  pick distill && run distill_digits_1/$seed distill_digits seed=$seed
  pick distill && run distill_digits_10/$seed distill_digits metaparam.data.n_per_class=10 seed=$seed
  pick learned_loss && run learned_loss/$seed learned_loss seed=$seed
  pick learned_optimizer && run learned_optimizer_lstm/$seed learned_optimizer seed=$seed
  pick learned_optimizer && run learned_optimizer_mlp/$seed learned_optimizer \
    metaparam.optimizer.architecture=mlp seed=$seed
  # vmapped as trained (the planner's timing measured vmap only 1.16x faster than one task at a time here)
  pick augmentation && run learned_augmentation/$seed learned_augmentation seed=$seed batching=vmap
done
for seed in 0 1 2; do  # the learned optimizer (LSTM) again on two threads (other float reduction orders)
  pick 2threads && OMP_NUM_THREADS=2 run learned_optimizer_lstm_2threads/$seed learned_optimizer seed=$seed
done
for seed in 0 1 2; do
  pick 2threads_mlp && OMP_NUM_THREADS=2 run learned_optimizer_mlp_2threads/$seed learned_optimizer \
    metaparam.optimizer.architecture=mlp seed=$seed
done
for seed in 0 1 2; do  # the LSTM optimizer meta-trained online (PES) on 100-step unrolls, windows of 10
  pick online && run learned_optimizer_online/$seed learned_optimizer_online seed=$seed
done
true
