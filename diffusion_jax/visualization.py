"""Pictures: image grids ([-1, 1] floats to uint8, tiled, PNG) and line plots."""

import math

from absl import logging
from etils import epath
import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats to uint8 [0, 255] (the inverse of the input pipeline).
  NaN pixels become mid-grey (128) and +-inf the end levels: casting NaN
  to uint8 is undefined in numpy. nonfinite_samples says which had any.
  """
  images = np.nan_to_num(np.asarray(images, dtype=np.float32), nan=0.0,
                         posinf=1.0, neginf=-1.0)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def nonfinite_samples(images) -> np.ndarray:
  """(N, ...) floats -> (N,) bool: which samples have a NaN or +-inf pixel
  (a diverged model, an unstable sampler, a flow's inverse overflowing)."""
  images = np.asarray(images)
  return ~np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)


def warn_nonfinite(count: int, total: int, where: str) -> None:
  """Logs how many of `total` samples had non-finite pixels, if any."""
  if count:
    logging.warning(
        '%s: %d of %d samples (%.1f%%) have NaN or infinite pixels, drawn '
        'mid-grey (NaN) or saturated (inf). A diverged or unstable model: '
        'check the training loss; for Glow lower --config.glow.temperature '
        '(0.7 is the paper\'s); for diffusion try more sampling steps.',
        where, count, total, 100.0 * count / total)


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


def upscale(grid: np.ndarray, min_size: int = 256) -> np.ndarray:
  """Nearest-neighbour upscaling by an integer factor to >= min_size px on
  the long side, so that 8x8 digits are visible (pixels stay sharp)."""
  scale = max(1, math.ceil(min_size / max(grid.shape[:2])))
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  return grid


def save_png(path: str, grid: np.ndarray, min_size: int = 256) -> str:
  """Writes a grid, upscaled to at least min_size px (`upscale`)."""
  grid = upscale(grid, min_size)
  path = epath.Path(path)  # Local or gs:// (a workdir on a TPU pod).
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
        f, format='PNG')
  return str(path)


# Line plots drawn with PIL (already a dependency) instead of adding
# matplotlib and its font/build dependencies for a few curves.

_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 420, 320, 64, 16, 30, 44


def _ticks(lo, hi, log):
  if log:  # lo, hi are log10 values; decades, or under two decades round
    # values (0.2, 0.4, ...) placed on the log axis
    decades = [10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1)
               if lo <= e <= hi]
    return decades if len(decades) > 1 else [
        float(v) for v in _ticks(10.0 ** lo, 10.0 ** hi, False)]
  step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12))) / 10
  for mult in (1, 2, 5, 10, 20):  # span/step is in [10, 100): 20 fits 60-99
    if (hi - lo) / (step * mult) <= 6:
      step *= mult
      break
  return list(np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step))


_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
            (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127))


def line_panel(xs, ys, title, xlabel, ylabel, logy=False) -> Image.Image:
  """One curve as an RGB image, axes from 0 (logy: a log10 y axis)."""
  return series_panel({'': (xs, ys)}, title, xlabel, ylabel, logy=logy)


def series_panel(series: dict, title, xlabel, ylabel, logy=False,
                 logx=False) -> Image.Image:
  """Curves name -> (xs, ys) as an RGB image with a legend (when named);
  linear axes start at 0, log axes (log10) at the data."""
  img = Image.new('RGB', (_W, _H), 'white')
  draw, font = ImageDraw.Draw(img), ImageFont.load_default()
  curves = {}
  for name, (xs, ys) in series.items():
    xs = np.asarray(xs, np.float64)
    ys = np.asarray(ys, np.float64)
    if logx:
      xs = np.log10(np.maximum(xs, 1e-12))
    if logy:
      ys = np.log10(np.maximum(ys, 1e-12))
    ok = np.isfinite(xs) & np.isfinite(ys)
    if ok.any():
      curves[name] = (xs[ok], ys[ok])
  all_x = np.concatenate([c[0] for c in curves.values()] or [[0.0, 1.0]])
  all_y = np.concatenate([c[1] for c in curves.values()] or [[0.0, 1.0]])
  x0, x1 = float(all_x.min()), float(all_x.max())
  x0 = x0 if logx else min(x0, 0.0)  # linear axes from 0
  y0, y1 = float(all_y.min()), float(all_y.max())
  y0 = y0 if logy else min(y0, 0.0)
  x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
  ax_l, ax_r, ax_t, ax_b = _PAD_L, _W - _PAD_R, _PAD_T, _H - _PAD_B
  px = lambda v: ax_l + (v - x0) / (x1 - x0) * (ax_r - ax_l)
  py = lambda v: ax_b - (v - y0) / (y1 - y0) * (ax_b - ax_t)
  draw.rectangle((ax_l, ax_t, ax_r, ax_b), outline='black')
  for v in _ticks(x0, x1, logx):
    pos = math.log10(v) if logx else v
    draw.line((px(pos), ax_b, px(pos), ax_b + 4), fill='black')
    draw.text((px(pos), ax_b + 6), f'{v:g}', fill='black', font=font,
              anchor='ma')
  for v in _ticks(y0, y1, logy):
    pos = math.log10(v) if logy else v
    draw.line((ax_l - 4, py(pos), ax_l, py(pos)), fill='black')
    draw.line((ax_l, py(pos), ax_r, py(pos)), fill=(225, 225, 225))
    draw.text((ax_l - 6, py(pos)), f'{v:.3g}', fill='black', font=font,
              anchor='rm')
  for k, (name, (xs, ys)) in enumerate(curves.items()):
    colour = _COLOURS[k % len(_COLOURS)]
    points = [(px(a), py(b)) for a, b in zip(xs, ys)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    for x, y in points:
      draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    if name:
      draw.text((ax_r - 6, ax_t + 6 + 12 * k), name, fill=colour, font=font,
                anchor='ra')
  draw.text((_W / 2, 8), title, fill='black', font=font, anchor='ma')
  draw.text(((ax_l + ax_r) / 2, _H - 14), xlabel, fill='black', font=font,
            anchor='ma')
  draw.text((4, ax_t - 14), ylabel, fill='black', font=font)
  return img
