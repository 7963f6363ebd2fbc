"""Pictures written by the commands: image grids (samples, reconstructions) and the matplotlib helpers of the
report's figures (iaf_jax/experiments/figures.py). Every image grid of the project is built by `image_grid`."""
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


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def show_grid(ax, images: np.ndarray, ncols: int = 8, title: str = "", pad: int = 1) -> None:
  """Draw `image_grid(images, ncols)` into a matplotlib axes, without ticks; gray colormap for 1 channel."""
  grid = image_grid(images, ncols, pad)
  if grid.shape[-1] == 1:
    ax.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
  else:
    ax.imshow(grid, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=10)


def save_figure(fig, path: str, dpi: int) -> str:
  """Save a figure at exactly its size in inches times `dpi` (no tight bounding box), then close it."""
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path


def png_size(path: str) -> tuple[int, int]:
  """(width, height) in pixels from a PNG's IHDR chunk."""
  with open(path, "rb") as f:
    head = f.read(24)
  if head[:8] != b"\x89PNG\r\n\x1a\n":
    raise ValueError(f"{path}: not a PNG file")
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def save_image_grid(path: str, images: np.ndarray, ncols: int = 8, scale: int = 4) -> None:
  """Write a grid of images as a PNG, each pixel repeated `scale` times so small images stay visible."""
  plt = pyplot()
  grid = image_grid(images, ncols)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  plt.imsave(path, grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0.0, vmax=1.0)
