#!/usr/bin/env bash
# XLA:CPU options against the default, one bench run after another (issue #13):
#   scripts/xla_flag_trials.sh OUT_DIR
# Each trial: the bench's training and importance-sampling timings of the report-block MNIST configs on 1 device,
# batch 64, with XLA_FLAGS set to the trial's options; the default runs first and last, to show the drift.
# None of the options changes the arithmetic (no fast-math).
set -u
out=${1:-runs/xla_flags}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
configs=${CONFIGS:-mnist:iaf_d2_w320,mnist:iaf_d8_w1920}
trials=(
  "default|"
  "vector512|--xla_cpu_prefer_vector_width=512"
  "onednn|--xla_cpu_use_onednn=true"
  "concurrency_scheduler|--xla_cpu_enable_concurrency_optimized_scheduler=true"
  "default_again|"
)
for t in "${trials[@]}"; do
  name=${t%%|*} flags=${t#*|}
  echo "== $name: XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" "$py" -m iaf_jax.experiments.bench --configs "$configs" --batch 64 --devices 1 \
    --steps ${STEPS:-10} --repeats ${REPEATS:-3} --num_samples 128 --json "$out/$name.json" 2>&1 \
    | grep -E "^(mnist|config|cifar)|rror" 
done
