"""Where the time of one update step goes: a jax.profiler trace of a few steps, its XLA op events summed by kind.

  python scripts/profile_step.py [--config configs/mnist.py:diag] [--batch 64] [--steps 5] [--out runs/profile]
                                 [--override model.block=two_conv ...] [--eval K]

With --eval K it profiles the importance-sampling evaluation instead (evaluate.py's compiled function, one device,
K samples per example in passes of eval.chunk_size, on --batch examples) and writes its optimised HLO
(hlo.txt) beside the trace, so that a heavy op's name can be found in it.

Prints op time per step by kind of op (the HLO instruction's name without its number: fusion, convolution,
copy, ...), the heaviest single ops, and the share of the step's wall time the ops cover; writes the trace
(open it in Perfetto) and a JSON of the summary under --out. Synthetic images, as the bench uses.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def op_kind(name: str) -> str:
  """'ynn_fusion.12' -> 'ynn_fusion', 'loop_add_fusion.3' -> 'loop_add_fusion'; the kinds the profile sums."""
  return re.sub(r"(\.\d+)+$", "", name)


def summarise(events, steps: int) -> dict:
  by_kind, by_op = collections.Counter(), collections.Counter()
  for e in events:
    by_kind[op_kind(e["name"])] += e["dur"]
    by_op[e["name"]] += e["dur"]
  total = sum(by_kind.values())
  return {"op_ms_per_step": total / 1e3 / steps,
          "kinds": [(k, v / 1e3 / steps, v / total) for k, v in by_kind.most_common()],
          "top_ops": [(k, v / 1e3 / steps) for k, v in by_op.most_common(15)]}


def xla_op_events(trace_dir: str) -> list:
  """The complete ('X') events of XLA ops from the newest perfetto trace under trace_dir: the events on the
  threads that run the compiled program (those named like HLO instructions), not Python or runtime frames."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                 + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise SystemExit(f"error: no trace written under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  hlo = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)+$")
  return [e for e in events if e.get("ph") == "X" and "dur" in e and hlo.match(str(e.get("name", "")))]


def setup(config_path: str, overrides, batch: int):
  """(config, model, optimizer, state, images on the device, max_value) for a config file's model on `batch`
  synthetic images, as the bench makes them: what this script and scripts/update_bandwidth.py profile."""
  import jax

  from iaf_jax import config_lib, optim, train_lib
  from iaf_jax import data as data_lib
  from iaf_jax.experiments import bench
  from iaf_jax.models import build_model

  config = config_lib.load_config_file(config_path)
  for key, value in map(bench.parse_override, overrides):
    if not bench.set_field(config, key, value):
      raise SystemExit(f"error: --override {key}: {config_path} has no such field")
  shape = bench.NATURAL_SHAPES[config.data.name]
  max_value = data_lib.MAX_VALUE.get(config.data.name, 255)
  model = build_model(config.model, shape)
  optimizer = optim.make_optimizer(config.train)
  images = bench.synthetic_images(0, batch, shape, max_value)
  state = train_lib.init_state(model, optimizer, images, 0, likelihood=config.model.likelihood, max_value=max_value)
  return config, model, optimizer, state, jax.device_put(images), max_value


def run_steps(step, state, batch, steps: int):
  """`steps` calls of the update step, waited for: (state, wall ms per call)."""
  import jax

  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return state, 1e3 * (time.perf_counter() - t0) / steps


def trace_steps(step, state, batch, steps: int, out: str):
  """Warm `step` up, then trace `steps` calls under jax.profiler into `out`: (state, wall ms per call, the
  trace's XLA op events)."""
  import jax

  state, _ = run_steps(step, state, batch, 3)  # compile and warm up
  os.makedirs(out, exist_ok=True)
  jax.profiler.start_trace(out, create_perfetto_trace=True)
  state, wall_ms = run_steps(step, state, batch, steps)
  jax.profiler.stop_trace()
  return state, wall_ms, xla_op_events(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mnist.py:diag")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out", default="runs/profile")
  p.add_argument("--override", action="append", default=[], help="section.field=value")
  p.add_argument("--eval", type=int, default=0, metavar="K",
                 help="profile the K-sample importance-sampling evaluation instead of the update step")
  args = p.parse_args()

  import jax

  from iaf_jax import eval_lib, train_lib

  config, model, optimizer, state, batch, max_value = setup(args.config, args.override, args.batch)
  if args.eval:
    evaluate = jax.jit(eval_lib.make_importance_eval(
        model, likelihood=config.model.likelihood, max_value=max_value, num_samples=args.eval,
        chunk_size=config.eval.chunk_size))
    params, key = state.params, jax.random.PRNGKey(0)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hlo.txt"), "w") as f:
      f.write(evaluate.lower(params, batch, key).compile().as_text())
    step = lambda st, b: (st, evaluate(params, b, key))  # the same (state, metrics) shape as the update step
  else:
    step = train_lib.make_update_step(model, optimizer, config, max_value)
  _, wall_ms, events = trace_steps(step, state, batch, args.steps, args.out)
  s = summarise(events, args.steps)
  s.update(config=args.config, overrides=args.override, batch=args.batch, steps=args.steps,
           wall_ms_per_step=wall_ms, jax=jax.__version__, eval_num_samples=args.eval)
  what = f"importance sampling K={args.eval}" if args.eval else "update step"
  print(f"{args.config} {' '.join(args.override)} batch {args.batch}, {what}: {wall_ms:.1f} ms/step wall, "
        f"{s['op_ms_per_step']:.1f} ms/step of XLA ops (summed over threads)")
  for kind, ms, share in s["kinds"][:12]:
    print(f"  {kind:<40} {ms:8.2f} ms  {100 * share:5.1f}%")
  print("heaviest ops:")
  for op, ms in s["top_ops"][:10]:
    print(f"  {op:<40} {ms:8.2f} ms")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(s, f, indent=1)


if __name__ == "__main__":
  from iaf_jax import hostenv
  # The host environment train.py runs in (tcmalloc, else glibc malloc on huge pages): without it each step pays up to
  # ~50,000 page faults (IAF 8/1920) on XLA's fresh temporary buffers, and the fusions writing them look slower.
  hostenv.reexec_with_host_env()
  main()
