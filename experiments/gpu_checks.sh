#!/bin/bash
# The GPU checks of issue 15 as one prepared run (a session is lent a GPU for minutes): CUDA correctness, then
# the headline (conv4 MAML, meta-batch 16, T=1: native vs matmul convolutions, eager and compiled with CUDA
# graphs, kernel profiles, the whole meta_train step). Run from the repository root:
#     OUT=/some/dir experiments/gpu_checks.sh       # BENCH_S: the benchmark's time limit in seconds (default 400)
# Writes smi.txt, check.txt and bench.txt under $OUT (default: the current directory).
OUT=${OUT:-.}
export PYTHONPATH=$PWD:$PWD/experiments PYTHONUNBUFFERED=1
cd experiments || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/smi.txt"
timeout 90 python3 check_cuda.py --only sampling matmul prefetch 2>&1 | grep -v Warning | tee "$OUT/check.txt"
timeout "${BENCH_S:-400}" python3 bench_gpu.py --meta-batch 16 --steps 1 --conv native matmul \
  --only metaopt metaopt-cudagraph --cudnn-benchmark --profile --top-kernels 6 --repeats 30 --train-steps 40 \
  2>&1 | grep -v Warning | tee "$OUT/bench.txt"
