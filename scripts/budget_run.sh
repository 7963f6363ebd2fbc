#!/usr/bin/env bash
# One training run under a wall-clock budget on one core, then its evaluation:
#   scripts/budget_run.sh CORE WORKDIR CONFIG [--config.X=Y ...]
# Pins the process to CPU core CORE with one XLA thread, trains for train.time_budget_minutes = MINUTES (default
# 20, issue #14's protocol) on DATA_DIR (default ../shared/data) and evaluates the best checkpoint (EMA params) on
# all test images with K importance samples (default 128). With SUBSET=N it evaluates again with SUBSET_K samples
# (default 128) on the fixed random subset of N test images (data.fixed_subset, the same for every run), into
# eval_test_best_K{SUBSET_K}_n{N}.json beside the full eval_test_best_K{K}.json.
#   binarized MNIST (issue #14):  scripts/budget_run.sh 0 runs/x configs/mnist.py:iaf_d2_w320
#   CIFAR-10 (issue #15):         K=1 SUBSET=1000 MINUTES=30 scripts/budget_run.sh 0 runs/y configs/cifar10.py:rungs4_iaf
# Rerunning the same command resumes an unfinished run (a spent budget stays spent) and redoes the evaluations.
set -eu
core=$1 workdir=$2 config=$3; shift 3
data=${DATA_DIR:-../shared/data}
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false ${XLA_FLAGS:-}"
py=${PYTHON:-.venv/bin/python}
taskset -c "$core" "$py" train.py --config="$config" --workdir="$workdir" --config.data.dir="$data" \
  --config.train.time_budget_minutes="${MINUTES:-20}" "$@"
taskset -c "$core" "$py" evaluate.py --workdir="$workdir" --num_samples="${K:-128}" --split=test
if [ -n "${SUBSET:-}" ]; then
  taskset -c "$core" "$py" evaluate.py --workdir="$workdir" --num_samples="${SUBSET_K:-128}" --split=test \
    --max_examples="$SUBSET"
fi
