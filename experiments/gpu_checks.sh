#!/bin/bash
# The GPU checks of issue 15 as one prepared run (a session is lent a GPU for minutes): CUDA correctness, then
# the headline (conv4 MAML, meta-batch 16, T=1: native vs matmul convolutions, eager and compiled with CUDA
# graphs, Inductor's kernels (metaopt-cudagraph) and eager's (metaopt-aotgraph: backend="cudagraphs", which
# sidesteps Inductor's miscompile of the matmul convolution), kernel profiles, the whole meta_train step drawn in
# turn, prefetched and overlapped, and where its time goes).
# Run from the repository root:
#     OUT=/some/dir experiments/gpu_checks.sh
# BENCH_S: the headline benchmark's time limit in seconds (default 500). MORE=1 then also times T=5 and
# meta-batch 32 with the matmul convolution (README's "not measured compiled" rows; ~2 more compiles). TF32=1
# then times the matmul convolution at T=1 with TF32 GEMMs (`--tf32`: cuDNN's convolutions use TF32 by default,
# GEMMs do not; the gradients then compare at 1e-2; one more compile).
# EXACT=1 then runs compiled_exactness.py on conv=matmul in float64 and float32 with CUDA graphs (is Inductor's
# program right? README: torch 2.11 miscompiled it; ~2 compiles of ~90 s).
# LAYOUT=1 then times the native convolution compiled with channels-last layouts forced on Inductor
# (`--inductor-config force_layout_optimization=True`; its heuristics skip them for grouped convolutions, the
# kernels that bound the compiled step; one more compile).
# Writes smi.txt, check.txt, bench.txt (and more.txt, tf32.txt, exact.txt, layout.txt) under $OUT (default: the
# current directory).
OUT=${OUT:-.}
export PYTHONPATH=$PWD:$PWD/experiments PYTHONUNBUFFERED=1
cd experiments || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/smi.txt"
timeout 180 python3 check_cuda.py --only sampling matmul prefetch overlap graphs 2>&1 | grep -v Warning \
  | tee "$OUT/check.txt"
timeout "${BENCH_S:-500}" python3 bench_gpu.py --meta-batch 16 --steps 1 --conv native matmul \
  --only metaopt metaopt-cudagraph metaopt-aotgraph --cudnn-benchmark --profile --top-kernels 6 --repeats 30 --train-steps 40 --profile-train \
  2>&1 | grep -v Warning | tee "$OUT/bench.txt"
if [ "${MORE:-0}" = 1 ]; then
  timeout "${MORE_S:-300}" python3 bench_gpu.py --meta-batch 16 32 --steps 5 --conv matmul \
    --only metaopt metaopt-cudagraph metaopt-aotgraph --cudnn-benchmark --repeats 15 --train-steps 0 \
    2>&1 | grep -v Warning | tee "$OUT/more.txt"
fi
if [ "${TF32:-0}" = 1 ]; then
  timeout "${TF32_S:-200}" python3 bench_gpu.py --meta-batch 16 --steps 1 --conv matmul --tf32 \
    --only metaopt metaopt-cudagraph metaopt-aotgraph --cudnn-benchmark --repeats 30 --train-steps 0 \
    2>&1 | grep -v Warning | tee "$OUT/tf32.txt"
fi
if [ "${LAYOUT:-0}" = 1 ]; then
  timeout "${LAYOUT_S:-200}" python3 bench_gpu.py --meta-batch 16 --steps 1 --conv native \
    --only metaopt metaopt-cudagraph --cudnn-benchmark --profile --top-kernels 6 --repeats 30 --train-steps 0 \
    --inductor-config force_layout_optimization=True 2>&1 | grep -v Warning | tee "$OUT/layout.txt"
fi
if [ "${EXACT:-0}" = 1 ]; then
  for options in "--dtype float64" "--mode reduce-overhead"; do
    # shellcheck disable=SC2086  # two words each
    timeout "${EXACT_S:-200}" python3 compiled_exactness.py --conv matmul $options \
      2>&1 | grep -v Warning | tee -a "$OUT/exact.txt"
  done
fi
