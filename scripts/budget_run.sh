#!/usr/bin/env bash
# One training run under the 20-minute one-core protocol of issue #14, then the full-test-set evaluation:
#   scripts/budget_run.sh CORE WORKDIR CONFIG [--config.X=Y ...]
# Pins the process to CPU core CORE with one XLA thread, trains for train.time_budget_minutes (default 20)
# on ../shared/data's binarized MNIST (DATA_DIR overrides) and evaluates the best checkpoint (EMA params) on all
# 10,000 test images with K=128. Rerunning the same command resumes an unfinished run.
set -eu
core=$1 workdir=$2 config=$3; shift 3
data=${DATA_DIR:-../shared/data}
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 ${XLA_FLAGS:-}"
py=${PYTHON:-.venv/bin/python}
taskset -c "$core" "$py" train.py --config="$config" --workdir="$workdir" --config.data.dir="$data" \
  --config.train.time_budget_minutes="${MINUTES:-20}" "$@"
taskset -c "$core" "$py" evaluate.py --workdir="$workdir" --num_samples="${K:-128}" --split=test
