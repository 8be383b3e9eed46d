"""Sample quality: FID, Inception Score and KID of EMA samples.

Definitions (and why each choice):

* FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
  of Gaussians fitted to 2048-d pool3 features. Covariances use ddof=1 like
  pytorch-fid's np.cov. tr((S1 S2)^(1/2)) is computed in float64 as the sum
  of square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), a symmetric PSD
  matrix similar to S1 S2: no complex parts to discard and no eps-offset
  retries as with scipy.linalg.sqrtm, and ~5x faster at d = 2048.
* Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean
  and std over `splits` contiguous chunks (10 by default). As in the original
  TF code (improved-gan's inception_score), p(y|x) is the softmax over all
  1008 logits of the 2015-12-05 graph computed *without* the fc bias (that
  code multiplies pool3 by the weight matrix only); torch-fidelity does the
  same ('logits_unbiased'). pytorch-fid does not compute IS.
* KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial
  kernel k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of
  `subset_size` features of each set drawn without replacement (100 of 1000
  in the paper and in torch-fidelity); reported as mean and std.

Statistics are streamed: running float64 sums of x and x x^T (shifted by the
first batch's mean against cancellation), so 50k samples are never held at
once. KID needs the features themselves: a seeded reservoir keeps a uniform
random subset of at most `max_kid_features`. IS keeps the 1008 logits
(50k x 1008 float32 = 200 MB at most).

Reference statistics of a data split are computed once and cached as an .npz
with `mu` and `sigma` (pytorch-fid's layout, so a published statistics file
can be passed instead), plus `kid_features` when KID is wanted. The cache
name includes the Inception weights' fingerprint, so statistics of a random
network are never reused with real weights.
"""

import functools
import hashlib
import json
import math
import os
import time
import warnings
from typing import Iterable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

from diffusion_jax import parallel, train
from diffusion_jax.metrics import inception
from diffusion_jax.data import pipeline as input_pipeline

# Sampling streams: the same x_T and noise as --mode=sample (generate.py uses
# seed offset 1000 + batch index), so the first images FID sees are exactly
# the ones sample mode writes, and every evaluation of a run uses the same
# noise (less variance between checkpoints).
_SAMPLE_STREAM = 1000


class StatsError(ValueError):
  """A statistics file is missing, incomplete or of the wrong dimension."""


# ------------------------------------------------------------------- FID --


def sqrtm_psd(sigma) -> np.ndarray:
  """The symmetric PSD square root, float64 (negative round-off clipped)."""
  sigma = np.asarray(sigma, np.float64)
  w, v = scipy.linalg.eigh((sigma + sigma.T) / 2, driver='evr')
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, *,
                     sqrt_sigma1: Optional[np.ndarray] = None) -> float:
  """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64.

  Two symmetric eigendecompositions of d x d (d = 2048: several seconds each
  on a 2-core CPU); pass `sqrt_sigma1 = sqrtm_psd(sigma1)` of a fixed
  reference to skip one (reference statistics files cache it).
  """
  mu1, mu2 = (np.atleast_1d(m).astype(np.float64) for m in (mu1, mu2))
  sigma1, sigma2 = (np.atleast_2d(s).astype(np.float64) for s in (sigma1,
                                                                  sigma2))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise StatsError(f'statistics differ in dimension: mu {mu1.shape} vs '
                     f'{mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}')
  if sigma1.shape != (mu1.size, mu1.size):
    raise StatsError(f'sigma {sigma1.shape} does not fit mu {mu1.shape}')
  sqrt1 = sqrtm_psd(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
  m = sqrt1 @ ((sigma2 + sigma2.T) / 2) @ sqrt1
  eig = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, driver='evr')
  tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * tr_covmean)


# -------------------------------------------------------------------- IS --


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """(mean, std) of exp(E KL(p(y|x) || p(y))) over `splits` chunks."""
  logits = np.asarray(logits, np.float64)
  n = logits.shape[0]
  if n < splits:
    raise ValueError(f'{n} samples cannot form {splits} IS splits')
  logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for i in range(splits):
    part = logp[i * n // splits:(i + 1) * n // splits]
    log_py = scipy.special.logsumexp(part, axis=0) - math.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_py), axis=1)
    scores.append(math.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------- KID --


def _poly_kernel(x, y):
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 of two equal-size feature sets, cubic kernel, float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m = x.shape[0]
  if y.shape[0] != m or m < 2:
    raise ValueError(f'need two sets of the same size >= 2, got {x.shape[0]} '
                     f'and {y.shape[0]}')
  kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
  off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
  return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def _flat64(x):
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0], -1)


def sliced_wasserstein(x, y, *, num_projections: int = 256,
                       seed: int = 0) -> float:
  """Sliced Wasserstein-1 distance between two equal-size sample sets.

  The mean over random unit directions of the 1-D Wasserstein-1 distance of
  the projected samples, which for equal sizes is the mean |difference| of
  the sorted projections. Cheap, no network: a sample-quality figure for
  small data (2-D toys, 8x8 digits) where FID's Inception features are
  meaningless. Compare it with the distance between two halves of the data.
  """
  x, y = _flat64(x), _flat64(y)
  if x.shape != y.shape:
    raise ValueError(f'need two sets of the same shape, got {x.shape} and '
                     f'{y.shape}')
  dirs = np.random.default_rng(seed).normal(size=(x.shape[1], num_projections))
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  px, py = np.sort(x @ dirs, axis=0), np.sort(y @ dirs, axis=0)
  return float(np.mean(np.abs(px - py)))


def mmd_rbf(x, y, *, bandwidth: Optional[float] = None) -> float:
  """Unbiased MMD^2 with the Gaussian kernel exp(-|a - b|^2 / (2 h^2)).

  h defaults to the median distance between all pooled samples (the median
  heuristic). Can be slightly negative when the sets match.
  """
  x, y = _flat64(x), _flat64(y)
  pooled = np.concatenate([x, y])
  sq = np.maximum(np.sum(pooled ** 2, 1)[:, None] + np.sum(pooled ** 2, 1)
                  - 2 * pooled @ pooled.T, 0.0)
  if bandwidth is None:
    bandwidth = float(np.sqrt(np.median(sq[np.triu_indices(len(pooled), 1)])))
  k = np.exp(-sq / (2 * bandwidth ** 2))
  m, n = len(x), len(y)
  kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
               - 2 * kxy.mean())


def kid(feats1, feats2, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """(mean, std) of the unbiased MMD^2 over random subsets (KID)."""
  feats1, feats2 = np.asarray(feats1), np.asarray(feats2)
  n = min(len(feats1), len(feats2))
  if n < subset_size:
    warnings.warn(f'KID: only {n} features per set, using subsets of {n} '
                  f'instead of {subset_size}; KID is noisier and not '
                  'comparable to KIDs with other subset sizes')
    subset_size = n
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(
      feats1[rng.choice(len(feats1), subset_size, replace=False)],
      feats2[rng.choice(len(feats2), subset_size, replace=False)])
            for _ in range(subsets)]
  return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------- streaming statistics --


class FeatureStats:
  """Running mean/covariance (float64), a KID reservoir and IS logits.

  Every process of a multi-host run feeds it the same gathered batches, so
  all of them hold the same statistics (the reservoir is seeded).
  """

  def __init__(self, dim: int = inception.POOL_DIM, *,
               max_kid_features: int = 10_000, keep_logits: bool = False,
               seed: int = 0):
    self.dim, self.count = dim, 0
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
      raise StatsError(f'a covariance needs >= 2 samples, got {self.count}')
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

  `sqrt_sigma` (= sqrtm_psd(sigma)), when given, is stored so that each FID
  against this reference costs one eigendecomposition instead of two.
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
    raise StatsError(f'no statistics file at {path!r}')
  with np.load(path, allow_pickle=False) as npz:
    missing = [k for k in ('mu', 'sigma') if k not in npz.files]
    if missing:
      raise StatsError(f'{path} lacks {missing} (has {sorted(npz.files)}); '
                       'FID statistics files hold "mu" (D,) and "sigma" (D, D)')
    out = {'mu': npz['mu'].astype(np.float64),
           'sigma': npz['sigma'].astype(np.float64)}
    if 'kid_features' in npz.files and len(npz['kid_features']):
      out['kid_features'] = npz['kid_features']
    if 'num_images' in npz.files:
      out['num_images'] = int(npz['num_images'])
    if 'sqrt_sigma' in npz.files:
      out['sqrt_sigma'] = npz['sqrt_sigma'].astype(np.float64)
  if out['mu'].shape != (dim,) or out['sigma'].shape != (dim, dim):
    raise StatsError(f'{path}: mu {out["mu"].shape} and sigma '
                     f'{out["sigma"].shape}, expected ({dim},) and ({dim}, '
                     f'{dim}): statistics of another feature layer?')
  return out


# ------------------------------------------------------ feature extraction --


@functools.lru_cache(maxsize=8)
def make_feature_fn(mesh, resize_to: int = inception.INPUT_SIZE):
  """(variables, images in [-1, 1]) -> {'pool', 'logits_unbiased'}, jitted.

  Images are sharded over 'data', the variables replicated; outputs stay
  batch-sharded (pass them through train.gather). Images are quantised to
  the 256 levels of an 8-bit PNG first, so samples are measured as if saved
  and reloaded (the published protocol), and data batches (already 8-bit)
  pass unchanged. Cached per (mesh, resize_to) so every caller shares one
  compilation.
  """
  model = inception.FIDInceptionV3(resize_to=resize_to)

  def features(variables, images):
    x = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255) / 255.0
    pool, _ = model.apply(variables, x)
    kernel = variables['params']['fc']['kernel']
    return {'pool': pool, 'logits_unbiased': pool @ kernel}

  batch = parallel.batch_sharded(mesh)
  return jax.jit(features, in_shardings=(parallel.replicated(mesh), batch),
                 out_shardings=batch)


def replicate(inception_params: inception.InceptionParams, mesh):
  return jax.device_put(inception_params.variables, parallel.replicated(mesh))


def accumulate_features(stats: FeatureStats, feature_fn, variables,
                        batches: Iterable, num: Optional[int] = None,
                        desc: str = 'features') -> FeatureStats:
  """Feeds (images, mask or None) batches through the network into stats.

  One batch stays in flight while the host adds the previous one.
  """
  pending = None

  def consume(out, mask):
    host = {k: train.gather(v) for k, v in out.items()}
    keep = np.ones(len(host['pool']), bool) if mask is None else (
        train.gather(mask) > 0)
    if num is not None:
      keep &= np.cumsum(keep) + stats.count <= num
    stats.update(host['pool'][keep], host['logits_unbiased'][keep])

  start = time.perf_counter()
  for images, mask in batches:
    out = feature_fn(variables, images)
    if pending is not None:
      consume(*pending)
    pending = (out, mask)
  if pending is not None:
    consume(*pending)
  logging.info('%s: %d images in %.1f s', desc, stats.count,
               time.perf_counter() - start)
  return stats


def _split_name(config, reference: str) -> str:
  if reference in ('train', 'eval'):
    return config.data[f'{reference}_split']
  raise ValueError(f'reference must be "train", "eval" or a path to an .npz '
                   f'statistics file, got {reference!r}')


def _on_every_process(flag: bool) -> bool:
  """True only if flag holds on all processes (so all take one branch)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.int32(flag))
  return bool(np.min(flags))


def reference_stats_path(config, split: str, cache_dir: str,
                         inception_params, resize_to: int) -> str:
  d = config.data
  key = json.dumps([d.source, d.name, d.data_dir, split, d.image_size,
                    d.channels, resize_to, inception_params.fingerprint])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  name = d.name or d.source
  return os.path.join(cache_dir, f'{name}_{split}_{d.image_size}px_'
                      f'r{resize_to}_{digest}.npz')


def reference_stats(config, mesh, split: str, inception_params, *,
                    cache_dir: str, resize_to: int = inception.INPUT_SIZE,
                    max_kid_features: int = 10_000) -> tuple[dict, str]:
  """Statistics of a whole data split, computed once, then read from cache.

  Returns (stats dict as load_stats, path of the cache file).
  """
  path = reference_stats_path(config, split, cache_dir, inception_params,
                              resize_to)
  if _on_every_process(os.path.isfile(path)):
    logging.info('Reference FID statistics from cache %s', path)
    return load_stats(path), path
  batch_size = config.sample.batch_size
  parallel.check_batch_size(batch_size, mesh, 'config.sample.batch_size')
  batches = input_pipeline.create_eval_iterator(
      config.data, split, global_batch_size=batch_size,
      sharding=parallel.batch_sharded(mesh))
  stats = FeatureStats(max_kid_features=max_kid_features, seed=config.seed)
  accumulate_features(
      stats, make_feature_fn(mesh, resize_to), replicate(inception_params,
                                                         mesh),
      ((b['images'], b['mask']) for b in batches), desc=f'reference {split}')
  warn_if_few_samples(stats.count, what=f'reference split {split!r}: ')
  # Every process writes (atomically, identical contents): with a
  # process-local workdir each needs its own copy, or the next call would
  # run the sharded extraction on some processes only and hang.
  sqrt_sigma = sqrtm_psd(stats.sigma)
  save_stats(path, stats, sqrt_sigma=sqrt_sigma, split=split,
             resize_to=resize_to,
             inception=inception_params.source,
             inception_fingerprint=inception_params.fingerprint,
             data=config.data.to_dict())
  logging.info('Cached reference FID statistics (%d images) at %s',
               stats.count, path)
  return {'mu': stats.mu, 'sigma': stats.sigma, 'sqrt_sigma': sqrt_sigma,
          'kid_features': stats.kid_features, 'num_images': stats.count}, path


# ------------------------------------------------------------ integration --


def load_inception(weights_path: str = '') -> inception.InceptionParams:
  """The FID weights from a local file, or random ones (warned) if ''."""
  if weights_path:
    return inception.load_pytorch_fid_weights(weights_path)
  return inception.random_params(0)


def compute_sample_metrics(
    config, workdir: str, mesh, params_ema, *, num_samples: int,
    inception_params: inception.InceptionParams, reference: str = 'eval',
    resize_to: int = inception.INPUT_SIZE, cache_dir: Optional[str] = None,
    is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
    max_kid_features: int = 10_000, sample_fn=None) -> dict:
  """FID, IS and KID of `num_samples` EMA samples against a data split.

  Args:
    config: the run's config (model, diffusion, data, sample.batch_size).
    workdir: the run directory; reference statistics are cached under
      `workdir/fid_stats/` unless `cache_dir` is given.
    mesh: the device mesh; sampling and Inception batches are sharded on
      'data' like every batch in this project.
    params_ema: the EMA params (e.g. `state.ema_params` or
      `generate.load_ema_params(...)[0]`), replicated.
    num_samples: images to sample (50_000 for published FIDs), drawn in
      batches of config.sample.batch_size with --mode=sample's noise.
    inception_params: `inception.load_pytorch_fid_weights(path)` or, where
      no weights exist, `inception.random_params()` (numbers then are only a
      smoke test, and the result says so).
    reference: 'eval' (config.data.eval_split) or 'train'
      (config.data.train_split), or a path to an .npz with `mu`/`sigma`
      (e.g. a published statistics file; KID is then skipped unless it also
      holds `kid_features`).
    resize_to: Inception input side; 299 for real metrics, smaller only for
      tests.
    cache_dir: where reference statistics are cached.
    is_splits, kid_subsets, kid_subset_size, max_kid_features: IS and KID
      settings (see the module docstring).
    sample_fn: an existing `train.make_sample_fn(config, ...)` to reuse (the
      training loop has one); a new one compiles the sampler again.

  Returns:
    {'fid', 'is_mean', 'is_std', 'kid_mean', 'kid_std' (None if the
    reference has no KID features), 'num_samples', 'fid_vs' (split name or
    statistics file), 'reference_num_images', 'reference_stats' (path),
    'inception_weights', 'inception_input_size', 'comparable_to_published',
    'seconds'}.
  """
  start = time.perf_counter()
  if num_samples < 2:
    raise ValueError(f'num_samples must be >= 2, got {num_samples}')
  if inception_params.is_random:
    logging.warning(inception.RANDOM_WARNING)
  if reference in ('train', 'eval'):
    split = _split_name(config, reference)
    ref, ref_path = reference_stats(
        config, mesh, split, inception_params,
        cache_dir=cache_dir or os.path.join(workdir, 'fid_stats'),
        resize_to=resize_to, max_kid_features=max_kid_features)
    fid_vs = split
  else:
    ref, ref_path, fid_vs = load_stats(reference), reference, reference

  batch_size = config.sample.batch_size
  parallel.check_batch_size(batch_size, mesh, 'config.sample.batch_size')
  if sample_fn is None:
    model, schedule = train.create_model_and_schedule(config)
    sample_fn = train.make_sample_fn(config, model, schedule, mesh)

  def sample_batches():
    for i in range(math.ceil(num_samples / batch_size)):
      x_T = train.sample_noise(config, batch_size, _SAMPLE_STREAM + i, mesh)
      rng = jax.random.fold_in(jax.random.key(config.seed), _SAMPLE_STREAM + i)
      yield sample_fn(params_ema, x_T, rng), None

  stats = FeatureStats(max_kid_features=max_kid_features, keep_logits=True,
                       seed=config.seed + 1)
  accumulate_features(stats, make_feature_fn(mesh, resize_to),
                      replicate(inception_params, mesh), sample_batches(),
                      num=num_samples, desc='samples')
  warn_if_few_samples(stats.count, what='samples: ')

  fid = frechet_distance(ref['mu'], ref['sigma'], stats.mu, stats.sigma,
                         sqrt_sigma1=ref.get('sqrt_sigma'))
  is_mean, is_std = inception_score(stats.logits,
                                    splits=min(is_splits, stats.count))
  kid_mean = kid_std = None
  if 'kid_features' in ref:
    kid_mean, kid_std = kid(stats.kid_features, ref['kid_features'],
                            subsets=kid_subsets, subset_size=kid_subset_size,
                            seed=config.seed)
  return {
      'fid': fid, 'is_mean': is_mean, 'is_std': is_std,
      'kid_mean': kid_mean, 'kid_std': kid_std,
      'num_samples': stats.count, 'fid_vs': fid_vs,
      'reference_num_images': ref.get('num_images'),
      'reference_stats': ref_path,
      'inception_weights': inception_params.source,
      'inception_input_size': resize_to,
      'comparable_to_published': (not inception_params.is_random
                                  and resize_to == inception.INPUT_SIZE
                                  and stats.count >= 50_000),
      'seconds': time.perf_counter() - start,
  }
