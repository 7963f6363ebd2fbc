"""Masked and weight-normalised layers (Salimans & Kingma 2016) with data-dependent initialisation.

Every layer here computes y = g * (x (*) (v * mask) / ||v * mask||) + b, the norm taken per output unit. With
`data_init` (the default) `model.init(rng, batch)` sets g and b from the first batch so that each output unit
starts with mean 0 and standard deviation `init_scale` over that batch: initialise with real data, not zeros.
Without weight norm the layer is an ordinary (masked) dense/conv layer.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-6
_NHWC = ("NHWC", "HWIO", "NHWC")  # dimension numbers of every convolution here


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
  def __call__(self, x: jax.Array, shared: Optional[jax.Array] = None, repeats: int = 1) -> jax.Array:
    """x [N, n] -> [N, features]. With `shared` [N / repeats, c] the input is concat([x, tile(shared)]) (the
    kernel's last c rows are shared's), tile being objectives.tile_samples' sample-major layout: shared's rows
    are multiplied once instead of `repeats` times (importance sampling: one IAF context per image, K samples)."""
    if shared is None:
      shape, linear, inputs = (x.shape[-1], self.features), (lambda a, w: a @ w), x
    else:
      if repeats < 1 or x.shape[0] != repeats * shared.shape[0]:
        raise ValueError(f"MaskedDense: {x.shape[0]} rows are not {repeats} repeats of {shared.shape[0]} shared rows")
      n = x.shape[-1]
      shape, inputs = (n + shared.shape[-1], self.features), (x, shared)
      def linear(a, w):
        y = (a[1] @ w[n:])[None] + (a[0] @ w[:n]).reshape(repeats, -1, w.shape[-1])
        return y.reshape(-1, w.shape[-1])
    return _weight_normed(self, inputs, shape, linear, self.mask, self.weight_norm, self.data_init,
                          self.init_scale, self.use_bias, scale_output=True)


def _pair(k: int | Sequence[int]) -> tuple[int, int]:
  return (k, k) if isinstance(k, int) else tuple(k)


def _same_padding(size: int, k: int, s: int) -> tuple[int, tuple[int, int]]:
  """(output size, (pad before, pad after)) of a SAME convolution along one axis, as XLA pads."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return out, (total // 2, total - total // 2)


def _lax_conv(x: jax.Array, w: jax.Array, strides=(1, 1), padding="SAME") -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@jax.custom_vjp
def conv2d_explicit_grads(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-1 SAME NHWC convolution whose gradients are written out as plain NHWC convolutions.

  The values and gradients of lax.conv_general_dilated (equal to float32 rounding). Autodiff's kernel gradient
  is a convolution with permuted dimension numbers; outside a loop XLA:CPU picks layouts that make it a
  standard convolution, but inside lax.scan (scanned rungs) the loop's layouts are fixed and it falls to a slow
  generic loop: 39x slower at h_size 32, 40x at 160 (scripts/scan_conv_grad_repro.py). Transposing the
  operands explicitly keeps it a standard convolution there too. A custom_vjp has no forward mode: jax.jacfwd
  through it fails, so only the scanned rungs use it (Rung.explicit_conv_grads).
  """
  return _lax_conv(x, w)


def _conv2d_explicit_fwd(x, w):
  return _lax_conv(x, w), (x, w)


def _conv2d_explicit_bwd(res, g):
  x, w = res
  kh, kw = w.shape[:2]
  (_, pad_h), (_, pad_w) = _same_padding(x.shape[1], kh, 1), _same_padding(x.shape[2], kw, 1)
  # dx: g convolved with the kernel flipped in space and its in/out axes swapped; the padding mirrors.
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _lax_conv(g, w_t, padding=(pad_h[::-1], pad_w[::-1]))
  # dw[i, j, c, o] = sum_{b, h, w} x_pad[b, h + i, w + j, c] g[b, h, w, o]: a VALID convolution of x as
  # [c, H, W, b] (images = input channels, features = batch) with g as the kernel [H, W, b, o].
  dw = _lax_conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), padding=(pad_h, pad_w))
  return dx, dw.transpose(1, 2, 0, 3)


conv2d_explicit_grads.defvjp(_conv2d_explicit_fwd, _conv2d_explicit_bwd)


def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], explicit_grads: bool = False) -> jax.Array:
  """NHWC x HWIO -> NHWC convolution with SAME padding.

  A 1x1 kernel is a matmul over the (strided) pixels. A single-channel input (the MNIST models' first encoder
  layer, and the two-conv block's last decoder layer) is convolved as a sum of kh*kw shifted slices times the
  kernel's taps: elementwise work, 5-30x faster than XLA:CPU's convolution for one input channel
  (docs/performance.md). Differentiated (jvp, grad), it is one matmul of the slices, concatenated, with the taps
  instead: whole training steps 1.03x (diag) and 1.11x (IAF 2/320) faster than with the sum's many small
  gradient ops, while forward only the sum is 2.5-13x faster (fifteenth round).
  `explicit_grads` (stride 1 only; others are unchanged): `conv2d_explicit_grads`, for convolutions inside
  lax.scan.
  """
  (kh, kw, _, _), (sh, sw) = w.shape, strides
  if (kh, kw) == (1, 1):
    # A 1x1 convolution is a matmul per pixel (SAME adds no padding; a stride picks pixels 0, s, 2s, ...). As a
    # dot it runs in the matmul library at any width and its gradients need no layout changes; as a convolution
    # XLA:CPU transposed the activations for its kernel gradient and ran the strided one's input gradient as a
    # dilated convolution outside its matmul library (docs/performance.md, eighth round).
    return jnp.einsum("bhwc,co->bhwo", x[:, ::sh, ::sw, :], w[0, 0])
  if x.shape[-1] != 1:
    if explicit_grads and tuple(strides) == (1, 1):
      return conv2d_explicit_grads(x, w)
    return _lax_conv(x, w, strides)
  return _single_channel_conv(x, w, tuple(strides))


def _single_channel_slices(x: jax.Array, kh: int, kw: int, strides: tuple[int, int]) -> list:
  """The kh*kw shifted, strided slices of a SAME-padded NHWC map, tap-major: slice i*kw+j meets tap (i, j)."""
  sh, sw = strides
  (oh, pad_h), (ow, pad_w) = _same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  return [xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :] for i in range(kh) for j in range(kw)]


def _single_channel_windows(x, w, strides):
  """The slices concatenated [B, oh, ow, kh*kw]: times the taps w.reshape(kh*kw, out), the convolution."""
  kh, kw = w.shape[:2]
  return jnp.concatenate(_single_channel_slices(x, kh, kw, strides), axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _single_channel_conv(x, w, strides):
  """The single-channel convolution as the sum of its slices times the taps (forward only; see conv2d)."""
  kh, kw = w.shape[:2]
  slices = _single_channel_slices(x, kh, kw, strides)
  return functools.reduce(jnp.add, [s * w[k // kw, k % kw, 0] for k, s in enumerate(slices)])


def _single_channel_conv_jvp(strides, primals, tangents):
  # Bilinear in (x, w): d f = f(dx, w) + f(x, dw), in the matmul form. The images' tangent is zero when only the
  # parameters are differentiated (the first layer's input is data): that term is then left out, not computed.
  (x, w), (dx, dw) = primals, tangents
  zero = lambda t: type(t) is jax.custom_derivatives.SymbolicZero
  taps = lambda k: k.reshape(-1, k.shape[-1])
  windows = _single_channel_windows(x, w, strides)  # shared by the value and the kernel's term
  y = windows @ taps(w)
  terms = [] if zero(dw) else [windows @ taps(dw)]
  if not zero(dx):
    terms.append(_single_channel_windows(dx, w, strides) @ taps(w))
  return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)


_single_channel_conv.defjvp(_single_channel_conv_jvp, symbolic_zeros=True)


def nearest_upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour upsampling by 2 of an NHWC map (each pixel repeated in a 2x2 block)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _subpixel_taps(k: int, s: int) -> tuple[int, int, list[list[Optional[int]]]]:
  """One axis of lax.conv_transpose(k, stride s, SAME) as a sub-pixel convolution.

  lax.conv_transpose convolves the zero-dilated input; output o = s*m + r (phase r) reads input m + d through
  kernel tap t = s*d - r + pad_a for every d with 0 <= t < k. Returns (d_min, d_max, taps) with
  taps[d - d_min][r] = t, or None where that phase does not use that input offset.
  """
  pad_a = k - 1 if s > k - 1 else -(-(k + s - 2) // 2)  # as jax.lax._conv_transpose_padding, SAME
  pairs = {}
  for r in range(s):
    for t in range(k):
      if (r + t - pad_a) % s == 0:
        pairs[((r + t - pad_a) // s, r)] = t
  ds = [d for d, _ in pairs]
  d_min, d_max = min(ds), max(ds)
  return d_min, d_max, [[pairs.get((d, r)) for r in range(s)] for d in range(d_min, d_max + 1)]


def conv2d_transpose(x: jax.Array, w: jax.Array, strides: tuple[int, int]) -> jax.Array:
  """NHWC transposed convolution with SAME padding: output size = input size * stride.

  The values of lax.conv_transpose(x, w, strides, "SAME"), computed as a sub-pixel convolution: a stride-1
  convolution with a kernel holding every output phase, then depth-to-space. The lhs-dilated form multiplies by
  the inserted zeros (3/4 of its multiply-adds at stride 2) and runs in Eigen on XLA:CPU rather than in its
  matmul library (docs/performance.md). Differentiated (jvp, grad), it is computed as one matmul of the input's
  windows instead (_subpixel_matmul): XLA:CPU's gradients of that form are up to 2x faster than the
  convolution's at the training shapes. Forward only (evaluation, sampling), the windows of a large batch
  (importance sampling's K samples) do not fit in cache and the convolution is up to 15x faster.
  """
  if tuple(strides) == (1, 1):  # no inserted zeros: nothing to gain
    return jax.lax.conv_transpose(x, w, strides, "SAME", dimension_numbers=_NHWC)
  return _subpixel_conv_transpose(x, w, tuple(strides))


def _subpixel_layout(x, w, strides):
  """The sub-pixel form's pieces: the padded input cropped to the windows' extent, the taps per axis, and the
  kernel [len(ty), len(tx), c_in, sh * sw * c_out] (rows: window offsets; columns: output phases (ry, rx),
  each block a kernel tap or zeros)."""
  kh, kw, c_in, c_out = w.shape
  (sh, sw), (_, h, wd, _) = strides, x.shape
  (dy0, dy1, ty), (dx0, dx1, tx) = _subpixel_taps(kh, sh), _subpixel_taps(kw, sw)
  xp = jnp.pad(x, ((0, 0), (max(-dy0, 0), max(dy1, 0)), (max(-dx0, 0), max(dx1, 0)), (0, 0)))
  oy, ox = max(-dy0, 0) + dy0, max(-dx0, 0) + dx0  # where offset d_min starts in the padded input
  xp = xp[:, oy:oy + h + len(ty) - 1, ox:ox + wd + len(tx) - 1, :]
  zero = jnp.zeros((c_in, c_out), w.dtype)
  kernel = jnp.stack([jnp.stack([
      jnp.concatenate([zero if ty[i][ry] is None or tx[j][rx] is None else w[ty[i][ry], tx[j][rx]]
                       for ry in range(sh) for rx in range(sw)], axis=1)
      for j in range(len(tx))]) for i in range(len(ty))])
  return xp, kernel


def _depth_to_space(y, strides, c_out):
  (sh, sw), (b, h, wd, _) = strides, y.shape
  return y.reshape(b, h, wd, sh, sw, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * sh, wd * sw, c_out)


def _subpixel_matmul(x, w, strides):
  """The sub-pixel form as one matmul of the input's windows (concatenated along channels) with the kernel."""
  xp, kernel = _subpixel_layout(x, w, strides)
  (kt_y, kt_x), (_, h, wd, _) = kernel.shape[:2], x.shape
  windows = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(kt_y) for j in range(kt_x)], axis=-1)
  y = windows.reshape(-1, windows.shape[-1]) @ kernel.reshape(-1, kernel.shape[-1])
  return _depth_to_space(y.reshape(*x.shape[:3], -1), strides, w.shape[-1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _subpixel_conv_transpose(x, w, strides):
  """The sub-pixel form as a VALID stride-1 convolution (forward only; see conv2d_transpose)."""
  xp, kernel = _subpixel_layout(x, w, strides)
  y = jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID", dimension_numbers=_NHWC)
  return _depth_to_space(y, strides, w.shape[-1])


@_subpixel_conv_transpose.defjvp
def _subpixel_conv_transpose_jvp(strides, primals, tangents):
  # Bilinear in (x, w): d f = f(dx, w) + f(x, dw), all in the matmul form (its windows of x are shared).
  (x, w), (dx, dw) = primals, tangents
  return (_subpixel_matmul(x, w, strides),
          _subpixel_matmul(dx, w, strides) + _subpixel_matmul(x, dw, strides))


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
  # True: stride-1 gradients via conv2d_explicit_grads (fast inside lax.scan; no jax.jacfwd through the layer).
  explicit_grads: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*_pair(self.kernel_size), x.shape[-1], self.features)
    strides = _pair(self.strides)

    conv = lambda a, w: conv2d(a, w, strides, self.explicit_grads)
    return _weight_normed(self, x, shape, conv, self.mask, self.weight_norm, self.data_init, self.init_scale,
                          self.use_bias)


# The plain (unmasked) convolution: MaskedConv2D with mask=None. An alias, not a subclass: flax names a
# submodule's parameters after its class ("MaskedConv2D_0"), so a class of another name would change the
# parameter paths and older runs' checkpoints would no longer restore.
Conv2D = MaskedConv2D


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

    conv_t = lambda a, w: conv2d_transpose(a, w, strides)
    return _weight_normed(self, x, shape, conv_t, None, self.weight_norm, self.data_init, self.init_scale,
                          self.use_bias)
