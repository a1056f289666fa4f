# Shared by the *_runs.sh scripts (source it after setting $out):
#   run NAME EXPERIMENT [OVERRIDES...]   trains experiments/train.py into $out/NAME on one CPU thread,
# skipped when $out/NAME/metrics.json says status ok (so a script resumes where it stopped).
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
run() {
  local name=$1 experiment=$2; shift 2
  if [ -f "$out/$name/metrics.json" ] && grep -q '"status": "ok"' "$out/$name/metrics.json"; then return; fi
  /usr/bin/time -f "$name: %e s wall" "$py" experiments/train.py "experiment=$experiment" progress=false \
    "hydra.run.dir=$out/$name" "$@"
}
