"""Inverse autoregressive flow (report section 3.2, Equations 9-13).

`IAFStep` maps z to z' with a triangular Jacobian and returns log|det dz'/dz| per example; `IAFFlow` stacks
T of them, reversing the autoregressive order between steps, and sums the log-dets. The autoregressive
network is a MADE for latent vectors [B, k] and a PixelCNN-masked conv net for latent maps [B, H, W, C].
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iaf_jax import masks as masks_lib
from iaf_jax.layers import MaskedConv2D, MaskedDense
from iaf_jax.objectives import tile_samples

# s starts near +1.5, so sigma = sigmoid(s) ~ 0.82: each step starts close to the identity (IAF paper, report
# Appendix 6.1), which keeps early training stable.
SIGMA_BIAS = 1.5
# The network's last layer starts with outputs of standard deviation 0.1: m and s start nearly constant.
OUTPUT_INIT_SCALE = 0.1


class MADE(nn.Module):
  """Masked autoencoder [B, k] (+ context [B, c]) -> [B, k, num_outputs_per_latent]; output j sees z_<j and h."""
  hidden_sizes: Sequence[int]
  num_outputs_per_latent: int = 2
  hidden_degrees: str = "sequential"
  seed: int = 0
  weight_norm: bool = True

  @nn.compact
  def __call__(self, z: jax.Array, context: Optional[jax.Array] = None, context_repeats: int = 1) -> jax.Array:
    """`context_repeats` r > 1: z has r times the context's rows, sample-major (objectives.tile_samples), and
    the first layer multiplies each context row once (the same values as with the context tiled)."""
    k = z.shape[-1]
    num_context = 0 if context is None else context.shape[-1]
    masks = masks_lib.made_masks(k, tuple(self.hidden_sizes), num_context=num_context,
                                 num_outputs_per_latent=self.num_outputs_per_latent,
                                 hidden_degrees=self.hidden_degrees, seed=self.seed)
    x, first = z, 0
    if context is not None and context_repeats != 1 and self.hidden_sizes:
      x = nn.elu(MaskedDense(self.hidden_sizes[0], mask=masks[0], weight_norm=self.weight_norm)(
          z, shared=context, repeats=context_repeats))
      first = 1
    elif context is not None:
      x = jnp.concatenate([z, tile_samples(context, context_repeats)], axis=-1)
    for size, mask in zip(self.hidden_sizes[first:], masks[first:-1]):
      x = nn.elu(MaskedDense(size, mask=mask, weight_norm=self.weight_norm)(x))
    out = MaskedDense(k * self.num_outputs_per_latent, mask=masks[-1], weight_norm=self.weight_norm,
                      init_scale=OUTPUT_INIT_SCALE)(x)
    return out.reshape(*z.shape, self.num_outputs_per_latent)


class PixelCNNNetwork(nn.Module):
  """Masked conv net [B, H, W, C] (+ context map [B, H, W, c]) -> [B, H, W, C, num_outputs_per_latent].

  Output (p, j) sees z at pixels before p in raster order and channels < j at p (type A mask first, type B
  after), and the context everywhere. Hidden widths must be multiples of C (one channel group per latent).
  """
  hidden_channels: Sequence[int]
  kernel_size: int = 3
  num_outputs_per_latent: int = 2
  weight_norm: bool = True
  explicit_grads: bool = False  # MaskedConv2D.explicit_grads: for use inside lax.scan

  @nn.compact
  def __call__(self, z: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    c = z.shape[-1]
    num_context = 0 if context is None else context.shape[-1]
    x = z if context is None else jnp.concatenate([z, context], axis=-1)
    in_ch, mask_type = c, "A"
    for i, width in enumerate(self.hidden_channels):
      mask = masks_lib.pixelcnn_mask(self.kernel_size, in_ch, width, mask_type, num_groups=c,
                                     num_context=num_context if i == 0 else 0)
      x = nn.elu(MaskedConv2D(width, self.kernel_size, mask=mask, weight_norm=self.weight_norm,
                              explicit_grads=self.explicit_grads)(x))
      in_ch, mask_type = width, "B"
    r = self.num_outputs_per_latent
    mask = masks_lib.pixelcnn_mask(self.kernel_size, in_ch, c * r, mask_type, num_groups=c,
                                   num_context=num_context if not self.hidden_channels else 0)
    out = MaskedConv2D(c * r, self.kernel_size, mask=mask, weight_norm=self.weight_norm,
                       init_scale=OUTPUT_INIT_SCALE, explicit_grads=self.explicit_grads)(x)
    return out.reshape(*z.shape, r)


def autoregressive_network(kind: str, hidden: Sequence[int], num_outputs_per_latent: int, *, kernel_size: int = 3,
                           weight_norm: bool = True, explicit_grads: bool = False,
                           name: Optional[str] = None) -> nn.Module:
  if kind == "made":
    return MADE(tuple(hidden), num_outputs_per_latent, weight_norm=weight_norm, name=name)
  if kind == "pixelcnn":
    return PixelCNNNetwork(tuple(hidden), kernel_size, num_outputs_per_latent, weight_norm=weight_norm,
                           explicit_grads=explicit_grads, name=name)
  raise ValueError(f"autoregressive network kind must be 'made' or 'pixelcnn', got {kind!r}")


class IAFStep(nn.Module):
  """One IAF step (Equation 11) with the numerically stable gated update of the IAF paper.

  learnt sigma:   (m, s) = AR(z, h); sigma = sigmoid(s); z' = sigma * z + (1 - sigma) * m; log-det = sum log sigma
  constant sigma: m = AR(z, h); z' = z + m; log-det = 0 (report Table 2)
  `reverse` runs the step in reversed order (all event axes flipped), so stacked steps alternate orderings.
  Returns (z', log|det dz'/dz|) with log-det of shape [B].
  """
  kind: str = "made"              # 'made' for z [B, k]; 'pixelcnn' for z [B, H, W, C]
  hidden: Sequence[int] = (320, 320)
  learnt_sigma: bool = True
  reverse: bool = False
  kernel_size: int = 3
  weight_norm: bool = True
  explicit_grads: bool = False  # 'pixelcnn': PixelCNNNetwork.explicit_grads

  @nn.compact
  def __call__(self, z: jax.Array, context: Optional[jax.Array] = None,
               context_repeats: int = 1) -> tuple[jax.Array, jax.Array]:
    """`context_repeats` r: z's rows are r sample-major copies of the context's (MADE.context_repeats)."""
    event_axes = (-1,) if self.kind == "made" else (-3, -2, -1)
    flip = (lambda a: jnp.flip(a, event_axes)) if self.reverse else (lambda a: a)
    # A vector context has no order; a context map is aligned with z's pixels, so it flips with z.
    ctx = context if (context is None or self.kind == "made") else flip(context)
    zr = flip(z)
    net = autoregressive_network(self.kind, self.hidden, 2 if self.learnt_sigma else 1,
                                 kernel_size=self.kernel_size, weight_norm=self.weight_norm,
                                 explicit_grads=self.explicit_grads)
    if self.kind == "made":
      out = net(zr, ctx, context_repeats)
    else:
      out = net(zr, None if ctx is None else tile_samples(ctx, context_repeats))
    sum_axes = tuple(range(1, z.ndim))
    if self.learnt_sigma:
      m, s = out[..., 0], out[..., 1] + SIGMA_BIAS
      sigma = jax.nn.sigmoid(s)
      z_new = sigma * zr + (1.0 - sigma) * m
      log_det = jnp.sum(jax.nn.log_sigmoid(s), axis=sum_axes)
    else:
      z_new = zr + out[..., 0]
      log_det = jnp.zeros(z.shape[:1], z.dtype)
    return flip(z_new), log_det


class IAFFlow(nn.Module):
  """T IAF steps, the order reversed between consecutive steps (report section 4.2). depth 0 = identity."""
  depth: int = 2
  kind: str = "made"
  hidden: Sequence[int] = (320, 320)
  learnt_sigma: bool = True
  kernel_size: int = 3
  weight_norm: bool = True

  @nn.compact
  def __call__(self, z: jax.Array, context: Optional[jax.Array] = None,
               context_repeats: int = 1) -> tuple[jax.Array, jax.Array]:
    if self.depth < 0:
      raise ValueError(f"IAFFlow: depth must be >= 0, got {self.depth}")
    log_det = jnp.zeros(z.shape[:1], z.dtype)
    for t in range(self.depth):
      z, ld = IAFStep(self.kind, tuple(self.hidden), self.learnt_sigma, reverse=bool(t % 2), kernel_size=self.kernel_size,
                      weight_norm=self.weight_norm, name=f"step_{t}")(z, context, context_repeats)
      log_det = log_det + ld
    return z, log_det
