"""The rate of the matmuls of one IAF 8/1920 update step against the 2048^3 matmul ceiling, in one process
(issue #13's target: the step at 50% of that ceiling).

  python scripts/dot_shapes.py [--batch 64] [--width 1920] [--repeats 20]

The step's arithmetic is almost all [batch, width] x [width, width] products (the MADE layers of the IAF
steps): forward x @ W, and in the backward pass dX = g @ W^T and dW = x^T @ g. Each is timed alone, jitted
(XLA:CPU, as the step runs it) and with numpy (its BLAS), beside the n^3 ceiling of both. A step cannot run
its dots faster than they run alone, so the best of these rates bounds the share of the ceiling the step can
reach while its dots are this shape.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--width", type=int, default=1920)
  p.add_argument("--n", type=int, default=2048, help="n of the n^3 ceiling")
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  import jax
  import jax.numpy as jnp

  from iaf_jax.eval_lib import median_seconds

  b, w, n = args.batch, args.width, args.n
  rng = np.random.default_rng(0)
  x, g = rng.standard_normal((b, w), np.float32), rng.standard_normal((b, w), np.float32)
  k, big = rng.standard_normal((w, w), np.float32), rng.standard_normal((n, n), np.float32)
  step_flops = 2.0 * b * w * w
  shapes = {  # name: (lhs, rhs, product, flops)
      "ceiling n^3": (big, big, lambda a, c: a @ c, 2.0 * n ** 3),
      "forward x @ W": (x, k, lambda a, c: a @ c, step_flops),
      "dX = g @ W^T": (g, k, lambda a, c: a @ c.T, step_flops),
      "dW = x^T @ g": (x, g, lambda a, c: a.T @ c, step_flops),
  }
  rows = []
  for name, (lhs, rhs, f, flops) in shapes.items():
    jl, jr, jf = jnp.asarray(lhs), jnp.asarray(rhs), jax.jit(f)
    xla = flops / median_seconds(lambda: jf(jl, jr), args.repeats) / 1e9
    blas = flops / median_seconds(lambda: f(lhs, rhs), args.repeats) / 1e9
    rows.append({"op": name, "xla_gflops": xla, "numpy_gflops": blas})
  ceiling = rows[0]["xla_gflops"]
  print(f"batch {b}, width {w}; jax {jax.__version__}; XLA ceiling {ceiling:.1f} GFLOP/s")
  print(f"{'op':16s} {'XLA GFLOP/s':>12s} {'of ceiling':>11s} {'numpy GFLOP/s':>14s}")
  for r in rows:
    print(f"{r['op']:16s} {r['xla_gflops']:12.1f} {100 * r['xla_gflops'] / ceiling:10.0f}% {r['numpy_gflops']:14.1f}")
  print(json.dumps({"batch": b, "width": w, "rows": rows}))


if __name__ == "__main__":
  main()
