"""Masked and weight-normalised layers (Salimans & Kingma 2016) with data-dependent initialisation.

Every layer here computes y = g * (x (*) (v * mask) / ||v * mask||) + b, the norm taken per output unit. With
`data_init` (the default) `model.init(rng, batch)` sets g and b from the first batch so that each output unit
starts with mean 0 and standard deviation `init_scale` over that batch: initialise with real data, not zeros.
Without weight norm the layer is an ordinary (masked) dense/conv layer.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-6


def _weight_normed(mdl: nn.Module, x: jax.Array, kernel_shape: Sequence[int], linear: Callable, mask: Any,
                   weight_norm: bool, data_init: bool, init_scale: float, use_bias: bool,
                   scale_output: bool = False) -> jax.Array:
  """Shared body of every layer: `linear(x, kernel)` with an optional mask and weight normalisation.

  The per-output-unit factor g / ||v * mask|| commutes with `linear` (it scales the kernel's last axis), so it
  is applied where it is cheaper: to the kernel (convolutions: a small kernel, large feature maps) or, with
  `scale_output`, to the output (dense layers: a [B, out] output, a kernel of up to 1920 x 1920 that would
  otherwise be rewritten every step, forward and backward).
  """
  out_features = kernel_shape[-1]
  if mask is not None and tuple(np.shape(mask)) != tuple(kernel_shape):  # one check for every masked layer
    raise ValueError(f"{type(mdl).__name__}: mask shape {np.shape(mask)} does not match kernel {tuple(kernel_shape)}")
  init = nn.initializers.normal(0.05) if weight_norm else nn.initializers.lecun_normal()
  v = mdl.param("kernel", init, tuple(kernel_shape), jnp.float32)
  if mask is not None:
    # A boolean constant (a quarter of the bytes of a float mask) selecting the kernel: the same values as
    # v * mask, the gradient where(mask, g, 0) the same as g * mask.
    v = jnp.where(np.asarray(mask) != 0, v, jnp.zeros((), v.dtype))
  if not weight_norm:
    y = linear(x, v)
    return y + mdl.param("bias", nn.initializers.zeros, (out_features,)) if use_bias else y
  reduce_axes = tuple(range(v.ndim - 1))
  inv_norm = jax.lax.rsqrt(jnp.sum(jnp.square(v), axis=reduce_axes) + _EPS)
  # linear(x, v / ||v||), written so that convolutions compute exactly what they always did.
  normalised = (lambda a: linear(a, v) * inv_norm) if scale_output else (lambda a: linear(a, v * inv_norm))
  if data_init and mdl.is_initializing():
    y = normalised(x)
    axes = tuple(range(y.ndim - 1))
    mean, var = jnp.mean(y, axis=axes), jnp.var(y, axis=axes)
    g0 = init_scale * jax.lax.rsqrt(var + _EPS)
    g = mdl.param("scale", lambda _: g0)
    b = mdl.param("bias", lambda _: -mean * g0) if use_bias else 0.0
    return y * g + b
  g = mdl.param("scale", nn.initializers.constant(init_scale), (out_features,))
  y = linear(x, v) * (inv_norm * g) if scale_output else linear(x, v * inv_norm * g)
  return y + mdl.param("bias", nn.initializers.zeros, (out_features,)) if use_bias else y


class MaskedDense(nn.Module):
  """Dense layer whose kernel is multiplied by a fixed mask [in, out] (None: unmasked)."""
  features: int
  mask: Optional[np.ndarray] = None
  weight_norm: bool = True
  data_init: bool = True
  init_scale: float = 1.0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1], self.features)
    return _weight_normed(self, x, shape, lambda a, w: a @ w, self.mask, self.weight_norm, self.data_init,
                          self.init_scale, self.use_bias, scale_output=True)


def _pair(k: int | Sequence[int]) -> tuple[int, int]:
  return (k, k) if isinstance(k, int) else tuple(k)


class MaskedConv2D(nn.Module):
  """NHWC 2-D convolution, kernel [kh, kw, in, out] times a fixed mask (None: unmasked), SAME padding."""
  features: int
  kernel_size: int | tuple[int, int] = 3
  strides: int | tuple[int, int] = 1
  mask: Optional[np.ndarray] = None
  weight_norm: bool = True
  data_init: bool = True
  init_scale: float = 1.0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*_pair(self.kernel_size), x.shape[-1], self.features)
    strides = _pair(self.strides)

    def conv(a, w):
      return jax.lax.conv_general_dilated(a, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return _weight_normed(self, x, shape, conv, self.mask, self.weight_norm, self.data_init, self.init_scale,
                          self.use_bias)


class ConvTranspose2D(nn.Module):
  """NHWC transposed convolution (the decoder's upsampling), SAME padding: output size = input size * stride."""
  features: int
  kernel_size: int | tuple[int, int] = 3
  strides: int | tuple[int, int] = 2
  weight_norm: bool = True
  data_init: bool = True
  init_scale: float = 1.0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*_pair(self.kernel_size), x.shape[-1], self.features)
    strides = _pair(self.strides)

    def conv_t(a, w):
      return jax.lax.conv_transpose(a, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return _weight_normed(self, x, shape, conv_t, None, self.weight_norm, self.data_init, self.init_scale,
                          self.use_bias)
