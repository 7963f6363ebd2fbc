"""The convolution's gradient three ways at the MNIST and CIFAR-10 block shapes (issue #13's kernel-gradient
transposes): autodiff of lax.conv (XLA:CPU transposes the activations to compute the kernel gradient),
layers.conv2d_explicit_grads (those transposes written out), and the kernel gradient as one matmul of the input's
3x3 windows (im2col, no transposes of the activations). jax.grad of sum(sin(conv(x, w))), median of 5 x 20 calls.

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" taskset -c 1 python scripts/conv_grad_forms.py
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, jax.numpy as jnp
from iaf_jax import layers
from iaf_jax.eval_lib import median_seconds
NHWC = ("NHWC", "HWIO", "NHWC")
def bench(f, *a, n=20):  # ms per call: median of 5 timings of n calls each (the bench's median_seconds)
  return 1e3 * median_seconds(lambda: [f(*a) for _ in range(n)][-1], repeats=5) / n

@jax.custom_vjp
def conv_im2col(x, w):
  return layers._lax_conv(x, w)
def fwd(x, w): return layers._lax_conv(x, w), (x, w)
def bwd(res, g):
  x, w = res
  kh, kw, c, o = w.shape
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = layers._lax_conv(g, w_t)
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  b, h, wd, _ = x.shape
  win = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(kh) for j in range(kw)], axis=-1)
  dw = win.reshape(-1, kh * kw * c).T @ g.reshape(-1, o)
  return dx, dw.reshape(kh, kw, c, o)
conv_im2col.defvjp(fwd, bwd)

k = jax.random.PRNGKey(0)
for (b, h, c, o) in [(64, 14, 16, 16), (64, 7, 32, 32), (64, 14, 32, 32), (32, 16, 32, 32)]:
  x = jax.random.normal(k, (b, h, h, c)); w = jax.random.normal(k, (3, 3, c, o)) * 0.1
  loss = lambda conv: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)))
  fa = loss(lambda x, w: layers._lax_conv(x, w)); fe = loss(layers.conv2d_explicit_grads); fi = loss(conv_im2col)
  ga, gi = fa(x, w), fi(x, w)
  err = max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(ga, gi))
  print(f"b{b} {h}x{h} {c}->{o}: autodiff {bench(fa, x, w):.2f} ms  explicit {bench(fe, x, w):.2f}  im2col-dw {bench(fi, x, w):.2f}  (max diff {err:.1e})", flush=True)
