#!/usr/bin/env bash
# The Omniglot runs behind README's CS330 table, one after another on one CPU thread each
# (the within-alphabet 20-way runs: experiments/omniglot_within_runs.sh):
#   bash experiments/omniglot_runs.sh [OUT_DIR] [META_STEPS_5WAY] [META_STEPS_20WAY]
# then: python experiments/omniglot_table.py OUT_DIR
set -euo pipefail
out=${1:-outputs/omniglot}
steps5=${2:-1000}
steps20=${3:-400}
source "$(dirname "$0")/runs_lib.sh"  # run NAME EXPERIMENT [OVERRIDES...]
# The table's ProtoNet run used the vmap-exact BatchNorm (experiment=omniglot_protonet's until 2026-12-03): kept.
primitive="model.norm=primitive model.channels_last=false"
# and was one run (omniglot_protonet trains an ensemble of two half-length runs since stop 36):
single="ensemble=1"
# and vmapped its meta-batches (the planner's only choice until 2026-12-03; it now times one task at a time too):
vmapped="batching=vmap"
# HW2's ProtoNet settings (5-way episodes, meta-batch 16, constant lr), not the 60-way default
# on held-out alphabets (ProtoNet's default trains on every background alphabet, for Lake's runs)
run protonet_5way omniglot_protonet task.split_by=alphabet task.val_alphabets=1 meta_steps="$steps5" task.n_way=5 \
  $primitive $single $vmapped task.k_query=5 meta_batch_size=16 \
  lr_schedule=null log_every=100
run maml_5way omniglot_maml meta_steps="$steps5" $vmapped
run maml_learned_lr_5way omniglot_maml_learned_lr meta_steps="$steps5" $vmapped
run fomaml_5way omniglot_fomaml meta_steps="$steps5" $vmapped
run maml_20way omniglot_maml meta_steps="$steps20" task.n_way=20 $vmapped
