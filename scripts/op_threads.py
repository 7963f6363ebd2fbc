"""How many cores one XLA op keeps busy: a 3x3 SAME convolution or a matmul of a given shape, alone, forward and
forward + gradients, with its time, GFLOP/s and the process's CPU time over wall time (1.0: one core; 2.0: two)
(issue #13). XLA:CPU hands most convolutions and dots to YNNPACK, which splits some shapes over the cores and
runs others on one thread; this shows which are which on this machine.

  python scripts/op_threads.py --conv 64,14,14,32,32 --conv 64,7,7,256,256 --dot 64,1920,1920 [--calls 20] [--json F]

--conv B,H,W,CIN,COUT: NHWC input [B,H,W,CIN], kernel [3,3,CIN,COUT]; --dot M,K,N: [M,K] @ [K,N]. Medians of 3
repeats of --calls calls. Pin with taskset -c N to see one core's rate.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shape(text: str, n: int, flag: str) -> tuple:
  try:
    dims = tuple(int(v) for v in text.split(","))
  except ValueError:
    dims = ()
  if len(dims) != n or min(dims) < 1:
    raise SystemExit(f"error: {flag} {text!r}: expected {n} positive integers separated by commas")
  return dims


def time_op(fn, calls: int, repeats: int = 3) -> tuple[float, float]:
  """(median ms per call, CPU seconds / wall seconds over all repeats) of fn() after one warm-up call."""
  import jax

  from iaf_jax.experiments.bench import process_cpu_seconds

  jax.block_until_ready(fn())
  times, c0, w0 = [], process_cpu_seconds(), time.perf_counter()
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = [fn() for _ in range(calls)]
    jax.block_until_ready(out)
    times.append(1e3 * (time.perf_counter() - t0) / calls)
  return statistics.median(times), (process_cpu_seconds() - c0) / (time.perf_counter() - w0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--conv", action="append", default=[], help="B,H,W,CIN,COUT")
  p.add_argument("--dot", action="append", default=[], help="M,K,N")
  p.add_argument("--calls", type=int, default=20)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if not args.conv and not args.dot:
    raise SystemExit("error: give at least one --conv B,H,W,CIN,COUT or --dot M,K,N")
  if args.calls < 1:
    raise SystemExit("error: --calls must be >= 1")
  ops = [("conv", _shape(c, 5, "--conv")) for c in args.conv] + [("dot", _shape(d, 3, "--dot")) for d in args.dot]

  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  rows = []
  for kind, dims in ops:
    if kind == "conv":
      b, h, w, cin, cout = dims
      args_ = (rng.standard_normal((b, h, w, cin), np.float32), 0.1 * rng.standard_normal((3, 3, cin, cout), np.float32))
      f = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      flops = 2.0 * b * h * w * cin * cout * 9
    else:
      m, k, n = dims
      args_ = (rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32))
      f = lambda a, b_: a @ b_
      flops = 2.0 * m * k * n
    x, y = (jnp.asarray(a) for a in args_)
    fwd = jax.jit(f)
    grads = jax.jit(jax.grad(lambda u, v: jnp.sum(f(u, v) ** 2), (0, 1)))
    fwd_ms, fwd_cpu = time_op(lambda: fwd(x, y), args.calls)
    grad_ms, grad_cpu = time_op(lambda: grads(x, y), args.calls)
    row = {"op": kind, "shape": list(dims), "mflop_forward": flops / 1e6, "forward_ms": fwd_ms,
           "forward_gflops": flops / fwd_ms / 1e6, "forward_cpu_per_wall": fwd_cpu, "forward_and_grads_ms": grad_ms,
           "forward_and_grads_gflops": 3 * flops / grad_ms / 1e6, "forward_and_grads_cpu_per_wall": grad_cpu}
    rows.append(row)
    print(f"{kind} {','.join(map(str, dims)):22s} forward {fwd_ms:8.3f} ms {row['forward_gflops']:6.1f} GFLOP/s "
          f"CPU/wall {fwd_cpu:.2f} | forward+grads {grad_ms:8.3f} ms {row['forward_and_grads_gflops']:6.1f} GFLOP/s "
          f"CPU/wall {grad_cpu:.2f}", flush=True)
  out = {"jax": jax.__version__, "calls": args.calls, "ops": rows}
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)
  return out


if __name__ == "__main__":
  main()
