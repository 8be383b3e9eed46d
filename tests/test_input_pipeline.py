"""Tests for diffusion_jax.data.sources and .pipeline (offline, 8 devices)."""

import gc
import gzip
import importlib.util
import json
import pathlib
import threading
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image
import pytest

from diffusion_jax.data import pipeline as ip
from diffusion_jax.data import sources
from diffusion_jax.data.sources import DataError


def _load_default_config():
  # configs/ is not a package on sys.path; load the real schema by file path.
  path = pathlib.Path(__file__).parents[1] / 'configs' / 'default.py'
  spec = importlib.util.spec_from_file_location('default_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


get_config = _load_default_config()


def data_config(**overrides):
  cfg = get_config().data
  cfg.prefetch = 0
  cfg.update(overrides)
  return cfg


def ids_npz(tmp_path, n, size=2):
  """An npz whose image i is filled with value i, so batches decode to ids."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, size, size, 1)).copy()
  path = tmp_path / 'ids.npz'
  np.savez(path, images=images, labels=np.arange(n))
  return data_config(source='npz', data_dir=str(path), image_size=size)


def ids_of(batch):
  return np.round((np.asarray(batch)[:, 0, 0, 0] + 1) * 127.5).astype(int)


def take(it, n):
  return [np.asarray(next(it)) for _ in range(n)]


def train_iter(cfg, batch=8, seed=0, **kwargs):
  kwargs.setdefault('sharding', None)
  return ip.create_train_iterator(cfg, global_batch_size=batch, seed=seed,
                                  **kwargs)


def data_mesh_sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  return NamedSharding(mesh, P('data'))


# ------------------------------------------------------------------ digits --


def test_digits_splits():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  train = sources.load_split(data_config(), 'train')
  test = sources.load_split(data_config(), 'test')
  assert train.images.shape == (1497, 8, 8, 1)
  assert test.images.shape == (300, 8, 8, 1)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert train.images.min() == 0 and train.images.max() == 255
  everything = np.concatenate([train.images, test.images])[..., 0]
  digits = datasets.load_digits()
  expected = np.round(digits.images * 255 / 16).astype(np.uint8)
  np.testing.assert_array_equal(everything, expected)  # Disjoint, in order.
  np.testing.assert_array_equal(
      np.concatenate([train.labels, test.labels]), digits.target)
  with pytest.raises(DataError, match='eval_split'):
    sources.load_split(data_config(), 'validation')


def test_train_batches_shape_and_range():
  batch = next(train_iter(data_config(), batch=16))
  assert batch.shape == (16, 8, 8, 1) and batch.dtype == np.float32
  assert batch.min() >= -1 and batch.max() <= 1
  assert batch.min() == -1  # Digits have black background pixels.


def test_determinism_and_seed():
  cfg = data_config(random_flip=True)
  a = take(train_iter(cfg, seed=3), 5)
  b = take(train_iter(data_config(random_flip=True, prefetch=3), seed=3), 5)
  c = take(train_iter(cfg, seed=4), 5)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize('n,batch', [(12, 4), (10, 4)])
def test_each_epoch_is_a_new_permutation(tmp_path, n, batch):
  cfg = ids_npz(tmp_path, n)
  ids = np.concatenate([ids_of(b) for b in take(
      train_iter(cfg, batch=batch), -(-3 * n // batch))])
  epochs = ids[:3 * n].reshape(3, n)  # Batches may straddle epochs.
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_flips_iff_random_flip(tmp_path):
  images = np.random.RandomState(0).randint(0, 256, (16, 4, 4, 3), np.uint8)
  path = tmp_path / 'rand.npz'
  np.savez(path, images=images)
  source = {r.tobytes(): False for r in images}
  source.update({r[:, ::-1].tobytes(): True for r in images})
  for flip in (False, True):
    cfg = data_config(source='npz', data_dir=str(path), image_size=4,
                      channels=3, random_flip=flip)
    rows = np.concatenate(take(train_iter(cfg), 8))
    rows = np.round((rows + 1) * 127.5).astype(np.uint8)
    flipped = [source[r.tobytes()] for r in rows]  # KeyError: not a source row.
    assert any(flipped) == flip
    if flip:
      assert 16 < sum(flipped) < 48  # About half of 64.


def test_resume_and_state():
  cfg = data_config(random_flip=True)
  reference = take(train_iter(cfg), 7)
  np.testing.assert_array_equal(
      np.stack(take(train_iter(cfg, start_step=4), 3)), np.stack(reference[4:]))
  it = train_iter(data_config(random_flip=True, prefetch=2))
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {'step': 3}
  take(it, 2)  # Move on (and fill the prefetch queue), then rewind.
  it.set_state(state)
  np.testing.assert_array_equal(np.stack(take(it, 4)), np.stack(reference[3:]))
  fresh = train_iter(cfg)
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh), reference[3])
  it.close()


@pytest.mark.parametrize('processes', [2, 4])
def test_process_shards_concatenate_to_global_batch(processes):
  cfg = data_config(random_flip=True)
  whole = take(train_iter(cfg, batch=16, process_count=1, process_index=0), 4)
  parts = [take(train_iter(cfg, batch=16, process_index=p,
                           process_count=processes), 4)
           for p in range(processes)]
  for step, batch in enumerate(whole):
    assert parts[0][step].shape[0] == 16 // processes
    np.testing.assert_array_equal(
        np.concatenate([part[step] for part in parts]), batch)


def test_global_batch_is_sharded_over_8_devices():
  assert jax.device_count() == 8
  sharding = data_mesh_sharding()
  it = train_iter(data_config(prefetch=2), batch=32, sharding=sharding)
  batch = next(it)
  it.close()
  assert isinstance(batch, jax.Array) and batch.shape == (32, 8, 8, 1)
  assert batch.sharding == sharding
  shards = batch.addressable_shards
  assert len(shards) == 8
  assert all(s.data.shape == (4, 8, 8, 1) for s in shards)
  np.testing.assert_array_equal(
      np.asarray(batch), next(train_iter(data_config(), batch=32)))


def test_indivisible_batch_fails_before_reading():
  cfg = data_config(source='idx', data_dir='/nonexistent')  # Never opened.
  with pytest.raises(DataError, match='config.batch_size'):
    train_iter(cfg, batch=12, sharding=data_mesh_sharding())
  with pytest.raises(DataError, match='config.batch_size'):
    train_iter(cfg, batch=6, process_count=4, process_index=0)
  with pytest.raises(DataError, match='config.batch_size'):
    ip.create_eval_iterator(cfg, 'test', global_batch_size=12,
                            sharding=data_mesh_sharding())


# ----------------------------------------------------------------- sources --


def write_idx(path, array, ndim_code):
  header = bytes((0, 0, 8, ndim_code)) + np.array(
      array.shape, '>u4').tobytes()
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize('ext', ['', '.gz'])
def test_idx_round_trip(tmp_path, ext):
  rng = np.random.RandomState(1)
  data = {}
  for prefix, n in (('train', 5), ('t10k', 3)):
    data[prefix] = (rng.randint(0, 256, (n, 4, 4), np.uint8),
                    rng.randint(0, 10, n))
    write_idx(tmp_path / f'{prefix}-images-idx3-ubyte{ext}', data[prefix][0], 3)
    write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte{ext}', data[prefix][1], 1)
  cfg = data_config(source='idx', data_dir=str(tmp_path), image_size=4)
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    loaded = sources.load_split(cfg, split)
    np.testing.assert_array_equal(loaded.images[..., 0], data[prefix][0])
    np.testing.assert_array_equal(loaded.labels, data[prefix][1])


@pytest.mark.parametrize('damage', ['magic', 'truncate', 'truncate_gz'])
def test_idx_corrupt_file(tmp_path, damage):
  ext = '.gz' if damage == 'truncate_gz' else ''
  path = tmp_path / f'train-images-idx3-ubyte{ext}'
  write_idx(path, np.zeros((4, 4, 4), np.uint8), 3)
  raw = path.read_bytes()
  path.write_bytes(b'\x00\x00\x09\x03' + raw[4:] if damage == 'magic'
                   else raw[:-10])
  cfg = data_config(source='idx', data_dir=str(tmp_path), image_size=4)
  with pytest.raises(DataError, match='re-copy'):
    sources.load_split(cfg, 'train')


@pytest.mark.parametrize('channels,mode', [(3, 'RGB'), (1, 'L')])
def test_image_folder_round_trip(tmp_path, channels, mode):
  rng = np.random.RandomState(2)
  images = rng.randint(0, 256, (3, 6, 6, channels), np.uint8)
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  for i, image in enumerate(images):  # Sorted path order: a/0, a/1, a/2.
    Image.fromarray(image.squeeze(-1) if channels == 1 else image, mode).save(
        tmp_path / 'train' / 'a' / f'{i}.png')
  Image.new('RGB', (30, 20), (10, 200, 30)).save(tmp_path / 'train' / 'b.jpg')
  cfg = data_config(source='image_folder', data_dir=str(tmp_path),
                    image_size=6, channels=channels)
  loaded = sources.load_split(cfg, 'train')
  assert loaded.images.shape == (4, 6, 6, channels) and loaded.labels is None
  np.testing.assert_array_equal(loaded.images[:3], images)
  with pytest.raises(DataError, match='test'):
    sources.load_split(cfg, 'test')


def test_flat_image_folder_is_train_only(tmp_path):
  Image.new('L', (8, 8), 7).save(tmp_path / 'x.png')
  cfg = data_config(source='image_folder', data_dir=str(tmp_path))
  assert sources.load_split(cfg, 'train').images.shape == (1, 8, 8, 1)
  with pytest.raises(DataError):
    sources.load_split(cfg, 'test')


def test_prefetch_thread_reports_errors_and_stops(tmp_path):
  Image.new('L', (8, 8), 7).save(tmp_path / 'a.png')
  (tmp_path / 'b.png').write_bytes(b'not a png')
  cfg = data_config(source='image_folder', data_dir=str(tmp_path), prefetch=2)
  with pytest.raises(DataError, match='b.png'):
    take(train_iter(cfg, batch=2), 4)  # Read lazily on the prefetch thread.
  before = threading.active_count()
  it = train_iter(data_config(prefetch=2))
  next(it)
  assert threading.active_count() == before + 1
  del it  # Dropping the iterator stops its thread.
  gc.collect()
  time.sleep(0.3)
  assert threading.active_count() == before


def test_npz_round_trip(tmp_path):
  rng = np.random.RandomState(3)
  train = rng.randint(0, 256, (5, 4, 4), np.uint8)  # NHW gets a channel axis.
  test = rng.randint(0, 256, (2, 4, 4, 1), np.uint8)
  path = tmp_path / 'd.npz'
  np.savez(path, train_images=train, train_labels=np.arange(5),
           test_images=test)
  cfg = data_config(source='npz', data_dir=str(path), image_size=4)
  loaded = sources.load_split(cfg, 'train')
  np.testing.assert_array_equal(loaded.images[..., 0], train)
  np.testing.assert_array_equal(loaded.labels, np.arange(5))
  loaded = sources.load_split(cfg, 'test')
  np.testing.assert_array_equal(loaded.images, test)
  assert loaded.labels is None
  with pytest.raises(DataError, match='validation_images'):
    sources.load_split(cfg, 'validation')


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """Two tiny data sets (array_record and tfrecord), built offline (~6 s)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('tfds')
  images = np.random.RandomState(4).randint(0, 256, (6, 4, 4, 3), np.uint8)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(4, 4, 3)),
      'label': tfds.features.ClassLabel(num_classes=3)})
  for name, file_format in (('tiny_ar', 'array_record'),
                            ('tiny_tfr', 'tfrecord')):
    splits = {
        split: [(i, {'image': images[i], 'label': i % 3}) for i in rows]
        for split, rows in (('train', range(4)), ('test', range(4, 6)))}
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version='1.0.0', features=features, split_datasets=splits,
        data_dir=str(root), file_format=file_format, disable_shuffling=True)
  return root, images


@pytest.mark.parametrize('name', ['tiny_ar', 'tiny_tfr'])
def test_tfds_round_trip(tfds_dir, name):
  root, images = tfds_dir
  cfg = data_config(source='tfds', name=name, data_dir=str(root),
                    image_size=4, channels=3)
  train = sources.load_split(cfg, 'train')
  np.testing.assert_array_equal(train.images, images[:4])
  np.testing.assert_array_equal(train.labels, [0, 1, 2, 0])
  test = sources.load_split(cfg, 'test')
  np.testing.assert_array_equal(test.images, images[4:])
  batch = next(train_iter(cfg, batch=4))
  assert batch.shape == (4, 4, 4, 3)
  with pytest.raises(DataError, match='config.data.image_size'):
    sources.load_split(data_config(source='tfds', name=name,
                                   data_dir=str(root), image_size=8,
                                   channels=3), 'train')


@pytest.mark.parametrize('name,data_dir', [
    ('cifar10', ''), ('cifar10', 'EMPTY'), ('no_such_dataset', 'EMPTY')])
def test_tfds_missing_data_fails_fast(tmp_path, name, data_dir):
  cfg = data_config(source='tfds', name=name,
                    data_dir=str(tmp_path) if data_dir else '')
  start = time.time()
  with pytest.raises(DataError, match='tfds build'):
    sources.load_split(cfg, 'train')
  assert time.time() - start < 5


def test_unknown_source():
  with pytest.raises(DataError, match='digits, tfds, idx, image_folder, npz'):
    sources.load_split(data_config(source='lmdb'), 'train')


def test_missing_data_dir_names_the_key(tmp_path):
  for data_dir in ('', str(tmp_path / 'missing')):
    with pytest.raises(DataError, match='config.data.data_dir'):
      sources.load_split(data_config(source='npz', data_dir=data_dir), 'train')


def test_shape_mismatch():
  with pytest.raises(DataError) as error:
    sources.load_split(data_config(image_size=16, channels=3), 'train')
  message = str(error.value)
  assert '(8, 8, 1)' in message and '(16, 16, 3)' in message
  assert 'config.data.image_size' in message


# -------------------------------------------------------------------- eval --


def test_eval_iterator_sharded_covers_each_example_once(tmp_path):
  cfg = ids_npz(tmp_path, 13)
  batches = list(ip.create_eval_iterator(
      cfg, 'train', global_batch_size=8, sharding=data_mesh_sharding()))
  assert len(batches) == 2
  assert batches[0]['mask'].sharding == data_mesh_sharding()
  ids = np.concatenate([ids_of(b['images']) for b in batches])
  mask = np.concatenate([np.asarray(b['mask']) for b in batches])
  assert mask.dtype == np.float32
  np.testing.assert_array_equal(mask, [1] * 13 + [0] * 3)
  np.testing.assert_array_equal(ids[:13], np.arange(13))


def test_eval_iterator_process_shards(tmp_path):
  cfg = ids_npz(tmp_path, 13)
  ids, mask = [], []
  for p in range(2):
    for b in ip.create_eval_iterator(cfg, 'train', global_batch_size=8,
                                     sharding=None, process_index=p,
                                     process_count=2):
      ids.append(ids_of(b['images'])[b['mask'] == 1])
      mask.append(b['mask'])
  assert all(len(m) == 4 for m in mask)
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(13))
