"""Image grids: [-1, 1] floats to uint8, tiled, written as PNG."""

import math

from etils import epath
import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats to uint8 [0, 255] (the inverse of the input pipeline)."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None,
              padding: int = 1) -> np.ndarray:
  """Tiles (N, H, W, C) uint8 images into one (rows*H', cols*W', C) image."""
  n, h, w, c = images.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + padding) + padding,
                  ncols * (w + padding) + padding, c), 255, dtype=np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(path: str, grid: np.ndarray, min_size: int = 256) -> str:
  """Writes a grid, upscaled with nearest neighbours to at least min_size px
  so that 8x8 digits are visible."""
  scale = max(1, math.ceil(min_size / max(grid.shape[:2])))
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  path = epath.Path(path)  # Local or gs:// (a workdir on a TPU pod).
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
        f, format='PNG')
  return str(path)
