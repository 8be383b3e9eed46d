"""Data sources: image data sets opened as random-access uint8 NHWC rows.

Sources (`config.data.source`):
  digits:       scikit-learn's 1,797 8x8 digits (shipped with the package, so
                every machine can train without a download). `train` is the
                first 1,497 images, `test` the last 300.
  tfds:         a TFDS data set prepared under `config.data.data_dir`, read
                by random access (array_record) so only the rows a process
                needs are decoded. Nothing is downloaded unless
                `config.data.download` is true.
  idx:          MNIST-style IDX files (`train-*`/`t10k-*`, optionally .gz).
  image_folder: PNG/JPEG files under `data_dir/<split>/` (recursively). A
                folder without that subfolder is the *train* split only, so
                evaluation never silently runs on training images. Images are
                center-cropped to a square, box-halved while at least twice
                the target size, then resized with BICUBIC (as in ADM).
  npz:          an .npz file with `<split>_images` (and `<split>_labels`), or
                plain `images`/`labels`, which again count as the train split.
  latents:      a latent cache (latent/store.py) in `data_dir`: training
                reads its latents (data/pipeline.py); opened here it is the
                images it encoded, so sample quality sees pixels.

Only image_folder resizes; every other source must already have shape
(image_size, image_size, channels) or a DataError says which keys to change,
unless the config has `resize` (a latent cache's images, config.latent.
images.resize): 'center_crop' as image_folder (ADM's, as DiT), or 'pad'
(zeros around smaller images: 28x28 Fashion-MNIST to 32x32).
Batching, shuffling and sharding are in `data.pipeline`.
"""

import dataclasses
import gzip
import math
import pathlib
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from diffusion_jax.errors import UserError

SOURCES = ('digits', 'tfds', 'idx', 'image_folder', 'npz', 'latents')
RESIZE_MODES = ('', 'center_crop', 'pad')
DIGITS_TRAIN_SIZE = 1497
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')


class DataError(UserError, ValueError):
  """Bad data or data config; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ImageData:
  images: np.ndarray  # uint8, (N, H, W, C).
  labels: Optional[np.ndarray] = None  # int32, (N,).


# ----------------------------------------------------------------- sources --
# A source is random access: len(src), src[i] -> uint8 (H, W, C), plus
# `row(i)` -> (image, label or None) and `load()` -> ImageData. The train/eval
# pipelines only index, so lazy sources (tfds, image_folder) decode just the
# rows this process needs.


class _ArraySource:
  """Images already in memory."""

  def __init__(self, images, labels=None):
    self._data = ImageData(images, labels)

  def __len__(self):
    return len(self._data.images)

  def __getitem__(self, i):
    return self._data.images[i]

  def row(self, i):
    labels = self._data.labels
    return self._data.images[i], None if labels is None else labels[i]

  def load(self):
    return self._data


class _LazySource:
  """Rows produced on demand by `read(i) -> (image, label or None)`."""

  def __init__(self, n: int, read: Callable[[int], tuple[np.ndarray, Any]]):
    self._n, self._read = n, read

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return self._read(int(i))[0]

  def row(self, i):
    return self._read(int(i))

  def load(self):
    rows = [self._read(i) for i in range(self._n)]
    labels = [label for _, label in rows]
    return ImageData(
        np.stack([image for image, _ in rows]),
        None if labels[0] is None else np.asarray(labels, np.int32))


def _expected_shape(cfg):
  return (cfg.image_size, cfg.image_size, cfg.channels)


def _check_shape(shape, cfg, where: str):
  if cfg.get('resize'):  # _Resized makes the shape
    return
  expected = _expected_shape(cfg)
  if tuple(shape) != expected:
    raise DataError(
        f'{where}: images have shape {tuple(shape)} (H, W, C) but the config '
        f'expects {expected}. Set config.data.image_size={shape[0]} and '
        f'config.data.channels={shape[-1]} (only source=image_folder resizes).')


def _array_source(images, labels, cfg, where):
  """Validates in-memory arrays (NHW gets a channel axis) and wraps them."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise DataError(f'{where}: images must be uint8 0..255, got '
                    f'{images.dtype}; convert them when preparing the data.')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise DataError(f'{where}: images must be NHWC or NHW, got shape '
                    f'{images.shape}.')
  _check_shape(images.shape[1:], cfg, where)
  if labels is not None:
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    if len(labels) != len(images):
      raise DataError(f'{where}: {len(labels)} labels for {len(images)} '
                      'images.')
  return _ArraySource(images, labels)


def _data_path(cfg) -> pathlib.Path:
  if not cfg.data_dir:
    raise DataError(f'source={cfg.source!r} reads local files: set '
                    'config.data.data_dir.')
  path = pathlib.Path(cfg.data_dir).expanduser()
  if not path.exists():
    raise DataError(f'config.data.data_dir={cfg.data_dir!r} does not exist.')
  return path


def _open_digits(cfg, split):
  if split not in ('train', 'test'):
    raise DataError(f'digits has splits "train" (first {DIGITS_TRAIN_SIZE}) '
                    f'and "test" (last 300), not {split!r}: set '
                    'config.data.train_split / eval_split.')
  # Lazy: scikit-learn takes ~1 s to import.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  part = (slice(None, DIGITS_TRAIN_SIZE) if split == 'train'
          else slice(DIGITS_TRAIN_SIZE, None))
  return _array_source(images[part], digits.target[part], cfg, 'digits')


def _read_idx(path: pathlib.Path, ndim: int) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (magic 0x0000 08 <ndim>)."""
  try:
    with (gzip.open if path.suffix == '.gz' else open)(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f'{path}: unreadable or truncated ({e}); re-copy it.')
  if len(data) < 4 + 4 * ndim or data[:4] != bytes((0, 0, 8, ndim)):
    raise DataError(f'{path}: not a {ndim}-d uint8 IDX file (bad magic '
                    f'number {data[:4].hex()}); re-copy it.')
  dims = tuple(int(d) for d in np.frombuffer(data, '>u4', ndim, 4))
  if len(data) != 4 + 4 * ndim + math.prod(dims):
    raise DataError(f'{path}: size does not match header {dims}; the file is '
                    'truncated or corrupt, re-copy it.')
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root, prefix, kind, ndim):
  for sep in ('-', '.'):
    for ext in ('', '.gz'):
      path = root / f'{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}'
      if path.exists():
        return path
  return None


def _open_idx(cfg, split):
  prefix = {'train': 'train', 'test': 't10k'}.get(split)
  if prefix is None:
    raise DataError(f'idx has splits "train" and "test", not {split!r}.')
  root = _data_path(cfg)
  images_path = _find_idx(root, prefix, 'images', 3)
  if images_path is None:
    raise DataError(f'No {prefix}-images-idx3-ubyte[.gz] in config.data.'
                    f'data_dir={cfg.data_dir!r}.')
  labels_path = _find_idx(root, prefix, 'labels', 1)
  labels = _read_idx(labels_path, 1) if labels_path else None
  return _array_source(_read_idx(images_path, 3), labels, cfg, str(root))


def _load_image_file(path, size: int, channels: int) -> np.ndarray:
  try:
    with Image.open(path) as img:
      img = img.convert('L' if channels == 1 else 'RGB')
  except OSError as e:  # Includes PIL.UnidentifiedImageError.
    raise DataError(f'{path}: not a readable image ({e}); fix or remove it.')
  return _square_resize(img, size, channels)


def _square_resize(img, size: int, channels: int) -> np.ndarray:
  """A PIL image centre-cropped to a square, box-halved while at least
  twice `size`, then BICUBIC-resized to size x size (as ADM)."""
  w, h = img.size
  s = min(w, h)
  img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s,
                  (h - s) // 2 + s))
  while img.size[0] >= 2 * size:  # Box-halving avoids aliasing on big shrinks.
    img = img.resize((img.size[0] // 2,) * 2, Image.Resampling.BOX)
  img = img.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(img, np.uint8).reshape(size, size, channels)


def _resize_row(image, cfg, where: str) -> np.ndarray:
  """One image to (image_size, image_size, channels) by cfg.resize."""
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  size, channels = cfg.image_size, cfg.channels
  if image.shape[-1] != channels:
    raise DataError(f'{where}: an image has {image.shape[-1]} channels, not '
                    f'config.data.channels={channels}.')
  if cfg.resize == 'center_crop':
    img = Image.fromarray(image[..., 0] if channels == 1 else image)
    return _square_resize(img, size, channels)
  height, width = image.shape[:2]
  if height > size or width > size:
    raise DataError(
        f'{where}: a {height}x{width} image does not fit in '
        f'config.data.image_size={size} by padding: use '
        "resize='center_crop' (config.data or config.latent.images) or a "
        'larger image_size.')
  top, left = (size - height) // 2, (size - width) // 2
  return np.pad(image, ((top, size - height - top), (left, size - width - left),
                        (0, 0)))


def _open_image_folder(cfg, split):
  if cfg.channels not in (1, 3):
    raise DataError('image_folder needs config.data.channels 1 (L) or 3 (RGB)')
  root = _data_path(cfg)
  folder = root / split
  if not folder.is_dir():
    if split != cfg.train_split or (root / cfg.eval_split).is_dir():
      raise DataError(f'No folder {folder}: put the {split!r} images there.')
    folder = root  # A flat folder is the train split.
  paths = sorted(p for p in folder.rglob('*')
                 if p.suffix.lower() in _IMAGE_SUFFIXES)
  if not paths:
    raise DataError(f'No .png/.jpg/.jpeg files under {folder}.')
  read = lambda i: (_load_image_file(paths[i], cfg.image_size, cfg.channels),
                    None)
  return _LazySource(len(paths), read)


def _open_npz(cfg, split):
  path = _data_path(cfg)
  with np.load(path) as npz:
    keys = set(npz.files)
    prefix = f'{split}_' if f'{split}_images' in keys else ''
    if not prefix and (split != cfg.train_split or 'images' not in keys):
      raise DataError(f'{path} has no "{split}_images" array (keys: '
                      f'{sorted(keys)}); plain "images" is the train split.')
    try:
      labels = npz.get(f'{prefix}labels')
      images = npz[f'{prefix}images']
    except ValueError as e:  # object arrays: nothing is unpickled
      raise DataError(
          f'{path}: an array of {sorted(keys)} holds Python objects '
          f'({e}); store images as a uint8 array "{prefix}images" '
          f'(N, H, W, C) and labels as an int array "{prefix}labels".') from e
    return _array_source(images, labels, cfg, str(path))


def _open_tfds(cfg, split):
  """Opens a prepared TFDS split; fails fast instead of retrying downloads."""
  if not cfg.name:
    raise DataError('source=tfds needs config.data.name, e.g. "cifar10".')
  how = (f'Prepare it on a machine with internet: `tfds build {cfg.name} '
         f'--data_dir=DIR --file_format=array_record`, copy DIR here and set '
         'config.data.data_dir=DIR (or set config.data.download=True).')
  if not cfg.data_dir and not cfg.download:
    raise DataError(f'config.data.data_dir is empty. {how}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
        f'No data set {cfg.name!r} in {cfg.data_dir!r}. {how}') from e
  if not builder.is_prepared():
    if not cfg.download:
      raise DataError(f'{cfg.name!r} is not prepared in config.data.data_dir='
                      f'{cfg.data_dir!r}. {how}')
    builder.download_and_prepare(file_format='array_record')
  if split.split('[')[0] not in builder.info.splits:
    raise DataError(f'{cfg.name} has splits {list(builder.info.splits)}, not '
                    f'{split!r}: set config.data.train_split / eval_split.')
  features = builder.info.features
  key = 'image' if 'image' in features else next(
      (k for k, f in features.items()
       if isinstance(f, tfds.features.Image)), None)
  if key is None:
    raise DataError(f'{cfg.name} has no image feature ({list(features)}).')
  label = 'label' if 'label' in features else None
  if builder.info.file_format.value not in ('array_record', 'parquet'):
    # No random access for tfrecord: decode the whole split once.
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return _array_source(data[key], data[label] if label else None, cfg,
                         cfg.name)
  source = builder.as_data_source(split=split)

  def read(i):
    row = source[i]
    _check_shape(row[key].shape, cfg, cfg.name)
    return row[key], row[label] if label else None

  if len(source):
    read(0)  # Fail at open time, not in the training loop.
  return _LazySource(len(source), read)


class LabelledRows:
  """(image, int32 label) rows of a source that has labels; with
  num_classes > 0 a label outside 0..num_classes-1 is a DataError (the
  class embedding would read out of range: NaN at the first step)."""

  def __init__(self, source, where: str, num_classes: int = 0):
    self._source, self._where = source, where
    self._num_classes = num_classes
    if source.row(0)[1] is None:
      raise DataError(
          f'{where} has no class labels, but config.model.num_classes > 0 '
          'asks for a class-conditional model: use a labelled source '
          '(digits, tfds with a "label" feature, idx with a labels file, npz '
          'with "<split>_labels") or set config.model.num_classes=0.')

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    image, label = self._source.row(i)
    if self._num_classes and not 0 <= label < self._num_classes:
      raise DataError(
          f'{self._where} row {i} has label {label}, outside 0..'
          f'{self._num_classes - 1} (config.model.num_classes='
          f'{self._num_classes}): set config.model.num_classes to the number '
          'of classes of the data (its largest label + 1).')
    return image, np.int32(label)


def _open_latents(cfg, split):
  from diffusion_jax.latent import store  # pylint: disable=g-import-not-at-top
  return store.open_images(cfg, split)


_OPENERS = dict(digits=_open_digits, tfds=_open_tfds, idx=_open_idx,
                image_folder=_open_image_folder, npz=_open_npz,
                latents=_open_latents)


def open_split(cfg, split: str):
  """A non-empty random-access source (len, [i], row(i), load()) of a split."""
  if cfg.source not in _OPENERS:
    raise DataError(f'Unknown config.data.source={cfg.source!r}; use one of '
                    f'{", ".join(SOURCES)}.')
  resize = cfg.get('resize') or ''
  if resize not in RESIZE_MODES:
    raise DataError(f'config.data.resize (or config.latent.images.resize)='
                    f'{resize!r}: use one of {RESIZE_MODES}.')
  source = _OPENERS[cfg.source](cfg, split)
  if not len(source):
    raise DataError(f'{cfg.source} split {split!r} is empty.')
  if resize:
    where = f'{cfg.source} split {split!r}'
    inner = source

    def read(i):
      image, label = inner.row(i)
      return _resize_row(image, cfg, where), label
    source = _LazySource(len(inner), read)
  return source


def load_split(data_config, split: str) -> ImageData:
  """Loads a whole split into memory (small data sets, evaluation, tests)."""
  return open_split(data_config, split).load()
