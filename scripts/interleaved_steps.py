"""Training throughput of config variants, timed in interleaved rounds in one process: the way to compare two
forms of a step on a machine whose speed drifts by 2x within minutes (docs/performance.md, eighth round).

  python scripts/interleaved_steps.py --config configs/mnist.py:diag \
      --variant train.micro_batches=1 --variant train.micro_batches=2 [--rounds 8] [--steps 30] [--batch 64]

Each variant is a set of comma-separated SECTION.FIELD=VALUE overrides ('' = the config as it is) and XLA
compiler options, xla:NAME=VALUE, that compile that variant's step alone (a comma-separated VALUE, such as a list
of fusion types, is kept whole), e.g.
  --variant '' --variant xla:xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY
so that XLA:CPU's options are compared in one process, which XLA_FLAGS (read once per process) cannot do. Every round
times --steps update steps of each variant, one variant after the other, on the same synthetic batch the bench
uses. Prints each variant's median img/s over the rounds and the median over rounds of its rate divided by the
first variant's in the same round (the ratio the drift moves least); --json writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_variant(variant: str):
  """'model.x=1,xla:opt=A,B' -> (['model.x=1'], {'opt': 'A,B'}): config overrides and XLA compiler options; a
  piece without '=' continues the previous value. 'true'/'false' and integers are passed as bool and int."""
  items = []
  for piece in variant.split(","):
    if not piece:
      continue
    if "=" in piece or not items:
      items.append(piece)
    else:
      items[-1] += "," + piece
  overrides, options = [], {}
  for item in items:
    if not item.startswith("xla:"):
      overrides.append(item)
      continue
    name, sep, value = item[len("xla:"):].partition("=")
    if not sep or not name:
      raise SystemExit(f"error: --variant {variant!r}: expected xla:NAME=VALUE, got {item!r}")
    lowered = value.lower()
    options[name] = (lowered == "true") if lowered in ("true", "false") else (
        int(value) if value.lstrip("-").isdigit() else value)
  return overrides, options


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mnist.py:diag")
  p.add_argument("--variant", action="append", required=True, help="comma-separated SECTION.FIELD=VALUE overrides")
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--json", default="")
  args = p.parse_args()
  if args.rounds < 1 or args.steps < 1:
    raise SystemExit("error: --rounds and --steps must be >= 1")

  import jax

  import profile_step
  from iaf_jax import train_lib

  variants = []
  for v in args.variant:
    overrides, options = parse_variant(v)
    config, model, optimizer, state, batch, max_value = profile_step.setup(args.config, overrides, args.batch)
    step = train_lib.make_update_step(model, optimizer, config, max_value)
    if options:
      try:  # the same jitted step (state donated), compiled with the variant's options
        step = step.lower(state, batch).compile(compiler_options=options)
      except Exception as e:  # XLA's message names the bad option or value
        raise SystemExit(f"error: --variant {v!r}: XLA refused the options: {str(e).splitlines()[0]}")
    for _ in range(3):  # compile and warm up
      state, m = step(state, batch)
    jax.block_until_ready(m)
    variants.append({"variant": v, "step": step, "state": state, "batch": batch, "rates": [],
                     "loss": float(m["loss"])})  # after the warm-up steps: equal across forms of one step
  for _ in range(args.rounds):
    for var in variants:
      t0 = time.perf_counter()
      for _ in range(args.steps):
        var["state"], m = var["step"](var["state"], var["batch"])
      jax.block_until_ready(m)
      var["rates"].append(args.batch * args.steps / (time.perf_counter() - t0))
  base = variants[0]["rates"]
  rows = []
  for var in variants:
    ratio = statistics.median(r / b for r, b in zip(var["rates"], base))
    rows.append({"variant": var["variant"], "median_img_per_s": statistics.median(var["rates"]),
                 "median_ratio_to_first": ratio, "img_per_s": var["rates"], "loss_after_warmup": var["loss"]})
    print(f"{args.config} [{var['variant'] or 'as configured'}] batch {args.batch}: median "
          f"{rows[-1]['median_img_per_s']:.0f} img/s over {args.rounds} rounds, loss after warm-up {var['loss']:.4f} "
          f"(min {min(var['rates']):.0f}, max {max(var['rates']):.0f}); x{ratio:.3f} the first variant, "
          f"median of the rounds' ratios", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": args.config, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                 "jax": jax.__version__, "variants": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  from iaf_jax import hostenv
  hostenv.reexec_with_host_env()  # as train.py: its malloc (hostenv.host_env; scripts/profile_step.py says why)
  main()
