#!/bin/bash
# The GPU checks of issue 15 as prepared runs (a session is lent a GPU for minutes, at most 600 s per command):
# CUDA correctness, then the headline (conv4 MAML, meta-batch 16, T=1: native vs matmul convolutions, eager and
# compiled with CUDA graphs, Inductor's kernels (metaopt-cudagraph; native only: it miscompiles the matmul
# convolution, README) and eager's (metaopt-aotgraph: backend="cudagraphs"), kernel profiles, the whole meta_train
# step drawn in turn, prefetched and overlapped, and where its time goes).
# Run from the repository root, one part per device command so each stays under its limit:
#     PARTS=check OUT=/some/dir experiments/gpu_checks.sh     # ~3 min: check_cuda.py (writes check.txt)
#     PARTS=bench OUT=/some/dir experiments/gpu_checks.sh     # <= BENCH_S: the headline (bench.txt)
# PARTS (default "check bench": both, for a machine without the per-command limit) names the parts to run, of:
#   check   check_cuda.py --only sampling matmul prefetch overlap graphs (timeout 180 s)
#   bench   the headline table, profiles and whole-step rows (timeout BENCH_S, default 420 s)
#   more    T=5 and meta-batch 32 (README's "not measured compiled" rows), matmul convolution (MORE_S, 300 s)
#   tf32    the matmul convolution at T=1 with TF32 GEMMs (`--tf32`: cuDNN's convolutions use TF32 by default,
#           GEMMs do not; the gradients then compare at 1e-2) (TF32_S, 200 s)
#   layout  the native convolution compiled with channels-last forced on Inductor (`--inductor-config
#           force_layout_optimization=True`; its heuristics skip them for grouped convolutions) (LAYOUT_S, 200 s)
#   exact   compiled_exactness.py on conv=matmul in float64 and float32 with CUDA graphs (is Inductor's program
#           right? README: torch 2.11 miscompiled it) (EXACT_S per run, 200 s)
# MORE=1, TF32=1, LAYOUT=1, EXACT=1 add their part to PARTS (the older spelling).
# Writes smi.txt and <part>.txt (check.txt, bench.txt, more.txt, tf32.txt, layout.txt, exact.txt) under $OUT
# (default: the current directory).
OUT=${OUT:-.}
PARTS=${PARTS:-check bench}
for flag in MORE TF32 LAYOUT EXACT; do
  if [ "${!flag:-0}" = 1 ]; then PARTS="$PARTS ${flag,,}"; fi
done
wants() { [[ " $PARTS " == *" $1 "* ]]; }
export PYTHONPATH=$PWD:$PWD/experiments PYTHONUNBUFFERED=1
cd experiments || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/smi.txt"
if wants check; then
  timeout 180 python3 check_cuda.py --only sampling matmul prefetch overlap graphs 2>&1 | grep -v Warning \
    | tee "$OUT/check.txt"
fi
if wants bench; then
  timeout "${BENCH_S:-420}" python3 bench_gpu.py --meta-batch 16 --steps 1 --conv native matmul \
    --only metaopt metaopt-aotgraph "metaopt-cudagraph[native]" --cudnn-benchmark --profile --top-kernels 6 \
    --repeats 30 --train-steps 40 --profile-train 2>&1 | grep -v Warning | tee "$OUT/bench.txt"
fi
if wants more; then
  timeout "${MORE_S:-300}" python3 bench_gpu.py --meta-batch 16 32 --steps 5 --conv matmul \
    --only metaopt metaopt-aotgraph --cudnn-benchmark --repeats 15 --train-steps 0 \
    2>&1 | grep -v Warning | tee "$OUT/more.txt"
fi
if wants tf32; then
  timeout "${TF32_S:-200}" python3 bench_gpu.py --meta-batch 16 --steps 1 --conv matmul --tf32 \
    --only metaopt metaopt-aotgraph --cudnn-benchmark --repeats 30 --train-steps 0 \
    2>&1 | grep -v Warning | tee "$OUT/tf32.txt"
fi
if wants layout; then
  timeout "${LAYOUT_S:-200}" python3 bench_gpu.py --meta-batch 16 --steps 1 --conv native \
    --only metaopt metaopt-cudagraph --cudnn-benchmark --profile --top-kernels 6 --repeats 30 --train-steps 0 \
    --inductor-config force_layout_optimization=True 2>&1 | grep -v Warning | tee "$OUT/layout.txt"
fi
if wants exact; then
  for options in "--dtype float64" "--mode reduce-overhead"; do
    # shellcheck disable=SC2086  # two words each
    timeout "${EXACT_S:-200}" python3 compiled_exactness.py --conv matmul $options \
      2>&1 | grep -v Warning | tee -a "$OUT/exact.txt"
  done
fi
