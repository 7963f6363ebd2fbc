#!/usr/bin/env bash
# Issue #13's side-by-side speed comparison, one run after another on this machine: the report's own PyTorch
# code (../shared/reference/seed_torch_bench.py, set up by ../shared/reference/setup.sh) and ours
# (python -m iaf_jax.experiments.bench, both MNIST block forms), batch 64, 2 threads, synthetic binary 28x28 images.
#   scripts/speed_vs_reference.sh [OUT_DIR]      (default runs/speed)
# DEVICES=1,2 times ours on 1 and on 2 XLA:CPU devices (one process, the batch split over them: bench --devices);
# CONFIGS=... replaces the list of our configs (default: both block forms of the three MNIST configs).
set -eu
out=${1:-runs/speed}; mkdir -p "$out"
A=${ANCHOR:-${XDG_CACHE_HOME:-$HOME/.cache}/iaf-anchors}
py=${PYTHON:-.venv/bin/python}
for cfg in "0 320" "2 320" "8 1920"; do
  SEED_TORCH=$A/seed-torch THREADS=2 "$A/torch-venv/bin/python" ../shared/reference/seed_torch_bench.py $cfg 64
done | tee "$out/reference.jsonl"
two="@model.block=two_conv@model.context_dim=0"   # the block and context used before the report's
configs=${CONFIGS:-mnist:diag,mnist:iaf_d2_w320,mnist:iaf_d8_w1920,mnist:diag$two,mnist:iaf_d2_w320$two,mnist:iaf_d8_w1920$two}
"$py" -m iaf_jax.experiments.bench --batch 64 --repeats 5 --steps 10 --no_sampling --json "$out/ours.json" \
  --devices "${DEVICES:-1}" --configs "$configs" | tail -13
