"""Sample quality evaluator: FID, IS and KID of samples against a data split.

The evaluator receives a function that returns batches of samples
(`sample_batch(i)`) and never imports the trainer: whoever owns the model
(training loop, --mode=eval, a benchmark) decides how samples are drawn.
Inception features of samples and data are streamed into
`feature_stats.FeatureStats`; the distances and their definitions are in
`metrics.distances`.

Reference statistics of a data split are computed once and cached as an .npz
(`feature_stats.save_stats`; pytorch-fid's layout, so a published statistics
file can be passed instead). The cache name includes the Inception weights'
fingerprint, so statistics of a random network are never reused with real
weights.
"""

import functools
import hashlib
import json
import math
import os
import time
from typing import Callable, Iterable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel, visualization
from diffusion_jax.data import pipeline
from diffusion_jax.data import sources
from diffusion_jax.metrics import distances
from diffusion_jax.metrics import feature_stats
from diffusion_jax.metrics import inception
from diffusion_jax.metrics import networks


# ------------------------------------------------------ feature extraction --


@functools.lru_cache(maxsize=8)
def make_feature_fn(mesh, features):
  """(variables, images in [-1, 1]) -> {'pool', 'logits_unbiased'}, jitted.

  `features` is a FeatureNetwork's function of images in [0, 1]. Images are
  sharded over 'data', the variables replicated; outputs stay batch-sharded
  (pass them through parallel.gather). Images are quantised to the 256
  levels of an 8-bit PNG first, so samples are measured as if saved and
  reloaded (the published protocol), and data batches (already 8-bit) pass
  unchanged. Cached per (mesh, features) so every caller shares one
  compilation.
  """

  def fn(variables, images):
    # NaN pixels score as mid-grey, as sample mode saves them; 'nonfinite'
    # lets the caller count such samples (visualization.to_uint8).
    nonfinite = ~jnp.all(jnp.isfinite(images.reshape(images.shape[0], -1)),
                         axis=1)
    images = jnp.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0)
    x = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255) / 255.0
    pool, logits = features(variables, x)
    return {'pool': pool, 'logits_unbiased': logits, 'nonfinite': nonfinite}

  batch = parallel.batch_sharded(mesh)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), batch),
                 out_shardings=batch)


def replicate(network: networks.FeatureNetwork, mesh):
  return jax.device_put(network.variables, parallel.replicated(mesh))


def accumulate_features(stats: feature_stats.FeatureStats, feature_fn,
                        variables, batches: Iterable,
                        num: Optional[int] = None,
                        desc: str = 'features') -> feature_stats.FeatureStats:
  """Feeds (images, mask or None) batches through the network into stats.

  One batch stays in flight while the host adds the previous one.
  """
  pending = None

  def consume(out, mask):
    host = {k: parallel.gather(v) for k, v in out.items()}
    keep = np.ones(len(host['pool']), bool) if mask is None else (
        parallel.gather(mask) > 0)
    if num is not None:
      keep &= np.cumsum(keep) + stats.count <= num
    stats.update(host['pool'][keep], host['logits_unbiased'][keep])
    stats.num_nonfinite += int(host['nonfinite'][keep].sum())

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


# ---------------------------------------------------- reference statistics --


def _split_name(data_config, reference: str) -> str:
  if reference in ('train', 'eval'):
    return data_config[f'{reference}_split']
  raise ValueError(f'reference must be "train", "eval" or a path to an .npz '
                   f'statistics file, got {reference!r}')


def _on_every_process(flag: bool) -> bool:
  """True only if flag holds on all processes (so all take one branch)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.int32(flag))
  return bool(np.min(flags))


def reference_stats_path(data_config, split: str, cache_dir: str,
                         network: networks.FeatureNetwork) -> str:
  d = data_config
  key = json.dumps([d.source, d.name, d.data_dir, split, d.image_size,
                    d.channels, network.kind, network.fingerprint])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  name = d.name or d.source
  return os.path.join(cache_dir, f'{name}_{split}_{d.image_size}px_'
                      f'{network.kind}_{digest}.npz')


def _data_features(data_config, mesh, split: str, network, *, batch_size,
                   max_kid_features, seed, indices=None):
  """Streams a split (or the rows `indices` of it) through the network."""
  parallel.check_batch_size(batch_size, mesh, 'batch_size')
  batches = pipeline.create_eval_iterator(
      data_config, split, global_batch_size=batch_size,
      sharding=parallel.batch_sharded(mesh), indices=indices)
  stats = feature_stats.FeatureStats(network.feature_dim,
                                     max_kid_features=max_kid_features,
                                     seed=seed)
  return accumulate_features(
      stats, make_feature_fn(mesh, network.features),
      replicate(network, mesh),
      ((b['images'], b['mask']) for b in batches), desc=f'data {split}')


def reference_stats(data_config, mesh, split: str,
                    network: networks.FeatureNetwork, *, batch_size: int,
                    cache_dir: str, max_kid_features: int = 10_000,
                    seed: int = 0) -> tuple[dict, str]:
  """Statistics of a whole data split, computed once, then read from cache.

  Returns (stats dict as feature_stats.load_stats, path of the cache file).
  """
  path = reference_stats_path(data_config, split, cache_dir, network)
  if _on_every_process(os.path.isfile(path)):
    logging.info('Reference statistics from cache %s', path)
    return feature_stats.load_stats(path, network.feature_dim), path
  stats = _data_features(data_config, mesh, split, network,
                         batch_size=batch_size,
                         max_kid_features=max_kid_features, seed=seed)
  feature_stats.warn_if_few_samples(stats.count, network.feature_dim,
                                    what=f'reference split {split!r}: ')
  # Every process writes (atomically, identical contents): with a
  # process-local workdir each needs its own copy, or the next call would
  # run the sharded extraction on some processes only and hang.
  sqrt_sigma = distances.sqrtm_psd(stats.sigma)
  feature_stats.save_stats(
      path, stats, sqrt_sigma=sqrt_sigma, split=split,
      network=network.kind, network_source=network.source,
      network_fingerprint=network.fingerprint, data=data_config.to_dict())
  logging.info('Cached reference statistics (%d images) at %s', stats.count,
               path)
  return {'mu': stats.mu, 'sigma': stats.sigma, 'sqrt_sigma': sqrt_sigma,
          'kid_features': stats.kid_features, 'num_images': stats.count}, path


# -------------------------------------------------------------- evaluator --


def load_inception(weights_path: str = '') -> inception.InceptionParams:
  """The FID weights from a local file, or random ones (warned) if ''."""
  if weights_path:
    return inception.load_pytorch_fid_weights(weights_path)
  return inception.random_params(0)


def load_network(quality, data_config, cache_dir: str,
                 seed: int = 0) -> networks.FeatureNetwork:
  """The feature network config.sample_quality asks for (QualitySettings)."""
  if quality.network == 'classifier':
    from diffusion_jax.metrics import classifier  # pylint: disable=g-import-not-at-top
    return classifier.load_or_train(data_config, cache_dir=cache_dir,
                                    seed=seed)
  return networks.inception_network(load_inception(quality.weights_path),
                                    quality.resize_to)


def _distances(ref: dict, stats: feature_stats.FeatureStats, *, seed: int,
               kid_subsets: int, kid_subset_size: int) -> dict:
  """Frechet distance and KID of streamed features against a reference."""
  out = {'fd': distances.frechet_distance(
      ref['mu'], ref['sigma'], stats.mu, stats.sigma,
      sqrt_sigma1=ref.get('sqrt_sigma')), 'kid_mean': None, 'kid_std': None}
  if 'kid_features' in ref:
    out['kid_mean'], out['kid_std'] = distances.kid(
        stats.kid_features, ref['kid_features'], subsets=kid_subsets,
        subset_size=kid_subset_size, seed=seed)
  return out


def real_floor(data_config, mesh, network: networks.FeatureNetwork, ref: dict,
               *, num_images: int, seeds: int, batch_size: int,
               kid_subsets: int = 100, kid_subset_size: int = 1000,
               max_kid_features: int = 10_000) -> dict:
  """The score of real images: `num_images` random training images against
  the reference, over `seeds` draws (mean and std).

  The floor a perfect model would reach at this sample count: FD and KID
  are biased upwards at small counts, so a sample figure means something
  only beside it.
  """
  split = data_config.train_split
  size = len(sources.open_split(data_config, split))
  fds, kids = [], []
  for s in range(seeds):
    rows = np.sort(np.random.default_rng(s).choice(
        size, min(num_images, size), replace=False))
    stats = _data_features(data_config, mesh, split, network,
                           batch_size=batch_size,
                           max_kid_features=max_kid_features, seed=s,
                           indices=rows)
    d = _distances(ref, stats, seed=s, kid_subsets=kid_subsets,
                   kid_subset_size=kid_subset_size)
    fds.append(d['fd'])
    kids.append(d['kid_mean'])
  floor = {'floor_fd_mean': float(np.mean(fds)),
           'floor_fd_std': float(np.std(fds)), 'floor_seeds': seeds,
           'floor_num_images': min(num_images, size)}
  if kids[0] is not None:
    floor['floor_kid_mean'] = float(np.mean(kids))
  return floor


def compute_sample_quality(
    sample_batch: Callable[[int], jax.Array], *, data_config, mesh,
    batch_size: int, num_samples: int, network: networks.FeatureNetwork,
    seed: int = 0, reference: str = 'eval', cache_dir: str,
    floor_seeds: int = 0, floor: dict | None = None, is_splits: int = 10,
    kid_subsets: int = 100, kid_subset_size: int = 1000,
    max_kid_features: int = 10_000) -> dict:
  """Frechet distance, IS and KID of `num_samples` samples against a split.

  Args:
    sample_batch: i -> batch i of samples, `batch_size` images in [-1, 1]
      sharded over the mesh's 'data' axis. Called for i = 0, 1, ...,
      ceil(num_samples / batch_size) - 1 (the surplus of the last batch is
      dropped). It should draw the same samples on every call with the same
      i, so evaluations of different checkpoints see the same noise.
    data_config: the data config (`config.data`): the reference split and
      the reference statistics' cache key.
    mesh: the device mesh; feature batches are sharded on 'data' like every
      batch in this project.
    batch_size: images per sample batch, and per reference data batch.
    num_samples: images to score (50_000 for published FIDs).
    network: the feature network (`load_network`; networks.py): Inception
      (FID; random weights only make a smoke test, and the result says so)
      or the data set's own classifier.
    seed: seeds the KID reservoirs and subsets (not the samples).
    reference: 'eval' (data_config.eval_split) or 'train'
      (data_config.train_split), or a path to an .npz with `mu`/`sigma`
      (e.g. a published statistics file; KID is then skipped unless it also
      holds `kid_features`).
    cache_dir: where reference statistics are cached (e.g. the run's
      `fid_stats/`).
    floor_seeds: > 0 adds `real_floor` over that many draws of
      `num_samples` training images (reference 'eval' only).
    floor: the floor_* entries of an earlier result with the same data,
      network and num_samples, reused instead of recomputed (the real
      images do not change during a run; `floor_entries`).
    is_splits, kid_subsets, kid_subset_size, max_kid_features: IS and KID
      settings (see metrics.distances and metrics.feature_stats).

  Returns:
    {'fd' (and 'fid', the same number, for Inception), 'is_mean', 'is_std',
    'kid_mean', 'kid_std' (None if the reference has no KID features),
    'network', 'network_source', 'num_samples', 'num_nonfinite_samples'
    (scored as mid-grey where NaN), 'fd_vs' (split name or
    statistics file), 'reference_num_images', 'reference_stats' (path),
    'comparable_to_published', 'seconds'} and, with floor_seeds,
    'floor_fd_mean', 'floor_fd_std', 'floor_kid_mean', 'floor_seeds',
    'floor_num_images'.
  """
  start = time.perf_counter()
  if num_samples < 2:
    raise ValueError(f'num_samples must be >= 2, got {num_samples}')
  parallel.check_batch_size(batch_size, mesh, 'batch_size')
  if network.is_random:
    logging.warning(inception.RANDOM_WARNING)
  if reference in ('train', 'eval'):
    split = _split_name(data_config, reference)
    ref, ref_path = reference_stats(
        data_config, mesh, split, network, batch_size=batch_size,
        cache_dir=cache_dir, max_kid_features=max_kid_features, seed=seed)
    fd_vs = split
  else:
    ref = feature_stats.load_stats(reference, network.feature_dim)
    ref_path = fd_vs = reference

  stats = feature_stats.FeatureStats(network.feature_dim,
                                     max_kid_features=max_kid_features,
                                     keep_logits=True, seed=seed + 1)
  batches = ((sample_batch(i), None)
             for i in range(math.ceil(num_samples / batch_size)))
  accumulate_features(stats, make_feature_fn(mesh, network.features),
                      replicate(network, mesh), batches, num=num_samples,
                      desc='samples')
  feature_stats.warn_if_few_samples(stats.count, network.feature_dim,
                                    what='samples: ')
  visualization.warn_nonfinite(stats.num_nonfinite, stats.count,
                               'sample quality')
  out = _distances(ref, stats, seed=seed, kid_subsets=kid_subsets,
                   kid_subset_size=kid_subset_size)
  if network.kind == 'inception':
    out['fid'] = out['fd']
  out['is_mean'], out['is_std'] = distances.inception_score(
      stats.logits, splits=min(is_splits, stats.count))
  if floor is not None:
    out.update(floor)
  elif floor_seeds and reference == 'eval':
    out.update(real_floor(
        data_config, mesh, network, ref, num_images=stats.count,
        seeds=floor_seeds, batch_size=batch_size, kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size, max_kid_features=max_kid_features))
  out.update({
      'network': network.kind, 'network_source': network.source,
      'num_samples': stats.count, 'fd_vs': fd_vs,
      'num_nonfinite_samples': stats.num_nonfinite,
      'reference_num_images': ref.get('num_images'),
      'reference_stats': ref_path,
      'comparable_to_published': (network.comparable_to_published and
                                  stats.count >= 50_000),
      'seconds': time.perf_counter() - start,
  })
  return out


def floor_entries(quality: dict) -> dict | None:
  """The real-vs-real floor of a result, for `compute_sample_quality(floor=)`
  (None if it has none)."""
  floor = {k: v for k, v in quality.items() if k.startswith('floor_')}
  return floor or None


def scalar_summaries(quality: dict) -> dict:
  """TensorBoard scalars of a result: fid/is_mean/kid_mean for Inception,
  classifier_fd/... (and _floor) for the classifier."""
  tag = '' if quality['network'] == 'inception' else f'{quality["network"]}_'
  names = {'fd': 'fid' if not tag else 'fd', 'is_mean': 'is_mean',
           'kid_mean': 'kid_mean', 'floor_fd_mean': 'fd_floor',
           'floor_kid_mean': 'kid_mean_floor'}
  return {f'sample_quality/{tag}{name}': quality[key]
          for key, name in names.items() if quality.get(key) is not None}
