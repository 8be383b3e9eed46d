"""Input pipeline: image data sets in, sharded global `jax.Array` batches out.

Sources (`config.data.source`), all yielding uint8 NHWC images:
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

Only image_folder resizes; every other source must already have shape
(image_size, image_size, channels) or a DataError says which keys to change.

Training order. Position i of the infinite example stream is a pure function
of (data, seed, i): grain's `shuffle(...).repeat()` permutes each epoch with
its own seed (grain uses `seed + epoch`), and the flip of position i comes
from grain's `random_map`, which seeds its generator from (seed, i). Global
batch k is stream positions [k*B, (k+1)*B); process p of P reads only rows
[p*B/P, (p+1)*B/P) of it. So batches do not depend on the process or device
count, and resuming at step k is simply indexing from k.
"""

import dataclasses
import gzip
import math
import pathlib
import queue
import threading
from typing import Any, Callable, Optional

import grain
import jax
import numpy as np
from PIL import Image

SOURCES = ('digits', 'tfds', 'idx', 'image_folder', 'npz')
DIGITS_TRAIN_SIZE = 1497
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')


class DataError(ValueError):
  """Bad data or data config; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ImageData:
  images: np.ndarray  # uint8, (N, H, W, C).
  labels: Optional[np.ndarray] = None  # int32, (N,).


# ----------------------------------------------------------------- sources --
# A source is random access: len(src), src[i] -> uint8 (H, W, C), plus
# `load()` -> ImageData. The train/eval pipelines only index, so lazy sources
# (tfds, image_folder) decode just the rows this process needs.


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
  w, h = img.size
  s = min(w, h)
  img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s,
                  (h - s) // 2 + s))
  while img.size[0] >= 2 * size:  # Box-halving avoids aliasing on big shrinks.
    img = img.resize((img.size[0] // 2,) * 2, Image.Resampling.BOX)
  img = img.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(img, np.uint8).reshape(size, size, channels)


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
    labels = npz.get(f'{prefix}labels')
    return _array_source(npz[f'{prefix}images'], labels, cfg, str(path))


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


class _LabelledRows:
  """(image, int32 label) rows of a source that has labels."""

  def __init__(self, source, where: str):
    self._source = source
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
    return image, np.int32(label)


_OPENERS = dict(digits=_open_digits, tfds=_open_tfds, idx=_open_idx,
                image_folder=_open_image_folder, npz=_open_npz)


def _open_split(cfg, split):
  if cfg.source not in _OPENERS:
    raise DataError(f'Unknown config.data.source={cfg.source!r}; use one of '
                    f'{", ".join(SOURCES)}.')
  source = _OPENERS[cfg.source](cfg, split)
  if not len(source):
    raise DataError(f'{cfg.source} split {split!r} is empty.')
  return source


def load_split(data_config, split: str) -> ImageData:
  """Loads a whole split into memory (small data sets, evaluation, tests)."""
  return _open_split(data_config, split).load()


# ----------------------------------------------------------------- batches --


def _derive_seed(seed: int, purpose: int) -> int:
  # Hash so that seed s+1 is not seed s shifted by one epoch (grain reseeds
  # epoch e with shuffle_seed + e).
  return int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0])


def _flip(row, rng):
  # row: an image, or (image, label) when labels are kept.
  if isinstance(row, tuple):
    return (_flip(row[0], rng), row[1])
  return row[:, ::-1] if rng.integers(2) else row


def _to_model_range(batch):
  if isinstance(batch, tuple):  # (images, labels)
    return (_to_model_range(batch[0]), batch[1])
  return batch.astype(np.float32) / 127.5 - 1.0


def _batch_shards(sharding) -> int:
  """How many devices the batch axis is split over."""
  spec = sharding.spec
  if not spec or spec[0] is None:
    return 1
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def _local_batch_size(global_batch_size, sharding, process_count):
  shards = 1 if sharding is None else _batch_shards(sharding)
  for n, what in ((process_count, 'processes'), (shards, 'devices')):
    if global_batch_size <= 0 or global_batch_size % n:
      raise DataError(
          f'Global batch size {global_batch_size} is not divisible by the '
          f'{n} {what}: set config.batch_size to a multiple of {n}.')
  return global_batch_size // process_count


def _processes(process_index, process_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


class BatchIterator:
  """Yields batch(step) for step = start, start+1, ...; prefetches on a thread.

  The state is just the next step, so checkpointing it (`get_state`) and
  restoring it (`set_state`) resumes the exact batch sequence.
  """

  def __init__(self, make_batch, *, start_step=0, num_steps=None, prefetch=0):
    self._make_batch, self._num_steps = make_batch, num_steps
    self._step, self._prefetch = int(start_step), int(prefetch)
    self._queue = self._thread = self._stop = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._num_steps is not None and self._step >= self._num_steps:
      raise StopIteration
    if self._prefetch <= 0:
      batch = self._make_batch(self._step)
    else:
      if self._thread is None:
        self._start_thread()
      batch = self._queue.get()
      if isinstance(batch, BaseException):
        self.close()
        raise batch
    self._step += 1
    return batch

  def _start_thread(self):
    self._queue, self._stop = queue.Queue(self._prefetch), threading.Event()
    end = math.inf if self._num_steps is None else self._num_steps
    # The thread must not reference `self`, or a dropped iterator would never
    # be collected and its thread would poll forever.
    self._thread = threading.Thread(
        target=_produce, args=(self._make_batch, self._step, end, self._queue,
                               self._stop), daemon=True)
    self._thread.start()

  def __del__(self):
    if self._stop is not None:
      self._stop.set()

  def close(self):
    """Stops the prefetch thread (it restarts on the next `next()`)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    self._queue = self._thread = self._stop = None

  def get_state(self) -> dict[str, int]:
    return {'step': self._step}

  def set_state(self, state: dict[str, int]):
    self.close()
    self._step = int(state['step'])


def _produce(make_batch, step, end, out, stop):
  """Prefetch thread: puts make_batch(step), step+1, ... until stopped."""
  while step < end and not stop.is_set():
    try:
      item = make_batch(step)
    except Exception as e:  # pylint: disable=broad-except
      item, end = e, step  # Hand the error to the consumer, then stop.
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        break
      except queue.Full:
        pass
    step += 1


def _globalize(local, sharding, global_batch_size):
  if sharding is None:
    return local
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, (global_batch_size,) + x.shape[1:]), local)


def create_train_iterator(data_config, *, global_batch_size: int, seed: int,
                          sharding: Optional[jax.sharding.NamedSharding],
                          start_step: int = 0,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          with_labels: bool = False) -> BatchIterator:
  """Infinite, shuffled global batches of float32 images in [-1, 1].

  With `with_labels` each batch is (images, int32 labels) instead, for
  class-conditional training; the images are the same either way.
  With `sharding=None` it yields this process's numpy rows instead of a
  global array (tests, host-side benchmarks). `process_index/count` default
  to jax's and exist so the multi-process split can be tested in one process.
  """
  p, n = _processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, sharding, n)
  cfg = data_config
  source = _open_split(cfg, cfg.train_split)
  if with_labels:
    source = _LabelledRows(source, f'{cfg.source} split {cfg.train_split!r}')
  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=_derive_seed(seed, 0)).repeat()  # Reshuffles per epoch.
  if cfg.random_flip:
    ds = ds.random_map(_flip, seed=_derive_seed(seed, 1))  # Keyed by position.
  # Chunk c of the stream is rows [c*b, (c+1)*b); process p reads chunks
  # p, p+n, p+2n, ..., i.e. its slice of every global batch.
  ds = ds.batch(local_batch_size).map(_to_model_range)[p::n]
  return BatchIterator(
      lambda step: _globalize(ds[step], sharding, global_batch_size),
      start_step=start_step, prefetch=cfg.prefetch)


def create_eval_iterator(data_config, split: str, *, global_batch_size: int,
                         sharding: Optional[jax.sharding.NamedSharding],
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None
                         ) -> BatchIterator:
  """One ordered pass: {'images', 'mask'}; mask is 0 on the padded tail.

  Batch k holds examples [k*B, (k+1)*B) (zeros past the end), laid out over
  processes like the train batches, so every example appears exactly once.
  """
  p, n = _processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, sharding, n)
  source = _open_split(data_config, split)
  num = len(source)
  blank = np.zeros_like(source[0])

  def make_batch(step):
    rows = step * global_batch_size + p * local_batch_size + np.arange(
        local_batch_size)
    images = np.stack([source[i] if i < num else blank for i in rows])
    local = dict(images=_to_model_range(images),
                 mask=(rows < num).astype(np.float32))
    return jax.tree.map(
        lambda x: _globalize(x, sharding, global_batch_size), local)

  return BatchIterator(make_batch, num_steps=-(-num // global_batch_size),
                       prefetch=data_config.prefetch)
