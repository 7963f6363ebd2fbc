"""Where the time of one update step goes: a jax.profiler trace of a few steps, its XLA op events summed by kind.

  python scripts/profile_step.py [--config configs/mnist.py:diag] [--batch 64] [--steps 5] [--out runs/profile]
                                 [--override model.block=two_conv ...] [--eval K] [--devices N]

With --eval K it profiles the importance-sampling evaluation instead (evaluate.py's compiled function, one device,
K samples per example in passes of eval.chunk_size, on --batch examples) and writes its optimised HLO
(hlo.txt) beside the trace, so that a heavy op's name can be found in it. --devices N profiles the update step as
train.py runs it on an N-device mesh (state replicated, the batch split; on a CPU host with
XLA_FLAGS=--xla_force_host_platform_device_count=N): its all-reduce shows how long one device waits for the other.

Prints op time per step by kind of op (the HLO instruction's name without its number: fusion, convolution,
copy, ...), the heaviest single ops, how many threads run an op at once (concurrency: on 2 cores, whether the
second one works) and how many ops a step runs; writes the trace
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


def concurrency(events, steps: int, short_us: float = 20.0) -> dict:
  """How many threads run an XLA op at once over the traced span (first op's start to last op's end): the share
  of that span with 0, 1, 2, ... threads busy and their mean, from each thread's ops merged into busy intervals
  (an op nested in another counts once). With the number of ops per step and of those shorter than `short_us`:
  a step of many tiny ops is bounded by dispatch, one whose ops never overlap by a single core."""
  per_thread = collections.defaultdict(list)
  for e in events:
    per_thread[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
  edges = []
  for intervals in per_thread.values():
    intervals.sort()
    start, end = intervals[0]
    for s, t in intervals[1:]:
      if s > end:
        edges += [(start, 1), (end, -1)]
        start, end = s, t
      else:
        end = max(end, t)
    edges += [(start, 1), (end, -1)]
  edges.sort()
  busy, active, last = collections.Counter(), 0, edges[0][0]
  for t, d in edges:
    busy[active] += t - last
    active, last = active + d, t
  span = edges[-1][0] - edges[0][0]
  short = [e for e in events if float(e["dur"]) < short_us]
  return {"threads": len(per_thread), "span_ms": span / 1e3,
          "busy_share": {n: busy[n] / span for n in range(len(per_thread) + 1)},
          "mean_busy_threads": sum(n * v for n, v in busy.items()) / span,
          "ops_per_step": len(events) / steps, "short_ops_per_step": len(short) / steps,
          "short_op_ms_per_step": sum(float(e["dur"]) for e in short) / 1e3 / steps, "short_us": short_us}


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
  p.add_argument("--devices", type=int, default=1, help="the update step on a mesh over this many devices")
  args = p.parse_args()
  if args.devices > 1 and args.eval:
    raise SystemExit("error: --devices profiles the update step; --eval runs on one device")

  import jax

  from iaf_jax import eval_lib, train_lib

  mesh = None
  if args.devices > 1:  # before any work: a clear error when the devices are missing
    from iaf_jax.experiments import bench
    try:
      mesh = bench.make_mesh(args.devices)
    except bench.BenchError as e:
      raise SystemExit(f"error: {e}")
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
  elif mesh is not None:
    import numpy as np

    from iaf_jax import sharding
    state = sharding.replicate(state, mesh)   # as train_lib.train_and_evaluate places them
    batch = sharding.global_batch(mesh, np.asarray(batch))
    step = train_lib.make_update_step(model, optimizer, config, max_value, mesh)
  else:
    step = train_lib.make_update_step(model, optimizer, config, max_value)
  _, wall_ms, events = trace_steps(step, state, batch, args.steps, args.out)
  s = summarise(events, args.steps)
  s["concurrency"] = c = concurrency(events, args.steps)
  s.update(config=args.config, overrides=args.override, batch=args.batch, steps=args.steps,
           wall_ms_per_step=wall_ms, jax=jax.__version__, eval_num_samples=args.eval, devices=args.devices)
  what = f"importance sampling K={args.eval}" if args.eval else f"update step on {args.devices} device(s)"
  print(f"{args.config} {' '.join(args.override)} batch {args.batch}, {what}: {wall_ms:.1f} ms/step wall, "
        f"{s['op_ms_per_step']:.1f} ms/step of XLA ops (summed over threads)")
  shares = ", ".join(f"{n}: {100 * v:.1f}%" for n, v in c["busy_share"].items() if n < 2 or v >= 5e-4)
  print(f"  threads running an op, share of the traced span: {shares} (mean {c['mean_busy_threads']:.2f}; "
        f"{c['threads']} threads ran ops); {c['ops_per_step']:.0f} ops per step, {c['short_ops_per_step']:.0f} of them under "
        f"{c['short_us']:.0f} us ({c['short_op_ms_per_step']:.1f} ms)")
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
