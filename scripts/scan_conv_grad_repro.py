"""Minimal reproduction of why scanned rungs trained slowly on XLA:CPU (issue #15): the gradient of a 3x3
convolution inside lax.scan, and the fix (iaf_jax.layers.conv2d_explicit_grads).

  python scripts/scan_conv_grad_repro.py [--batch 32] [--size 16] [--channels 32] [--layers 2]

Times (the mean of 20 calls after compilation) the forward pass and the gradient with respect to the
stacked kernels of `layers` residual conv layers, h <- h + 0.1 * conv(elu(h), k_i), six ways: unrolled or
lax.scan over the layers, with lax.conv_general_dilated (autodiff's gradient), with the convolution written as
nine shifted slices concatenated and one matmul, or with lax's convolution and its gradients written out as
plain NHWC convolutions (conv2d_explicit_grads, what the scanned rungs use). Prints one line per case.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from iaf_jax.layers import conv2d_explicit_grads  # noqa: E402

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_lax(a, k):
  return jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=_NHWC)


def conv_slices(a, k):
  """3x3 SAME convolution as nine shifted slices and one matmul: its kernel gradient is a matmul too."""
  ap = jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
  win = jnp.concatenate([ap[:, i:i + a.shape[1], j:j + a.shape[2], :] for i in range(3) for j in range(3)], axis=-1)
  return win @ k.reshape(-1, k.shape[-1])


def loss(conv, scan):
  step = lambda h, k: h + 0.1 * conv(jax.nn.elu(h), k)

  def f(w, x):
    if scan:
      h, _ = jax.lax.scan(lambda h, k: (step(h, k), None), x, w)
    else:
      h = x
      for i in range(w.shape[0]):
        h = step(h, w[i])
    return jnp.sum(h ** 2)
  return f


def mean_ms(fn, *args, calls=20):
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return 1000 * (time.perf_counter() - t) / calls


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=16)
  p.add_argument("--channels", type=int, default=32)
  p.add_argument("--layers", type=int, default=2)
  a = p.parse_args()
  x = jax.random.normal(jax.random.PRNGKey(0), (a.batch, a.size, a.size, a.channels))
  w = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (a.layers, 3, 3, a.channels, a.channels))
  diff = float(jnp.max(jnp.abs(conv_slices(x, w[0]) - conv_lax(x, w[0]))))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; slices vs lax conv max |diff| {diff:.2g}")
  for conv_name, conv in (("lax.conv", conv_lax), ("slices+matmul", conv_slices),
                          ("explicit grads", conv2d_explicit_grads)):
    for scan in (False, True):
      f = loss(conv, scan)
      fwd, grad = mean_ms(jax.jit(f), w, x), mean_ms(jax.jit(jax.grad(f)), w, x)
      print(f"{conv_name:15s} {'scan' if scan else 'unrolled':9s} forward {fwd:8.2f} ms   gradient {grad:8.2f} ms")


if __name__ == "__main__":
  main()
