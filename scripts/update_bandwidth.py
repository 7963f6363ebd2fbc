"""How much of an update step is memory-bound elementwise work over the large parameter leaves, and at what rate
against this machine's memory bandwidth (issue #13: IAF 8/1920's share of the matmul ceiling).

  python scripts/update_bandwidth.py [--config configs/mnist.py:iaf_d8_w1920] [--batch 64] [--steps 5]
                                     [--min_elements 1000000] [--out runs/update_bandwidth]

Profiles a few update steps (as scripts/profile_step.py does) and reads the compiled HLO. The elementwise loop
fusions whose output has the shape of a parameter leaf of at least --min_elements elements (the masked kernel,
its weight-norm gradient, the Adamax moments, the parameters, the EMA) are summed: their time per step and the
bytes they read and write (each full-size operand and the output once; scalars and small operands ignored).
In the same process, a triad (a * b + c over 16 M float32) measures the bandwidth those bytes could move at.
Prints both and writes a JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_DEF = re.compile(r"^\s*(?:ROOT )?%([^ ]+) = (\w+)\[([\d,]*)\]\{[^}]*\} (\w[\w-]*)\((.*)$")


def entry_instructions(hlo_text: str) -> dict:
  """name -> (dtype, shape, opcode, operand names) for the instructions of the ENTRY computation."""
  out, in_entry = {}, False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if in_entry and line.startswith("}"):
      break
    m = _DEF.match(line) if in_entry else None
    if m:
      name, dtype, dims, opcode, rest = m.groups()
      shape = tuple(int(d) for d in dims.split(",") if d)
      args = rest.split("), ")[0]
      out[name] = (dtype, shape, opcode, re.findall(r"%([^ ,()]+)", args))
  return out


def triad_gb_per_s(n: int = 1 << 24, repeats: int = 10) -> float:
  import jax
  import jax.numpy as jnp
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  a, b, c = (jax.random.normal(key, (n,)) for key in k)
  # In place (c donated), as the update step writes its donated state: a fresh output buffer each call would
  # time the kernel's page faults, not the memory.
  f = jax.jit(lambda a, b, c: a * b + c, donate_argnums=2)
  c = jax.block_until_ready(f(a, b, c))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    c = jax.block_until_ready(f(a, b, c))
    ts.append(time.perf_counter() - t)
  return 4 * 4 * n / sorted(ts)[len(ts) // 2] / 1e9  # three reads and one write of float32


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mnist.py:iaf_d8_w1920")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--min_elements", type=int, default=1_000_000)
  p.add_argument("--out", default="runs/update_bandwidth")
  args = p.parse_args()

  import jax

  from iaf_jax import train_lib
  from profile_step import setup, trace_steps

  config, model, optimizer, state, batch, max_value = setup(args.config, [], args.batch)
  big = {tuple(l.shape) for l in jax.tree_util.tree_leaves(state.params) if l.size >= args.min_elements}
  if not big:
    raise SystemExit(f"error: {args.config} has no parameter leaf of {args.min_elements} elements or more")
  step = train_lib.make_update_step(model, optimizer, config, max_value)
  instrs = entry_instructions(step.lower(state, batch).compile().as_text())
  _, wall_ms, events = trace_steps(step, state, batch, args.steps, args.out)

  def nbytes(name):
    dtype, shp, _, _ = instrs[name]
    return math.prod(shp) * (2 if dtype in ("bf16", "f16") else 4)

  chosen = {}
  for name, (dtype, shp, opcode, operands) in instrs.items():
    if opcode == "fusion" and shp in big and not name.startswith(("ynn_fusion", "dot")):
      full = [o for o in operands if o in instrs and instrs[o][1] in big]
      chosen[name] = nbytes(name) + sum(nbytes(o) for o in full)
  op_ms = sum(e["dur"] for e in events) / 1e3 / args.steps
  fus_ms = sum(e["dur"] for e in events if e["name"] in chosen) / 1e3 / args.steps
  moved_gb = sum(chosen.values()) / 1e9
  triad = triad_gb_per_s()
  s = dict(config=args.config, batch=args.batch, steps=args.steps, wall_ms_per_step=wall_ms,
           op_ms_per_step=op_ms, large_leaf_fusions=len(chosen), large_leaf_fusion_ms_per_step=fus_ms,
           large_leaf_fusion_gb_per_step=moved_gb, large_leaf_fusion_gb_per_s=moved_gb / (fus_ms / 1e3),
           triad_gb_per_s=triad, large_leaf_shapes=sorted(big), jax=jax.__version__)
  print(f"{args.config} batch {args.batch}: {wall_ms:.1f} ms/step wall, {op_ms:.1f} ms/step of XLA ops")
  print(f"  {len(chosen)} elementwise fusions over the {len(big)} large leaf shape(s) {sorted(big)}: "
        f"{fus_ms:.1f} ms/step ({100 * fus_ms / op_ms:.1f}% of op time), {moved_gb:.2f} GB read+written, "
        f"{s['large_leaf_fusion_gb_per_s']:.1f} GB/s")
  print(f"  triad a*b+c over 16M float32 in the same process: {triad:.1f} GB/s")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(s, f, indent=1)


if __name__ == "__main__":
  from iaf_jax import hostenv
  hostenv.reexec_with_host_env()  # as train.py: its malloc (hostenv.host_env; scripts/profile_step.py says why)
  main()
