"""bf16 against float32 for the models' heavy ops on XLA:CPU (issue #13's bf16 trial): each op's forward and
gradient with float32 inputs cast to bf16 inside (float32 accumulation), then the forward with inputs already in
bf16 (no casts: the most bf16 could give), against the same op in float32.

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" taskset -c 1 python scripts/bf16_trial.py

Shapes: the MNIST ResNet blocks at batch 64, the CIFAR-10 rung head at batch 32, the MNIST models' dense layers,
and a 2048^3 matmul for scale. Median of 5 timings of 20 calls each.
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, jax.numpy as jnp
from iaf_jax.eval_lib import median_seconds
NHWC = ("NHWC", "HWIO", "NHWC")
def bench(f, *a, n=20):  # ms per call: median of 5 timings of n calls each (the bench's median_seconds)
  return 1e3 * median_seconds(lambda: [f(*a) for _ in range(n)][-1], repeats=5) / n
def conv(x, w, dt):
  return jax.lax.conv_general_dilated(x.astype(dt), w.astype(dt), (1, 1), "SAME", dimension_numbers=NHWC,
                                      preferred_element_type=jnp.float32)
def dot(x, w, dt):
  return jnp.dot(x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
k = jax.random.PRNGKey(0)
cases = [("conv b64 14x14 16->16", conv, (64, 14, 14, 16), (3, 3, 16, 16)),
         ("conv b64 7x7 32->32", conv, (64, 7, 7, 32), (3, 3, 32, 32)),
         ("conv b32 16x16 32->96 (cifar)", conv, (32, 16, 16, 32), (3, 3, 32, 96)),
         ("dot 64x1568 @ 1568x450", dot, (64, 1568), (1568, 450)),
         ("dot 64x1920 @ 1920x1920 (IAF 8/1920)", dot, (64, 1920), (1920, 1920)),
         ("dot 2048^3", dot, (2048, 2048), (2048, 2048))]
for name, op, xs, ws in cases:
  x, w = jax.random.normal(k, xs), jax.random.normal(k, ws) * 0.1
  out = {}
  for dt in (jnp.float32, jnp.bfloat16):
    f = jax.jit(lambda x, w: op(x, w, dt))
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(op(x, w, dt))), argnums=(0, 1)))
    out[dt.__name__ if hasattr(dt, '__name__') else str(dt)] = (bench(f, x, w), bench(g, x, w))
  (f32f, f32g), (bff, bfg) = out.values()
  print(f"{name:<40} fwd f32 {f32f:7.3f} ms bf16 {bff:7.3f} ms ({f32f/bff:.2f}x) | grad f32 {f32g:7.3f} bf16 {bfg:7.3f} ({f32g/bfg:.2f}x)", flush=True)
print("-- inputs already bf16 (no casts in the timed function):")
for name, op, xs, ws in cases:
  x, w = jax.random.normal(k, xs), jax.random.normal(k, ws) * 0.1
  f = jax.jit(lambda x, w: op(x, w, jnp.float32))
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  fb = jax.jit(lambda x, w: op(x, w, jnp.bfloat16))
  a, b = bench(f, x, w), bench(fb, xb, wb)
  print(f"{name:<40} fwd f32 {a:7.3f} ms bf16 {b:7.3f} ms ({a/b:.2f}x)", flush=True)
