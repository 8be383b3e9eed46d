"""Streaming feature statistics (mean, covariance, KID reservoir) and files.

Statistics are streamed: running float64 sums of x and x x^T (shifted by the
first batch's mean against cancellation), so 50k samples are never held at
once. KID needs the features themselves: a seeded reservoir keeps a uniform
random subset of at most `max_kid_features`. IS keeps the 1008 logits
(50k x 1008 float32 = 200 MB at most).

Statistics files are .npz with `mu` and `sigma` (pytorch-fid's layout, so a
published statistics file can be read too), plus `kid_features`,
`num_images`, optionally `sqrt_sigma`, and JSON metadata.
"""

import json
import os
from typing import Optional

from absl import logging
import jax
import numpy as np

from diffusion_jax.metrics import distances
from diffusion_jax.metrics import inception


class FeatureStats:
  """Running mean/covariance (float64), a KID reservoir and IS logits.

  Every process of a multi-host run feeds it the same gathered batches, so
  all of them hold the same statistics (the reservoir is seeded).
  """

  def __init__(self, dim: int = inception.POOL_DIM, *,
               max_kid_features: int = 10_000, keep_logits: bool = False,
               seed: int = 0):
    self.dim, self.count = dim, 0
    self.num_nonfinite = 0  # samples with NaN/inf pixels (sample_quality)
    self._shift = None
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)
    self._max_kid = max_kid_features
    self._reservoir = np.zeros((0, dim), np.float32)
    self._rng = np.random.default_rng(seed)
    self._logits = [] if keep_logits else None
    self._pending, self._num_pending = [], 0

  def update(self, feats: np.ndarray, logits: Optional[np.ndarray] = None):
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[1] != self.dim:
      raise ValueError(f'features of shape {feats.shape}, expected (N, '
                       f'{self.dim})')
    if not len(feats):
      return
    if self._shift is None:
      self._shift = feats.astype(np.float64).mean(axis=0)
    # x^T x in blocks of >= 512 rows: a d x d update per small batch costs
    # as much as a large one (it rewrites 32 MB at d = 2048).
    self._pending.append(feats)
    self._num_pending += len(feats)
    if self._num_pending >= 512:
      self._flush()
    self._add_to_reservoir(feats.astype(np.float32))
    if self._logits is not None:
      self._logits.append(np.asarray(logits, np.float32))
    self.count += len(feats)

  def _flush(self):
    if self._pending:
      x = np.concatenate(self._pending).astype(np.float64) - self._shift
      self._sum += x.sum(axis=0)
      self._outer += x.T @ x
      self._pending, self._num_pending = [], 0

  def _add_to_reservoir(self, feats):
    # Algorithm R: row t (0-based) of the stream replaces a random kept row
    # with probability max/(t+1), so the reservoir is a uniform subset.
    free = max(0, self._max_kid - len(self._reservoir))
    self._reservoir = np.concatenate([self._reservoir, feats[:free]])
    for i in range(free, len(feats)):
      j = self._rng.integers(0, self.count + i + 1)
      if j < self._max_kid:
        self._reservoir[j] = feats[i]

  @property
  def mu(self) -> np.ndarray:
    self._flush()
    return self._shift + self._sum / self.count

  @property
  def sigma(self) -> np.ndarray:
    """Covariance with ddof=1, as np.cov(rowvar=False) in pytorch-fid."""
    if self.count < 2:
      raise distances.StatsError(
          f'a covariance needs >= 2 samples, got {self.count}')
    self._flush()
    mean = self._sum / self.count
    return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)

  @property
  def kid_features(self) -> np.ndarray:
    return self._reservoir

  @property
  def logits(self) -> np.ndarray:
    return np.concatenate(self._logits) if self._logits else np.zeros(
        (0, inception.NUM_CLASSES), np.float32)


def warn_if_few_samples(n: int, dim: int = inception.POOL_DIM, what='') -> None:
  """FID with few samples is biased upwards; below dim it is degenerate."""
  if n <= dim:
    logging.warning('%s%d samples <= %d feature dims: the covariance is '
                    'singular and FID is strongly biased; published FIDs use '
                    '50k samples (FID is biased below ~10k).', what, n, dim)
  elif n < 10_000:
    logging.warning('%s%d samples: FID is biased upwards below ~10k samples '
                    '(published FIDs use 50k); compare only FIDs with equal '
                    'sample counts.', what, n)


# ------------------------------------------------------- statistics files --


def save_stats(path: str, stats: FeatureStats, *,
               sqrt_sigma: Optional[np.ndarray] = None, **extra) -> None:
  """pytorch-fid layout (`mu`, `sigma`) plus KID features and metadata.

  `sqrt_sigma` (= distances.sqrtm_psd(sigma)), when given, is stored so
  that each FID against this reference costs one eigendecomposition instead
  of two.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{jax.process_index()}.npz'
  arrays = dict(mu=stats.mu, sigma=stats.sigma,
                kid_features=stats.kid_features,
                num_images=np.int64(stats.count),
                meta=np.array(json.dumps(extra, sort_keys=True)))
  if sqrt_sigma is not None:
    arrays['sqrt_sigma'] = sqrt_sigma
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)  # Never a half-written cache.


def load_stats(path: str, dim: int = inception.POOL_DIM) -> dict:
  """Reads `mu`, `sigma` (and `kid_features`, `num_images` if present)."""
  if not os.path.isfile(path):
    raise distances.StatsError(f'no statistics file at {path!r}')
  with np.load(path, allow_pickle=False) as npz:
    missing = [k for k in ('mu', 'sigma') if k not in npz.files]
    if missing:
      raise distances.StatsError(
          f'{path} lacks {missing} (has {sorted(npz.files)}); FID '
          'statistics files hold "mu" (D,) and "sigma" (D, D)')
    out = {'mu': npz['mu'].astype(np.float64),
           'sigma': npz['sigma'].astype(np.float64)}
    if 'kid_features' in npz.files and len(npz['kid_features']):
      out['kid_features'] = npz['kid_features']
    if 'num_images' in npz.files:
      out['num_images'] = int(npz['num_images'])
    if 'sqrt_sigma' in npz.files:
      out['sqrt_sigma'] = npz['sqrt_sigma'].astype(np.float64)
  if out['mu'].shape != (dim,) or out['sigma'].shape != (dim, dim):
    raise distances.StatsError(
        f'{path}: mu {out["mu"].shape} and sigma {out["sigma"].shape}, '
        f'expected ({dim},) and ({dim}, {dim}): statistics of another '
        'feature layer?')
  return out
