#!/usr/bin/env bash
# Issue #13's side-by-side speed comparison, one run after another on this machine: the report's own PyTorch
# code (../shared/reference/seed_torch_bench.py, set up by ../shared/reference/setup.sh) and ours
# (python -m iaf_jax.experiments.bench, both MNIST block forms), batch 64, 2 threads, synthetic binary 28x28 images.
#   scripts/speed_vs_reference.sh [OUT_DIR]      (default runs/speed)
# DEVICES=1,2 times ours on 1 and on 2 XLA:CPU devices (one process, the batch split over them: bench --devices);
# CONFIGS=... replaces the list of our configs (default: both block forms of the three MNIST configs).
# ROUNDS=N interleaves instead: for each round and each of CONFIGS (default the three report-block MNIST configs), the
# reference and then ours (ours first in even rounds), so the two figures of each ratio are adjacent in time: on
# some machines of this class the speed drifts by 30% between minutes (an AVX2 one, 2026-12-05: the bench's matmul
# ceiling 121 and 165 GFLOP/s four minutes apart). Ours on DEVICES (default 1) devices. Prints each round's ratios
# and their medians, and writes them to OUT_DIR/interleaved.json.
# CORE=N pins both to CPU core N with one thread each (the reference THREADS=1, ours one XLA thread on one device):
# the same resources for both while the other core is busy (a training), or to compare per core.
set -eu
out=${1:-runs/speed}; mkdir -p "$out"
A=${ANCHOR:-${XDG_CACHE_HOME:-$HOME/.cache}/iaf-anchors}
py=${PYTHON:-.venv/bin/python}
pin=() threads=2
if [ -n "${CORE:-}" ]; then
  [ -n "${DEVICES:-}" ] && [ "${DEVICES}" != 1 ] && { echo "speed_vs_reference.sh: CORE runs ours on 1 device" >&2; exit 2; }
  pin=(taskset -c "$CORE") threads=1 DEVICES=1
  export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false ${XLA_FLAGS:-}"
fi
reference() {  # reference N_IAF WIDTH: one JSON line
  SEED_TORCH=$A/seed-torch THREADS=$threads "${pin[@]}" "$A/torch-venv/bin/python" ../shared/reference/seed_torch_bench.py \
    "$1" "$2" 64
}
ours() {  # ours BENCH_FLAGS...: the bench at the reference's batch, on DEVICES devices
  "${pin[@]}" "$py" -m iaf_jax.experiments.bench --batch 64 --repeats 5 --steps 10 --no_sampling \
    --devices "${DEVICES:-1}" "$@"
}
if [ -n "${ROUNDS:-}" ]; then
  configs=${CONFIGS:-mnist:diag,mnist:iaf_d2_w320,mnist:iaf_d8_w1920}
  for r in $(seq 1 "$ROUNDS"); do
    for c in ${configs//,/ }; do
      case $c in
        mnist:diag) args="0 320" ;; mnist:iaf_d2_w320) args="2 320" ;; mnist:iaf_d8_w1920) args="8 1920" ;;
        *) echo "speed_vs_reference.sh: no reference model for $c (ROUNDS takes mnist:diag, iaf_d2_w320, iaf_d8_w1920)" >&2
           exit 2 ;;
      esac
      name=${c#mnist:}
      if [ $((r % 2)) = 1 ]; then reference $args > "$out/reference_r${r}_$name.json"; fi
      ours --configs "$c" --json "$out/ours_r${r}_$name.json" | tail -1
      if [ $((r % 2)) = 0 ]; then reference $args > "$out/reference_r${r}_$name.json"; fi
    done
  done
  "$py" - "$out" "$ROUNDS" "$configs" <<'PY'
import json, statistics, sys
out, rounds, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
result = {}
for c in configs:
    name, rows = c.split(":", 1)[1], []
    for r in range(1, rounds + 1):
        ref = json.load(open(f"{out}/reference_r{r}_{name}.json"))
        ours = json.load(open(f"{out}/ours_r{r}_{name}.json"))["rows"][0]
        rows.append({"round": r, "ref_train": ref["train_images_per_s"], "ours_train": ours["train_images_per_s"],
                     "ref_is": ref["is_samples_per_s"], "ours_is": ours["is_samples_per_s"],
                     "train_ratio": ours["train_images_per_s"] / ref["train_images_per_s"],
                     "is_ratio": ours["is_samples_per_s"] / ref["is_samples_per_s"],
                     "gflops": ours["gflops_per_s"], "ceiling": ours["matmul_ceiling_gflops"],
                     "compile_s": ours["compile_s"]})
    med = {k: statistics.median(row[k] for row in rows) for k in ("train_ratio", "is_ratio")}
    med["fraction_of_ceiling"] = statistics.median(row["gflops"] / row["ceiling"] for row in rows)
    result[c] = {"rounds": rows, "median": med}
    for row in rows:
        print(f"{c:22s} round {row['round']}: train {row['ours_train']:8.1f} / {row['ref_train']:8.1f} = "
              f"{row['train_ratio']:.2f}x   IS {row['ours_is']:8.0f} / {row['ref_is']:7.0f} = {row['is_ratio']:.2f}x   "
              f"{row['gflops']:.1f} of {row['ceiling']:.1f} GFLOP/s   compile {row['compile_s']:.1f} s")
    print(f"{c:22s} median: train {med['train_ratio']:.2f}x, IS {med['is_ratio']:.2f}x, "
          f"{100 * med['fraction_of_ceiling']:.1f}% of the ceiling")
json.dump(result, open(f"{out}/interleaved.json", "w"), indent=1)
PY
  exit 0
fi
for cfg in "0 320" "2 320" "8 1920"; do
  reference $cfg
done | tee "$out/reference.jsonl"
two="@model.block=two_conv@model.context_dim=0"   # the block and context used before the report's
configs=${CONFIGS:-mnist:diag,mnist:iaf_d2_w320,mnist:iaf_d8_w1920,mnist:diag$two,mnist:iaf_d2_w320$two,mnist:iaf_d8_w1920$two}
ours --json "$out/ours.json" --configs "$configs" | tail -13
