"""Autoregressive masks: MADE (report Algorithm 1, Figure 3) and PixelCNN (report Figure 12). numpy only.

Convention used everywhere in iaf_jax: a mask has the shape of the kernel it multiplies, i.e. [in, out] for a
dense layer and [kh, kw, in, out] for a convolution, and entry 1 keeps the connection.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CONTEXT_DEGREE = -1  # context h is independent of z, so it may feed every hidden unit (report section 3.3)


def made_degrees(num_latent: int, hidden_sizes: Sequence[int], *, hidden_degrees: str = "sequential",
                 seed: int = 0) -> list[np.ndarray]:
  """Degrees of the latent inputs and of every hidden layer.

  Latent input i has degree i (0..k-1). A hidden unit of degree d may see the latent inputs of degree <= d;
  degrees lie in [-1, k-2]: -1 units see only the context, k-1 would feed no output. `hidden_degrees` is
  'sequential' (cycled, every degree equally often) or 'random' (drawn with `seed`), as Algorithm 1 allows.
  """
  if num_latent < 1:
    raise ValueError(f"made_degrees: num_latent must be >= 1, got {num_latent}")
  if hidden_degrees not in ("sequential", "random"):
    raise ValueError(f"made_degrees: hidden_degrees must be 'sequential' or 'random', got {hidden_degrees!r}")
  rng = np.random.default_rng(seed)
  degrees = [np.arange(num_latent)]
  low, high = CONTEXT_DEGREE, max(num_latent - 2, CONTEXT_DEGREE)
  for size in hidden_sizes:
    if size < 1:
      raise ValueError(f"made_degrees: hidden sizes must be >= 1, got {list(hidden_sizes)}")
    if hidden_degrees == "sequential":
      d = low + np.arange(size) % (high - low + 1)
    else:
      d = rng.integers(low, high + 1, size=size)
    degrees.append(d)
  return degrees


def made_masks(num_latent: int, hidden_sizes: Sequence[int], *, num_context: int = 0, num_outputs_per_latent: int = 1,
               hidden_degrees: str = "sequential", seed: int = 0) -> list[np.ndarray]:
  """Masks of a MADE whose output j depends on z_0..z_{j-1} and on all of the context h.

  Algorithm 1 of the report with the comparison the right way round (its Figure 3): a unit of degree
  v_n(j) keeps the input of degree v_{n-1}(i) iff v_{n-1}(i) <= v_n(j). Output j has degree j-1 (the report's
  v_{N+1} = [-1, 0, .., k-2]), so it sees hidden units of degree < j. The first mask has num_latent +
  num_context rows (z first, then h, all-ones rows for h). The last mask has num_latent * num_outputs_per_latent
  columns, latent-major: column j * num_outputs_per_latent + r is output r (e.g. m or s) of latent j.
  """
  degrees = made_degrees(num_latent, hidden_sizes, hidden_degrees=hidden_degrees, seed=seed)
  in_degrees = np.concatenate([degrees[0], np.full(num_context, CONTEXT_DEGREE)])
  masks = []
  for prev, cur in zip([in_degrees] + degrees[1:-1], degrees[1:]):
    masks.append((prev[:, None] <= cur[None, :]).astype(np.float32))
  out_degrees = np.repeat(np.arange(num_latent) - 1, num_outputs_per_latent)
  last_in = degrees[-1] if hidden_sizes else in_degrees
  masks.append((last_in[:, None] <= out_degrees[None, :]).astype(np.float32))
  return masks


def channel_groups(num_channels: int, num_groups: int) -> np.ndarray:
  """Group of each channel: contiguous blocks, so channel c of a map with num_groups*r channels is group c // r."""
  if num_channels % num_groups:
    raise ValueError(f"channel_groups: {num_channels} channels do not split into {num_groups} equal groups")
  return np.arange(num_channels) // (num_channels // num_groups)


def pixelcnn_mask(kernel_size: int | tuple[int, int], in_channels: int, out_channels: int, mask_type: str, *,
                  num_groups: int, num_context: int = 0) -> np.ndarray:
  """PixelCNN mask [kh, kw, in_channels + num_context, out_channels] (report Figure 12).

  Autoregressive over pixels in raster order and, at the centre tap, over channel groups: type 'A' (the
  layer that reads z) lets output group g see input groups < g, type 'B' (later layers) groups <= g. Taps
  above the centre row, and left of the centre in its row, are kept; the rest are zero. The last
  num_context input channels carry the context (unmasked: h does not depend on z).
  """
  kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"pixelcnn_mask: kernel size must be odd, got {(kh, kw)}")
  if mask_type not in ("A", "B"):
    raise ValueError(f"pixelcnn_mask: mask_type must be 'A' or 'B', got {mask_type!r}")
  ch, cw = kh // 2, kw // 2
  gin = channel_groups(in_channels, num_groups)
  gout = channel_groups(out_channels, num_groups)
  mask = np.zeros((kh, kw, in_channels + num_context, out_channels), np.float32)
  mask[:ch, :, :in_channels] = 1.0
  mask[ch, :cw, :in_channels] = 1.0
  centre = gin[:, None] < gout[None, :] if mask_type == "A" else gin[:, None] <= gout[None, :]
  mask[ch, cw, :in_channels] = centre
  mask[..., in_channels:, :] = 1.0
  return mask
