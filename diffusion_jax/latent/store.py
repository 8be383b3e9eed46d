"""The latent cache on disk: posterior moments of a data set's images.

A cache is a local directory (config.data.data_dir with
config.data.source='latents'), written once by `python -m
diffusion_jax.cache_latents` (latent/encode.py):

  manifest.json            written last: a directory without it is no cache
  <split>.mean.p<P>.npy    (rows, V, h, w, C) posterior means E[z|x] of
                           the rows process P encoded, float16 or float32
  <split>.logvar.p<P>.npy  the same shape: log-variances, clipped to
                           [-30, 20] as in models/autoencoder.py
  <split>.labels.p<P>.npy  (rows,) int32, when the images have labels

V = 2 when the images were cached with config.data.random_flip (variant 1
encodes the mirrored image: the encoder is not flip-equivariant, so a
flipped latent is not a flipped image's latent), else 1. The moments are
stored unscaled; the manifest records the scale factor that turns them into
the diffusion's data (Rombach et al. 2022, sec. 4.3.2 and appendix G).

Rows are in the eval loop's layout (data/pipeline.py): global batch k of B
rows is split over the P processes in blocks of b = B / P, process p
writing rows [kB + pb, kB + (p + 1)b) as its rows [kb, (k + 1)b); the last
batch is padded, and rows past the split's count are never read. Every
file is opened with np.load(mmap_mode='r'), so reading row i touches only
its bytes.

Numpy only (no JAX): data/sources.py and the pipeline open caches here.
"""

import json
import math
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from diffusion_jax.data.sources import DataError

FORMAT = 'diffusion_jax.latent_cache'
VERSION = 1
MANIFEST = 'manifest.json'
PARTIAL_SUFFIX = '.partial'
DTYPES = ('float16', 'float32')
# config.latent.images keys: the pixel data the cache encodes (the rest of
# the pixel data config is config.data's).
IMAGE_KEYS = ('source', 'name', 'data_dir', 'download', 'resize')
# Data identity entry -> the config key a user changes to match it.
DATA_KEYS = {
    'source': 'config.latent.images.source',
    'name': 'config.latent.images.name',
    'data_dir': 'config.latent.images.data_dir',
    'resize': 'config.latent.images.resize',
    'train_split': 'config.data.train_split',
    'eval_split': 'config.data.eval_split',
    'image_size': 'config.data.image_size',
    'channels': 'config.data.channels',
}


class LatentCacheError(DataError):
  """A latent cache that is missing, incomplete or made for another model;
  the message names the config key and the fix."""


def _abs_dir(path: str) -> str:
  if not path or '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def pixel_data_config(config) -> ml_collections.ConfigDict:
  """The data config of the images the cache encodes: config.data with
  config.latent.images' source, name, data_dir, download and resize."""
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  for key in IMAGE_KEYS:
    cfg[key] = config.latent.images[key]
  return cfg


def data_identity(pixel_cfg) -> dict:
  """The entries of a pixel data config that decide which images are
  encoded (a key of DATA_KEYS each)."""
  return {'source': pixel_cfg.source, 'name': pixel_cfg.name,
          'data_dir': _abs_dir(pixel_cfg.data_dir),
          'resize': pixel_cfg.get('resize', '') or '',
          'train_split': pixel_cfg.train_split,
          'eval_split': pixel_cfg.eval_split,
          'image_size': int(pixel_cfg.image_size),
          'channels': int(pixel_cfg.channels)}


def cache_dir(data_dir: str) -> str:
  if not data_dir:
    raise LatentCacheError(
        "config.data.source='latents' reads a latent cache: set "
        'config.data.data_dir to its directory (python -m '
        'diffusion_jax.cache_latents --config=... writes it there)')
  if '://' in data_dir:
    raise LatentCacheError(
        f'config.data.data_dir={data_dir!r}: a latent cache is memory-mapped '
        'and must be a local directory')
  return _abs_dir(data_dir)


def read_manifest(data_dir: str) -> dict:
  """The manifest of the complete cache in data_dir (config.data.data_dir),
  or a LatentCacheError saying how to make one."""
  path = cache_dir(data_dir)
  manifest = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest):
    partial = (f' ({path}{PARTIAL_SUFFIX} is an interrupted encode: '
               'running it again starts over)'
               if os.path.isdir(path + PARTIAL_SUFFIX) else '')
    what = ('holds no manifest.json, so it is no complete latent cache'
            if os.path.isdir(path) else 'does not exist')
    raise LatentCacheError(
        f'config.data.data_dir={path!r} {what}{partial}: write the cache '
        'with python -m diffusion_jax.cache_latents --config=<this config>')
  with open(manifest) as f:
    values = json.load(f)
  if values.get('format') != FORMAT or values.get('version') != VERSION:
    raise LatentCacheError(
        f'{manifest} is not a version-{VERSION} latent cache (format '
        f'{values.get("format")!r}, version {values.get("version")!r}): '
        're-cache into a new config.data.data_dir')
  return values


def _shape_text(shape) -> str:
  return 'x'.join(str(int(n)) for n in shape)


def check(manifest: dict, config, info, data_dir: str) -> float:
  """Raises LatentCacheError unless the cache serves `config` with the
  autoencoder `info` (latent/autoencoder_source.AutoencoderInfo); returns
  the cache's scale factor. Checked in this order: autoencoder (config
  files' identity; the parameters' hash is checked where they are read),
  latent shape, scale, pixel data, flips."""
  where = f'the latent cache in {data_dir}'
  mine, theirs = info.identity(), manifest['autoencoder']
  diffs = [f'{k}: cache {theirs.get(k)!r}, config {v!r}'
           for k, v in mine.items() if theirs.get(k) != v]
  if diffs:
    raise LatentCacheError(
        f'{where} was encoded by another autoencoder than '
        f'config.latent.autoencoder={config.latent.autoencoder!r} (step '
        f'{config.latent.autoencoder_step}) ({"; ".join(diffs)}): set '
        'config.latent.autoencoder (and autoencoder_step) to the one that '
        'wrote it, or re-cache into a new config.data.data_dir')
  size, channels = config.data.image_size, config.data.channels
  want = info.latent_shape(size)
  have, have_images = manifest['latent_shape'], manifest['image_shape']
  if tuple(have) != want or tuple(have_images) != (size, size, channels):
    raise LatentCacheError(
        f'{where} holds {_shape_text(have)} latents of '
        f'{_shape_text(have_images)} images; this config asks for '
        f'{_shape_text(want)} latents of {size}x{size}x{channels} images '
        f'(config.data.image_size={size}, config.data.channels={channels}, '
        f'through the f={info.down_factor} autoencoder): set '
        f'config.data.image_size={have_images[0]} and config.data.channels='
        f'{have_images[-1]}, or re-cache for the new size')
  scale = float(manifest['scale_factor'])
  asked = config.latent.scale_factor
  if asked and not math.isclose(asked, scale, rel_tol=1e-6):
    raise LatentCacheError(
        f'config.latent.scale_factor={asked} but {where} was cached with '
        f'scale {scale} ({manifest["scale_source"]}): set '
        'config.latent.scale_factor=0 to use the cache\'s, or re-cache with '
        'the new value')
  mine = data_identity(pixel_data_config(config))
  diffs = [f'{DATA_KEYS[k]}={v!r} (the cache: {manifest["data"].get(k)!r})'
           for k, v in mine.items() if manifest['data'].get(k) != v]
  if diffs:
    raise LatentCacheError(
        f'{where} encodes other images than this config: '
        f'{"; ".join(diffs)}. Set those keys as the cache has them, or '
        're-cache into a new config.data.data_dir')
  if config.data.random_flip and manifest['variants'] < 2:
    raise LatentCacheError(
        f'config.data.random_flip=True but {where} holds no flipped '
        'encodings (it was cached without random_flip): set '
        'config.data.random_flip=False, or re-cache with it True')
  train = manifest['splits'][config.data.train_split]
  if config.model.num_classes and not train['labels']:
    raise LatentCacheError(
        f'config.model.num_classes={config.model.num_classes} asks for '
        f'labels, but {where} has none (its images had no labels): set '
        'config.model.num_classes=0 or cache a labelled data set')
  return scale


def file_name(split: str, what: str, process: int) -> str:
  return f'{split}.{what}.p{process:05d}.npy'


class LatentSplit:
  """A split of a cache, random access: len, row(i) -> (moments (V, 2, h,
  w, C) float32 [mean; logvar] of every variant, int32 label or None)."""

  def __init__(self, data_dir: str, split: str,
               manifest: Optional[dict] = None):
    self.path = cache_dir(data_dir)
    self.manifest = manifest or read_manifest(data_dir)
    splits = self.manifest['splits']
    if split not in splits:
      raise LatentCacheError(
          f'the latent cache in {self.path} has splits {sorted(splits)}, '
          f'not {split!r}: set config.data.train_split / eval_split to the '
          'ones it was cached with')
    self.count = int(splits[split]['count'])
    self.with_labels = bool(splits[split]['labels'])
    self.variants = int(self.manifest['variants'])
    processes = int(self.manifest['num_processes'])
    self._global = int(self.manifest['batch_size'])
    self._local = self._global // processes
    load = lambda what, p: np.load(
        os.path.join(self.path, file_name(split, what, p)), mmap_mode='r')
    try:
      self._mean = [load('mean', p) for p in range(processes)]
      self._logvar = [load('logvar', p) for p in range(processes)]
      self._labels = ([load('labels', p) for p in range(processes)]
                      if self.with_labels else None)
    except (OSError, ValueError) as e:
      raise LatentCacheError(
          f'the latent cache in {self.path} is missing or has a corrupt file '
          f'({e}): re-cache into a new config.data.data_dir') from e

  def __len__(self):
    return self.count

  def _locate(self, i: int) -> tuple[int, int]:
    k, r = divmod(int(i), self._global)
    p, j = divmod(r, self._local)
    return p, k * self._local + j

  def row(self, i: int) -> tuple[np.ndarray, Any]:
    if not 0 <= i < self.count:
      raise IndexError(f'row {i} of a split of {self.count}')
    p, j = self._locate(i)
    moments = np.stack([self._mean[p][j], self._logvar[p][j]], axis=1)
    label = None if self._labels is None else np.int32(self._labels[p][j])
    return moments.astype(np.float32), label

  def __getitem__(self, i):
    return self.row(i)[0]


def open_images(cfg, split: str):
  """The pixel source a cache was encoded from (data/sources.py's
  source='latents' for everything that looks at images: sample-quality
  references, the FD classifier, eval batches)."""
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
  manifest = read_manifest(cfg.data_dir)
  pixel = ml_collections.ConfigDict({**manifest['data'], 'download': False,
                                     'random_flip': cfg.random_flip,
                                     'prefetch': cfg.prefetch})
  size = (cfg.image_size, cfg.image_size, cfg.channels)
  if tuple(manifest['image_shape']) != size:
    raise LatentCacheError(
        f'the latent cache in {cfg.data_dir} encodes '
        f'{_shape_text(manifest["image_shape"])} images, not '
        f'{_shape_text(size)}: set config.data.image_size and channels as '
        'the cache has them')
  return sources.open_split(pixel, split)
