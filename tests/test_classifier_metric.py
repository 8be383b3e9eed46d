"""The data set's own feature network: a classifier trained on the train
split, cached, and the Frechet distance / KID / IS computed in its features.
"""

import json
import os
from unittest import mock

import jax
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax import parallel
from diffusion_jax.data import sources
from diffusion_jax.metrics import classifier
from diffusion_jax.metrics import distances
from diffusion_jax.metrics import feature_stats
from diffusion_jax.metrics import sample_quality
from tests.util import run_eval, tiny_config

STEPS = 300  # enough for > 90% on the digits' test split, ~2 s here


@pytest.fixture(scope='module')
def digits_classifier(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('classifier'))
  return classifier.load_or_train(tiny_config().data, cache_dir=cache,
                                  steps=STEPS), cache


def _leaves(variables):
  return [np.asarray(x) for x in jax.tree.leaves(variables)]


def test_classifier_is_accurate_deterministic_and_cached(digits_classifier,
                                                          tmp_path):
  net, cache = digits_classifier
  data = tiny_config().data
  test = sources.load_split(data, 'test')
  assert classifier.accuracy(net.variables, 10, test.images,
                             test.labels) > 0.9
  assert net.feature_dim == classifier.FEATURE_DIM and net.num_classes == 10
  # From the cache: no training at all, the same bits.
  with mock.patch.object(classifier, '_train',
                         side_effect=AssertionError('retrained')):
    again = classifier.load_or_train(data, cache_dir=cache, steps=STEPS)
  assert again.fingerprint == net.fingerprint
  for a, b in zip(_leaves(again.variables), _leaves(net.variables)):
    np.testing.assert_array_equal(a, b)
  # Trained anew from the same seed elsewhere: bit-identical; another seed
  # gives another network.
  fresh = classifier.load_or_train(data, cache_dir=str(tmp_path / 'a'),
                                   steps=STEPS)
  assert fresh.fingerprint == net.fingerprint
  other = classifier.load_or_train(data, cache_dir=str(tmp_path / 'b'),
                                   steps=STEPS, seed=1)
  assert other.fingerprint != net.fingerprint


def test_cache_of_another_data_set_or_a_corrupt_one_is_never_used(
    digits_classifier, tmp_path):
  net, cache = digits_classifier
  data = tiny_config().data
  (blob,) = [f for f in os.listdir(cache) if f.endswith('.msgpack')]
  path = os.path.join(cache, blob[:-len('.msgpack')])
  # Another image size (or data set) is another cache file.
  small = tiny_config(**{'data.source': 'npz',
                         'data.data_dir': str(tmp_path / 'd.npz')}).data
  digits = sources.load_split(data, 'train')
  np.savez(tmp_path / 'd.npz', train_images=digits.images[:200],
           train_labels=digits.labels[:200],
           test_images=digits.images[200:260],
           test_labels=digits.labels[200:260])
  calls = []
  real_train = classifier._train

  def counting_train(*args, **kwargs):
    calls.append(1)
    return real_train(*args, **kwargs)

  with mock.patch.object(classifier, '_train', counting_train):
    other = classifier.load_or_train(small, cache_dir=cache, steps=20)
    assert calls == [1] and other.fingerprint != net.fingerprint
    # A sidecar claiming another identity, or bytes that fail the checksum:
    # retrained, and the cache rewritten.
    with open(f'{path}.json') as f:
      meta = json.load(f)
    meta['identity']['image_size'] = 16
    with open(f'{path}.json', 'w') as f:
      json.dump(meta, f)
    classifier.load_or_train(data, cache_dir=cache, steps=STEPS)
    assert calls == [1, 1]
    with open(f'{path}.msgpack', 'r+b') as f:
      f.seek(100)
      f.write(b'\x00\x01\x02')
    again = classifier.load_or_train(data, cache_dir=cache, steps=STEPS)
    assert calls == [1, 1, 1] and again.fingerprint == net.fingerprint


def test_data_without_labels_gets_a_clear_error(tmp_path):
  images = sources.load_split(tiny_config().data, 'train').images
  np.savez(tmp_path / 'u.npz', train_images=images[:50],
           test_images=images[50:80])
  data = tiny_config(**{'data.source': 'npz',
                        'data.data_dir': str(tmp_path / 'u.npz')}).data
  with pytest.raises(sources.DataError,
                     match=r"no class labels.*sample_quality\.network="
                           r"'inception'"):
    classifier.load_or_train(data, cache_dir=str(tmp_path), steps=5)


def test_frechet_distance_is_the_gaussian_closed_form():
  rng = np.random.default_rng(0)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  a1, a2 = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
  # Diagonal (commuting) covariances: |mu1 - mu2|^2 + sum (s1 - s2)^2.
  want = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a1) - np.sqrt(a2))**2)
  got = distances.frechet_distance(mu1, np.diag(a1), mu2, np.diag(a2))
  assert got == pytest.approx(want, rel=1e-10)
  # General covariances: the W2^2 formula with scipy's sqrtm of
  # S2^1/2 S1 S2^1/2 (symmetric form, Dowson & Landau 1982).
  m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
  r2 = scipy.linalg.sqrtm(s2).real
  want = np.sum((mu1 - mu2)**2) + np.trace(
      s1 + s2 - 2 * scipy.linalg.sqrtm(r2 @ s1 @ r2).real)
  assert distances.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
      want, rel=1e-8)
  # Streamed statistics of Gaussian draws converge to the closed form.
  x = rng.multivariate_normal(mu1, s1, size=200_000)
  stats = feature_stats.FeatureStats(d)
  for chunk in np.array_split(x, 37):
    stats.update(chunk)
  np.testing.assert_allclose(stats.mu, mu1, atol=0.03)
  assert distances.frechet_distance(mu1, s1, stats.mu, stats.sigma) < 0.01


def _image_batches(images_u8, mesh, batch_size):
  def batch(i):
    x = images_u8[i * batch_size:(i + 1) * batch_size]
    x = np.concatenate([x, np.zeros_like(x[:batch_size - len(x)])])  # surplus
    return jax.device_put(x.astype(np.float32) / 127.5 - 1.0,
                          parallel.batch_sharded(mesh))
  return batch


@pytest.mark.filterwarnings('ignore:KID')
def test_scores_order_real_digits_noise_and_the_floor(digits_classifier,
                                                      tmp_path):
  """The eval split scored against itself is 0; training digits land at
  the real-vs-real floor; noise is far above it."""
  net, _ = digits_classifier
  data = tiny_config().data
  mesh = parallel.create_mesh()
  test = sources.load_split(data, 'test').images
  train = sources.load_split(data, 'train').images
  noise = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1),
                                            np.uint8)
  kwargs = dict(data_config=data, mesh=mesh, batch_size=40, network=net,
                reference='eval', cache_dir=str(tmp_path), kid_subsets=10)
  scores = {}
  for name, images in (('test', test), ('train', train[:200]),
                       ('noise', noise)):
    scores[name] = sample_quality.compute_sample_quality(
        _image_batches(images, mesh, 40), num_samples=len(images),
        floor_seeds=2 if name == 'train' else 0, **kwargs)
  assert abs(scores['test']['fd']) < 1e-4  # float32 features of ~1e2
  train = scores['train']
  assert train['floor_num_images'] == 200 and train['floor_seeds'] == 2
  # 200 of the 1,497 training digits vs 200 others: within the spread.
  assert abs(train['fd'] - train['floor_fd_mean']) < max(
      4 * train['floor_fd_std'], 0.3 * train['floor_fd_mean'])
  assert scores['noise']['fd'] > 10 * train['floor_fd_mean']
  assert scores['noise']['is_mean'] < train['is_mean'] - 2
  assert sample_quality.scalar_summaries(train) == {
      'sample_quality/classifier_fd': train['fd'],
      'sample_quality/classifier_is_mean': train['is_mean'],
      'sample_quality/classifier_kid_mean': train['kid_mean'],
      'sample_quality/classifier_fd_floor': train['floor_fd_mean'],
      'sample_quality/classifier_kid_mean_floor': train['floor_kid_mean']}
  # A floor passed back in is reused as is (the trainer computes it once per
  # run), even with floor_seeds asking for a new one.
  floor = sample_quality.floor_entries(train)
  assert set(floor) == {'floor_fd_mean', 'floor_fd_std', 'floor_kid_mean',
                        'floor_seeds', 'floor_num_images'}
  fake = dict(floor, floor_fd_mean=-1.0)
  again = sample_quality.compute_sample_quality(
      _image_batches(noise, mesh, 40), num_samples=len(noise), floor_seeds=2,
      floor=fake, **kwargs)
  assert again['floor_fd_mean'] == -1.0
  assert again['fd'] == pytest.approx(scores['noise']['fd'], rel=1e-5)
  assert sample_quality.floor_entries(scores['noise']) is None


@pytest.mark.filterwarnings('ignore:KID')
def test_eval_mode_reports_the_classifier_distance_and_floor(tmp_path):
  from tests.test_likelihood import write_checkpoint  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{'sample_quality.num_samples': 16,
                          'sample_quality.floor_seeds': 2})
  write_checkpoint(config, str(tmp_path), 2)
  real = classifier.load_or_train
  with mock.patch.object(classifier, 'load_or_train',
                         lambda d, **kw: real(d, **dict(kw, steps=20))):
    metrics = run_eval(config, str(tmp_path))
  quality = metrics['sample_quality']
  assert quality['network'] == 'classifier' and 'fid' not in quality
  assert quality['num_samples'] == 16 and quality['fd'] > 0
  assert quality['floor_seeds'] == 2 and quality['floor_fd_mean'] > 0
  assert os.path.isdir(tmp_path / 'fid_stats')
