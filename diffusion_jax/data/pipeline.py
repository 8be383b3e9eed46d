"""Input pipeline: data sources in, sharded global `jax.Array` batches out.

Float32 images in [-1, 1], shuffled and flipped for training
(`create_train_iterator`) or in order with a padding mask for evaluation
(`create_eval_iterator`); the sources themselves are in `data.sources`.

Training order. Position i of the infinite example stream is a pure function
of (data, seed, i): grain's `shuffle(...).repeat()` permutes each epoch with
its own seed (grain uses `seed + epoch`), and the flip of position i comes
from grain's `random_map`, which seeds its generator from (seed, i). Global
batch k is stream positions [k*B, (k+1)*B); process p of P reads only rows
[p*B/P, (p+1)*B/P) of it. So batches do not depend on the process or device
count, and resuming at step k is simply indexing from k.

A latent cache (`source='latents'`, latent/store.py) trains on its rows'
posterior moments instead: each row is float32 (2, h, w, C), [mean; logvar]
of q(z|x) of one image (of its mirror image, drawn like the flips, when
random_flip and the cache holds both), which the latent diffusion method
turns into a scaled sample z on the device (methods/latent_diffusion.py).
Evaluation and sample quality read the cache's images (data.sources).
"""

import math
import queue
import threading
from typing import Optional

import grain
import jax
import numpy as np

from diffusion_jax.data import sources
# DataError and load_split are defined in sources; re-exported for callers
# that also build iterators.
from diffusion_jax.data.sources import DataError, load_split  # pylint: disable=unused-import


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


def _pick_variant(row, rng):
  """One image's moments (V, 2, h, w, C) -> a random variant's (2, h, w, C)
  (V = 2: the image and its mirror image, encoded separately)."""
  if isinstance(row, tuple):
    return (_pick_variant(row[0], rng), row[1])
  return row[rng.integers(row.shape[0])]


def _first_variant(row):
  if isinstance(row, tuple):
    return (_first_variant(row[0]), row[1])
  return row[0]


def _latent_rows(cfg, with_labels: bool, num_classes: int):
  """(random-access rows of a latent cache's train split, whether to draw
  one of two variants per position)."""
  from diffusion_jax.latent import store  # pylint: disable=g-import-not-at-top
  split = store.LatentSplit(cfg.data_dir, cfg.train_split)
  rows = split
  if with_labels:
    rows = sources.LabelledRows(
        split, f'the latent cache in {cfg.data_dir} ({cfg.train_split!r})',
        num_classes)
  return rows, cfg.random_flip and split.variants > 1


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
                          with_labels: bool = False,
                          num_classes: int = 0) -> BatchIterator:
  """Infinite, shuffled global batches of float32 images in [-1, 1].

  With `with_labels` each batch is (images, int32 labels) instead, for
  class-conditional training; the images are the same either way. Labels
  must lie in 0..num_classes-1 (num_classes > 0: checked per row). With
  config.data.captions (and no labels) each batch is (images, (token ids
  (B, L) int32, mask (B, L) bool)) of the rows' captions (data/captions.py).
  With `sharding=None` it yields this process's numpy rows instead of a
  global array (tests, host-side benchmarks). `process_index/count` default
  to jax's and exist so the multi-process split can be tested in one process.
  """
  p, n = _processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, sharding, n)
  cfg = data_config
  latents = cfg.source == 'latents'
  if latents:
    source, flip = _latent_rows(cfg, with_labels, num_classes)
  else:
    source = sources.open_split(cfg, cfg.train_split)
    if with_labels:
      source = sources.LabelledRows(
          source, f'{cfg.source} split {cfg.train_split!r}', num_classes)
    elif cfg.get('captions'):  # rows (image, (ids, mask))
      from diffusion_jax.data import captions  # pylint: disable=g-import-not-at-top
      source = captions.captioned_rows(cfg, source)
    flip = cfg.random_flip
  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=_derive_seed(seed, 0)).repeat()  # Reshuffles per epoch.
  if flip:  # Keyed by position.
    ds = ds.random_map(_pick_variant if latents else _flip,
                       seed=_derive_seed(seed, 1))
  elif latents:
    ds = ds.map(_first_variant)
  # Chunk c of the stream is rows [c*b, (c+1)*b); process p reads chunks
  # p, p+n, p+2n, ..., i.e. its slice of every global batch.
  ds = ds.batch(local_batch_size)
  if not latents:
    ds = ds.map(_to_model_range)
  ds = ds[p::n]
  return BatchIterator(
      lambda step: _globalize(ds[step], sharding, global_batch_size),
      start_step=start_step, prefetch=cfg.prefetch)


def create_eval_iterator(data_config, split: str, *, global_batch_size: int,
                         sharding: Optional[jax.sharding.NamedSharding],
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None,
                         indices: Optional[np.ndarray] = None
                         ) -> BatchIterator:
  """One ordered pass: {'images', 'mask'}; mask is 0 on the padded tail.

  Batch k holds examples [k*B, (k+1)*B) (zeros past the end), laid out over
  processes like the train batches, so every example appears exactly once.
  `indices` restricts the pass to those rows of the split (in that order).
  """
  p, n = _processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, sharding, n)
  source = sources.open_split(data_config, split)
  order = np.arange(len(source)) if indices is None else np.asarray(indices)
  num = len(order)
  blank = np.zeros_like(source[0])

  def make_batch(step):
    rows = step * global_batch_size + p * local_batch_size + np.arange(
        local_batch_size)
    images = np.stack([source[order[i]] if i < num else blank
                       for i in rows])
    local = dict(images=_to_model_range(images),
                 mask=(rows < num).astype(np.float32))
    return jax.tree.map(
        lambda x: _globalize(x, sharding, global_batch_size), local)

  return BatchIterator(make_batch, num_steps=-(-num // global_batch_size),
                       prefetch=data_config.prefetch)
