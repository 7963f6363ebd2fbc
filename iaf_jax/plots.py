"""Pictures written by the commands: image grids (samples, reconstructions)."""
from __future__ import annotations

import numpy as np


def image_grid(images: np.ndarray, ncols: int = 8, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] in [0, 1] -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image, white padding."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid


def save_image_grid(path: str, images: np.ndarray, ncols: int = 8, scale: int = 4) -> None:
  """Write a grid of images as a PNG, each pixel repeated `scale` times so small images stay visible."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  grid = image_grid(images, ncols)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  plt.imsave(path, grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0.0, vmax=1.0)
