"""Encodes a data set's images once into a latent cache (latent/store.py).

Latent diffusion trains on the autoencoder's latents, never on pixels
(Rombach et al. 2022, sec. 3); DiT's extract_features.py encodes ImageNet
once for the same reason (the VAE costs as much per image as the DiT step).
`cache_latents(config)` encodes config.data's train and eval splits, read
from config.latent.images (the pixel source), with the autoencoder of
config.latent.autoencoder, and stores the posterior's mean and log-variance
(config.latent.cache_dtype) and the labels.

Batches are laid out and sharded over the mesh as the eval loop's
(config.eval.batch_size, global; each process reads and writes only its
rows, into its own files). Everything is written under `<data_dir>.partial`;
the manifest goes in last and the directory is renamed to data_dir in one
step, so an interrupted encode is never read as a cache and a rerun starts
over. A complete cache of the same autoencoder, images and settings makes a
rerun a no-op; one of anything else is refused, never overwritten.

The scale factor (recorded in the manifest): config.latent.scale_factor if
set, else the diffusers VAE's scaling_factor, else 1/std of the train
split's z ~ q(z|x), computed exactly from the moments, Var z = E[mean^2 +
exp(logvar)] - E[mean]^2 over every latent element (LDM's scale_by_std,
which measured one sampled batch).
"""

import concurrent.futures
import json
import math
import os
import shutil
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from diffusion_jax import parallel
from diffusion_jax.data import pipeline, sources
from diffusion_jax.latent import autoencoder_source, store
from diffusion_jax.models import autoencoder as autoencoder_lib


def _plan(config, ae, pixel_cfg) -> dict:
  """What decides a cache's contents (a rerun with equal plans is a
  no-op)."""
  return {'autoencoder': ae.identity(),
          'data': store.data_identity(pixel_cfg),
          'dtype': config.latent.cache_dtype,
          'variants': 2 if pixel_cfg.random_flip else 1,
          'scale_factor_asked': float(config.latent.scale_factor)}


def _existing(path: str, plan: dict) -> bool:
  """True if path holds this plan's cache; raises if it holds anything
  else; False if it does not exist."""
  if not os.path.exists(path):
    return False
  if not os.path.isfile(os.path.join(path, store.MANIFEST)):
    raise store.LatentCacheError(
        f'config.data.data_dir={path!r} exists but is no latent cache (no '
        f'{store.MANIFEST}): choose a new directory, or remove it')
  manifest = store.read_manifest(path)
  diffs = sorted(k for k, v in plan.items() if manifest['plan'].get(k) != v)
  if diffs:
    raise store.LatentCacheError(
        f'config.data.data_dir={path!r} holds a latent cache of other '
        f'settings ({", ".join(diffs)} differ): choose a new '
        'config.data.data_dir, or remove the old cache first')
  return True


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def make_encode_step(model, mesh, variants: int, dtype):
  """(params, images, mask) -> (mean, logvar) (B, V, h, w, C) in dtype, and
  masked float32 sums of z's moments (replicated)."""

  def step(params, images, mask):
    views = [images, images[:, :, ::-1]][:variants]
    moments = [model.apply({'params': params}, x,
                           method=autoencoder_lib.AutoencoderKL.encode)
               for x in views]
    mean = jnp.stack([m for m, _ in moments], axis=1)
    logvar = jnp.stack([v for _, v in moments], axis=1)
    w = mask.reshape(-1, *(1,) * (mean.ndim - 1))
    sums = {'z': jnp.sum(w * mean),
            'z2': jnp.sum(w * (jnp.square(mean) + jnp.exp(logvar))),
            'count': jnp.sum(mask) * math.prod(mean.shape[1:])}
    return mean.astype(dtype), logvar.astype(dtype), sums

  batch, repl = parallel.batch_sharded(mesh), parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(repl, batch, batch),
                 out_shardings=(batch, batch, repl))


class _SplitWriter:
  """This process's .npy files of one split, preallocated (open_memmap)."""

  def __init__(self, path, split, rows, latent_shape, variants, dtype,
               labels: bool):
    p = jax.process_index()
    shape = (rows, variants, *latent_shape)
    open_ = lambda what, s, d: np.lib.format.open_memmap(
        os.path.join(path, store.file_name(split, what, p)), mode='w+',
        dtype=d, shape=s)
    self.mean = open_('mean', shape, dtype)
    self.logvar = open_('logvar', shape, dtype)
    self.labels = open_('labels', (rows,), np.int32) if labels else None

  def write(self, start: int, mean, logvar, labels) -> None:
    end = start + len(mean)
    self.mean[start:end], self.logvar[start:end] = mean, logvar
    if self.labels is not None:
      self.labels[start:end] = labels

  def close(self) -> None:
    for array in (self.mean, self.logvar, self.labels):
      if array is not None:
        array.flush()
    self.mean = self.logvar = self.labels = None


def _encode_split(path, split, pixel_cfg, ae, encode_step, params, mesh,
                  batch_size, variants, dtype, pool) -> dict:
  """Writes one split's files; returns its manifest entry and z sums."""
  source = sources.open_split(pixel_cfg, split)
  num, first_label = len(source), source.row(0)[1]
  p, n = jax.process_index(), jax.process_count()
  local = batch_size // n
  num_batches = -(-num // batch_size)
  blank = np.zeros_like(np.asarray(source.row(0)[0]))
  sharding = parallel.batch_sharded(mesh)

  def read(i):
    return source.row(i) if i < num else (blank, None)

  def make_batch(k):
    rows = k * batch_size + p * local + np.arange(local)
    images, labels = zip(*pool.map(read, rows))
    host = dict(images=np.stack(images).astype(np.float32) / 127.5 - 1.0,
                mask=(rows < num).astype(np.float32))
    device = {key: jax.make_array_from_process_local_data(
        sharding, x, (batch_size, *x.shape[1:])) for key, x in host.items()}
    return device, np.asarray([0 if y is None else y for y in labels],
                              np.int32)

  latent_shape = ae.info.latent_shape(pixel_cfg.image_size)
  writer = _SplitWriter(path, split, num_batches * local, latent_shape,
                        variants, dtype, first_label is not None)
  totals = np.zeros(3, np.float64)
  batches = pipeline.BatchIterator(make_batch, num_steps=num_batches,
                                   prefetch=max(pixel_cfg.prefetch, 1))
  try:
    for k, (batch, labels) in enumerate(tqdm.tqdm(
        batches, total=num_batches, desc=f'encode {split}', unit='batch',
        disable=p > 0)):
      mean, logvar, sums = encode_step(params, batch['images'], batch['mask'])
      writer.write(k * local, _local_rows(mean), _local_rows(logvar), labels)
      totals += [float(sums['z']), float(sums['z2']), float(sums['count'])]
  finally:
    batches.close()
    writer.close()
  entry = {'count': num, 'labels': first_label is not None}
  return entry, totals


def _scale(config, ae, totals) -> tuple[float, str, dict]:
  z, z2, count = totals
  mean = z / count
  std = math.sqrt(max(z2 / count - mean * mean, 0.0))
  stats = {'latent_mean': mean, 'latent_std': std}
  if config.latent.scale_factor:
    return (float(config.latent.scale_factor), 'config.latent.scale_factor',
            stats)
  if ae.info.scaling_factor is not None:
    return ae.info.scaling_factor, 'the diffusers scaling_factor', stats
  if not std:
    raise store.LatentCacheError(
        'the train split\'s latents have zero variance: the autoencoder '
        'cannot be used (set config.latent.scale_factor to force a scale)')
  return 1.0 / std, f'1/std of the {config.data.train_split!r} latents', stats


def cache_latents(config, mesh=None) -> bool:
  """Encodes config's train and eval splits into config.data.data_dir;
  False (and a log line) if it already holds this cache."""
  path = store.cache_dir(config.data.data_dir)
  ae = autoencoder_source.load(config.latent.autoencoder,
                               config.latent.autoencoder_step)
  pixel_cfg = store.pixel_data_config(config)
  info, size = ae.info, pixel_cfg.image_size
  if info.in_channels != pixel_cfg.channels or size % info.down_factor:
    raise store.LatentCacheError(
        f'config.latent.autoencoder={info.path!r} encodes images of '
        f'{info.in_channels} channels with sides divisible by '
        f'{info.down_factor}; config.data has {pixel_cfg.channels} channels '
        f'and image_size={size}: change config.data.image_size/channels or '
        'the autoencoder')
  plan = _plan(config, ae, pixel_cfg)
  if _existing(path, plan):
    logging.info('%s already holds the latents of this autoencoder and data '
                 '(manifest.json): nothing to do.', path)
    return False
  mesh = parallel.create_mesh() if mesh is None else mesh
  batch_size = config.eval.batch_size
  parallel.check_batch_size(batch_size, mesh, 'config.eval.batch_size')
  partial = path + store.PARTIAL_SUFFIX
  if jax.process_index() == 0:
    if os.path.exists(partial):
      logging.info('Removing %s, left by an interrupted encode.', partial)
      shutil.rmtree(partial)
    os.makedirs(partial)
  multihost_utils.sync_global_devices('latent cache: partial directory')
  dtype = np.dtype(config.latent.cache_dtype)
  variants = plan['variants']
  encode_step = make_encode_step(info.model(), mesh, variants, dtype)
  params = jax.device_put(ae.params, parallel.replicated(mesh))
  start = time.perf_counter()
  splits, train_totals = {}, None
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    for split in dict.fromkeys((pixel_cfg.train_split, pixel_cfg.eval_split)):
      splits[split], totals = _encode_split(
          partial, split, pixel_cfg, ae, encode_step, params, mesh,
          batch_size, variants, dtype, pool)
      if split == pixel_cfg.train_split:
        train_totals = totals
  scale, scale_source, stats = _scale(config, ae, train_totals)
  multihost_utils.sync_global_devices('latent cache: shards written')
  if jax.process_index() == 0:
    manifest = {
        'format': store.FORMAT, 'version': store.VERSION, 'plan': plan,
        'autoencoder': ae.identity(), 'data': plan['data'],
        'dtype': dtype.name, 'variants': variants,
        'latent_shape': list(info.latent_shape(size)),
        'image_shape': [size, size, pixel_cfg.channels],
        'scale_factor': scale, 'scale_source': scale_source, **stats,
        'splits': splits, 'batch_size': batch_size,
        'num_processes': jax.process_count(),
        'seconds': time.perf_counter() - start}
    tmp = os.path.join(partial, store.MANIFEST + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(partial, store.MANIFEST))  # manifest last
    os.rename(partial, path)  # atomic: the cache appears complete or not at all
    logging.info('Wrote the latent cache %s: %s, %s latents of %s, scale %.6g '
                 '(%s), in %.1f s.', path,
                 {k: v['count'] for k, v in splits.items()},
                 'x'.join(map(str, manifest['latent_shape'])), dtype.name,
                 scale, scale_source, manifest['seconds'])
  multihost_utils.sync_global_devices('latent cache: renamed')
  return True
