#!/usr/bin/env bash
# One command for a GPU/TPU host (issue #13; written 2026-12-01, not yet run anywhere): the bench table for
# the MNIST configs (both block forms) and the
# 4- and 20-rung ResNet VAE, then IAF 2/320 trained on binarized MNIST for a fixed MINUTES (default 4) and
# evaluated on the whole test set with K=128. Everything lands in OUT (default runs/accelerator_check): bench.json,
# the run's workdir with metrics.jsonl and eval_test_best_K128.json, and summary.json.
#   DATA_DIR=DIR_WITH_binarized_mnist.npz scripts/accelerator_check.sh
# Needs jax (any backend), flax, optax, orbax-checkpoint, chex, numpy, absl-py and ml_collections; not
# tensorflow-datasets (the data comes from DATA_DIR). QUICK=1: tiny bench models and a 0.2-minute run (CPU check).
set -eu
out=${OUT:-runs/accelerator_check}; mkdir -p "$out"
py=${PYTHON:-python3}
data=${DATA_DIR:-../shared/data}
minutes=${MINUTES:-4}
quick=()
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick); minutes=0.2; fi
"$py" -c "import jax; print('devices:', jax.devices())"
"$py" -m iaf_jax.experiments.bench "${quick[@]}" --batch 64 --repeats 3 --steps 10 --json "$out/bench.json" \
  --configs "mnist:diag,mnist:iaf_d2_w320,mnist:iaf_d8_w1920,mnist:diag@model.block=two_conv@model.context_dim=0,mnist:iaf_d2_w320@model.block=two_conv@model.context_dim=0,cifar10:rungs4_iaf,cifar10:rungs20_iaf"
"$py" train.py --config=configs/mnist.py:iaf_d2_w320 --workdir="$out/iaf_d2_w320" --config.data.dir="$data" \
  --config.train.time_budget_minutes="$minutes"
"$py" evaluate.py --workdir="$out/iaf_d2_w320" --num_samples=128 --split=test
"$py" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
run = os.path.join(out, "iaf_d2_w320")
end = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"event"' in l][-1]
ev = json.load(open(os.path.join(run, "eval_test_best_K128.json")))
bench = json.load(open(os.path.join(out, "bench.json")))
summary = {"device": bench.get("machine", {}), "train_steps": end["step"], "train_wall_s": end["wall_time"],
           "steps_per_s": end["step"] / end["wall_time"], "test_neg_elbo": ev["neg_elbo_nats"],
           "test_nll_K128": ev["nll_nats"], "checkpoint_step": ev["checkpoint_step"]}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary))
PY
