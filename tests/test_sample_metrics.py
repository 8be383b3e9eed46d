"""FID / IS / KID: the math against independent formulas, the FID Inception's
shape and size, sharding, the statistics files, and one end-to-end run.

No Inception weights exist offline, so network tests use random weights at a
small input size; `test_matches_pytorch_fid` compares against pytorch-fid
itself where it is installed (see requirements-fid.txt).
"""

import importlib.util
import json
import os
from unittest import mock

if importlib.util.find_spec('pytorch_fid'):
  # torchvision segfaults when imported after tensorflow (which
  # diffusion_jax.train pulls in through clu); torch first is fine.
  import pytorch_fid.inception  # pylint: disable=g-import-not-at-top,unused-import

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax import parallel
from diffusion_jax.data import pipeline
from diffusion_jax.data import sources
from diffusion_jax.metrics import distances
from diffusion_jax.metrics import feature_stats
from diffusion_jax.metrics import inception
from diffusion_jax.metrics import networks
from diffusion_jax.metrics import sample_quality
from tests.util import run_eval, run_train, tiny_config

SMALL = inception.MIN_INPUT_SIZE  # 75: the cheapest input the network takes.


def _random_spd(rng, d, rank=None, jitter=0.0):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d + jitter * np.eye(d)


def _scipy_fid(mu1, s1, mu2, s2):
  """pytorch-fid's formula: scipy sqrtm of s1 s2 with its eps fallback."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(s1)) * 1e-6
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  covmean = covmean.real
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize('rank', [None, 8])  # full rank and near-singular
def test_frechet_distance_matches_scipy_sqrtm(rank):
  rng = np.random.default_rng(0)
  d = 32
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1 = _random_spd(rng, d, rank, jitter=1e-9 if rank else 0.0)
  s2 = _random_spd(rng, d)
  got = distances.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _scipy_fid(mu1, s1, mu2, s2), rtol=1e-6)
  np.testing.assert_allclose(distances.frechet_distance(
      mu1, s1, mu2, s2, sqrt_sigma1=distances.sqrtm_psd(s1)), got,
                             rtol=1e-12)
  # Symmetric in its arguments, as a distance must be.
  np.testing.assert_allclose(
      distances.frechet_distance(mu2, s2, mu1, s1), got, rtol=1e-6)


def test_frechet_distance_of_identical_stats_is_zero():
  rng = np.random.default_rng(1)
  mu, s = rng.normal(size=64), _random_spd(rng, 64, rank=16)
  assert abs(distances.frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)
  with pytest.raises(distances.StatsError, match='dimension'):
    distances.frechet_distance(mu, s, mu[:3], s[:3, :3])


def test_inception_score_uniform_is_one_and_one_hot_is_k():
  uniform = np.zeros((100, inception.NUM_CLASSES))
  np.testing.assert_allclose(distances.inception_score(uniform, 1)[0], 1.0)
  k = 7
  one_hot = 100.0 * np.eye(inception.NUM_CLASSES)[np.arange(70) % k]
  mean, std = distances.inception_score(one_hot, splits=1)
  np.testing.assert_allclose(mean, k, rtol=1e-6)
  assert std == 0.0
  mean, std = distances.inception_score(one_hot, splits=10)
  np.testing.assert_allclose(mean, k, rtol=1e-6)


def _mmd2_loops(x, y):
  """The unbiased MMD^2 written out term by term (Gretton et al. 2012)."""
  k = lambda a, b: (a @ b / len(a) + 1.0) ** 3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m ** 2


def test_kid_unbiased_estimator_and_sign():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
  np.testing.assert_allclose(distances.mmd2_unbiased(x, y),
                             _mmd2_loops(x, y), rtol=1e-10)
  # One subset of all rows is a permutation, which MMD^2 ignores.
  mean, std = distances.kid(x, y, subsets=1, subset_size=20)
  np.testing.assert_allclose(mean, _mmd2_loops(x, y), rtol=1e-10)
  assert std == 0.0

  a, b = rng.normal(size=(2, 600, 16))
  same, same_std = distances.kid(a, b, subsets=20, subset_size=300)
  shifted, _ = distances.kid(a, b + 1.0, subsets=20, subset_size=300)
  assert abs(same) < 3 * same_std + 1e-3  # unbiased: ~0, either sign
  assert shifted > 50 * max(abs(same), same_std)
  with pytest.warns(UserWarning, match='subsets of 600'):
    distances.kid(a, b, subsets=1, subset_size=1000)


def test_feature_stats_stream_like_numpy_and_reservoir_is_bounded():
  rng = np.random.default_rng(3)
  feats = rng.normal(3.0, 2.0, size=(1100, 6)).astype(np.float32)
  stats = feature_stats.FeatureStats(6, max_kid_features=20)
  # Uneven batches, across the 512-row blocks of the x^T x update.
  for chunk in np.array_split(feats, [7, 8, 30, 700]):
    stats.update(chunk)
  assert stats.count == 1100
  np.testing.assert_allclose(stats.mu, feats.astype(np.float64).mean(0),
                             rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(feats.astype(np.float64),
                                                 rowvar=False), rtol=1e-10)
  kept = stats.kid_features
  assert kept.shape == (20, 6)
  # Distinct rows, all from the stream, not simply the first 20.
  rows = {r.tobytes() for r in feats}
  assert all(r.tobytes() in rows for r in kept)
  assert len({r.tobytes() for r in kept}) == 20
  assert not np.array_equal(kept, feats[:20])


def test_stats_file_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(4)
  stats = feature_stats.FeatureStats(inception.POOL_DIM, max_kid_features=5)
  stats.update(rng.normal(size=(8, inception.POOL_DIM)).astype(np.float32))
  path = str(tmp_path / 'ref.npz')
  feature_stats.save_stats(path, stats, split='test')
  loaded = feature_stats.load_stats(path)
  np.testing.assert_array_equal(loaded['mu'], stats.mu)
  np.testing.assert_array_equal(loaded['sigma'], stats.sigma)
  np.testing.assert_array_equal(loaded['kid_features'], stats.kid_features)
  assert loaded['num_images'] == 8

  # pytorch-fid's own layout (just mu and sigma) loads too, without KID.
  published = str(tmp_path / 'published.npz')
  np.savez(published, mu=stats.mu, sigma=stats.sigma)
  assert set(feature_stats.load_stats(published)) == {'mu', 'sigma'}

  with pytest.raises(distances.StatsError, match='no statistics file'):
    feature_stats.load_stats(str(tmp_path / 'missing.npz'))
  np.savez(tmp_path / 'nosigma.npz', mu=stats.mu)
  with pytest.raises(distances.StatsError, match=r"lacks \['sigma'\]"):
    feature_stats.load_stats(str(tmp_path / 'nosigma.npz'))
  np.savez(tmp_path / 'pool2.npz', mu=np.zeros(768), sigma=np.eye(768))
  with pytest.raises(distances.StatsError, match=r'\(768,\).*\(2048,\)'):
    feature_stats.load_stats(str(tmp_path / 'pool2.npz'))


def test_network_shapes_and_parameter_count():
  model = inception.FIDInceptionV3()  # 299x299: shapes only, no compute
  variables = inception.abstract_variables()
  pool, logits = jax.eval_shape(
      model.apply, variables, jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32))
  assert pool.shape == (2, inception.POOL_DIM)
  assert logits.shape == (2, inception.NUM_CLASSES)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  # Measured on pytorch-fid 0.3.0's fid_inception_v3(): parameters()
  # 23,850,960; state dict without num_batches_tracked 23,885,392 (the
  # difference is the 34,432 BatchNorm running means and variances).
  assert count(variables['params']) == 23_850_960
  assert count(variables['batch_stats']) == 34_432


def _bilinear_align_corners_false(img, out):
  """torch's F.interpolate(bilinear, align_corners=False), one axis at a time."""
  def axis(x, n_out, ax):
    n_in = x.shape[ax]
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).reshape([-1 if a == ax else 1 for a in range(x.ndim)])
    return np.take(x, lo, ax) * (1 - w) + np.take(x, hi, ax) * w
  return axis(axis(img, out, 1), out, 2)


@pytest.mark.parametrize('size_in,size_out', [(8, 13), (17, 11)])
def test_resize_is_bilinear_half_pixel_without_antialiasing(size_in, size_out):
  img = np.random.default_rng(5).uniform(size=(2, size_in, size_in, 3))
  got = inception.preprocess(jnp.asarray(img, jnp.float32), size_out)
  want = 2 * _bilinear_align_corners_false(img, size_out) - 1
  np.testing.assert_allclose(got, want, atol=1e-5)
  gray = inception.preprocess(jnp.asarray(img[..., :1], jnp.float32), size_out)
  np.testing.assert_allclose(gray, np.repeat(want[..., :1], 3, -1), atol=1e-5)


def _to_torch_layout(variables):
  """Our variables as a pytorch-fid state dict (the converter's inverse)."""
  state = {}
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  for keypath, value in flat:
    collection, *path = [k.key for k in keypath]
    value, prefix = np.asarray(value), '.'.join(path[:-1])
    leaf = path[-1]
    if collection == 'batch_stats':
      state[f'{prefix}.running_{leaf}'] = value
    elif leaf == 'kernel':
      state[f'{prefix}.weight'] = (value.T if value.ndim == 2
                                   else value.transpose(3, 2, 0, 1))
    else:
      state[f'{prefix}.{"weight" if leaf == "scale" else "bias"}'] = value
  return state


@pytest.fixture(scope='module')
def random_inception():
  return inception.random_params(0)


def test_weight_conversion_round_trip_and_errors(random_inception, tmp_path):
  state = _to_torch_layout(random_inception.variables)
  assert len(state) == 566 - 94  # pytorch-fid's keys minus num_batches_tracked
  path = str(tmp_path / 'fid_weights.npz')
  np.savez(path, **state)
  loaded = inception.load_pytorch_fid_weights(path)
  assert not loaded.is_random
  jax.tree.map(np.testing.assert_array_equal, loaded.variables,
               jax.tree.map(np.asarray, random_inception.variables))

  with pytest.raises(inception.WeightsError, match='not found'):
    inception.load_pytorch_fid_weights(str(tmp_path / 'absent.pth'))
  bad = dict(state)
  del bad['Mixed_6b.branch7x7_2.conv.weight']
  with pytest.raises(inception.WeightsError,
                     match=r"lack.*'Mixed_6b\.branch7x7_2\.conv\.weight'"):
    inception.convert_state_dict(bad)
  bad = dict(state, **{'fc.weight': np.zeros((1000, 2048), np.float32)})
  with pytest.raises(inception.WeightsError,
                     match=r"'fc\.weight' has shape \(1000, 2048\).*"
                           r"\(1008, 2048\)"):
    inception.convert_state_dict(bad)


def test_features_on_eight_devices_equal_one_device(random_inception):
  """...and non-finite samples are flagged, NaN scored as mid-grey (0) and
  +inf as white (1), as sample mode saves them."""
  assert jax.device_count() == 8
  images = np.random.default_rng(6).uniform(-1, 1, (8, 8, 8, 1)).astype(
      np.float32)
  clean = images.copy()
  images[3, 2, 2, 0], clean[3, 2, 2, 0] = np.nan, 0.0
  images[5, 0, 0, 0], clean[5, 0, 0, 0] = np.inf, 1.0
  outs = []
  for devices, batch in ((jax.devices()[:1], images), (jax.devices(), images),
                         (jax.devices(), clean)):
    mesh = parallel.create_mesh(devices)
    fn = sample_quality.make_feature_fn(
        mesh, networks.inception_network(random_inception, SMALL).features)
    variables = sample_quality.replicate(random_inception, mesh)
    out = fn(variables, jax.device_put(batch, parallel.batch_sharded(mesh)))
    outs.append({k: parallel.gather(v) for k, v in out.items()})
  for k in ('pool', 'logits_unbiased'):
    assert np.all(np.isfinite(outs[0][k])), k
    for other in outs[1:]:
      np.testing.assert_allclose(other[k], outs[0][k], rtol=1e-5, atol=1e-6)
  want = np.isin(np.arange(8), [3, 5])
  np.testing.assert_array_equal(outs[0]['nonfinite'], want)
  np.testing.assert_array_equal(outs[1]['nonfinite'], want)
  assert not outs[2]['nonfinite'].any()
  assert outs[0]['pool'].shape == (8, inception.POOL_DIM)
  assert outs[0]['logits_unbiased'].shape == (8, inception.NUM_CLASSES)
  assert np.std(outs[0]['pool']) > 1e-3  # random features are not degenerate
  # The count covers only the images kept (num=5: sample 3, not 5).
  stats = sample_quality.accumulate_features(
      feature_stats.FeatureStats(inception.POOL_DIM), fn, variables,
      [(jax.device_put(images, parallel.batch_sharded(mesh)), None)], num=5)
  assert (stats.count, stats.num_nonfinite) == (5, 1)


def _fixed_sample_batch(mesh, batch_size: int, calls: list):
  """Batch i of stand-in samples: fixed uniform images in [-1, 1], sharded
  like a sampler's output (the evaluator never sees a model); records i."""
  make = jax.jit(lambda i: jax.random.uniform(
      jax.random.fold_in(jax.random.key(0), i), (batch_size, 8, 8, 1),
      minval=-1.0, maxval=1.0), out_shardings=parallel.batch_sharded(mesh))

  def sample_batch(i):
    calls.append(i)
    return make(i)

  return sample_batch


def test_compute_sample_quality_end_to_end(random_inception, tmp_path):
  # Sample batch 8; a 24-image eval split keeps the reference pass short
  # (digits' own test split is 300 images).
  digits = sources.load_split(tiny_config().data, 'test').images
  np.savez(tmp_path / 'data.npz', train_images=digits[24:48],
           test_images=digits[:24])
  config = tiny_config(**{'data.source': 'npz',
                          'data.data_dir': str(tmp_path / 'data.npz')})
  mesh = parallel.create_mesh()
  calls = []
  sample_batch = _fixed_sample_batch(mesh, config.sample.batch_size, calls)
  kwargs = dict(data_config=config.data, mesh=mesh,
                batch_size=config.sample.batch_size, num_samples=12,
                network=networks.inception_network(random_inception, SMALL),
                seed=config.seed, reference='eval', kid_subsets=5,
                cache_dir=str(tmp_path / 'fid_stats'))
  with pytest.warns(UserWarning, match='KID: only 12'):
    out = sample_quality.compute_sample_quality(sample_batch, **kwargs)
  assert calls == [0, 1]  # 12 samples in batches of 8
  assert out['fd_vs'] == 'test' and out['num_samples'] == 12
  assert out['reference_num_images'] == 24
  assert out['network'] == 'inception' and out['fid'] == out['fd']
  assert out['network_source'].startswith('random')
  assert not out['comparable_to_published']
  for key in ('fid', 'is_mean', 'is_std', 'kid_mean', 'kid_std'):
    assert np.isfinite(out[key]), key
  assert out['fid'] > 0 and out['is_mean'] >= 1.0
  assert os.path.isfile(out['reference_stats'])
  assert out['reference_stats'].startswith(str(tmp_path / 'fid_stats'))

  # Second call: reference statistics come from the cache, samples are the
  # same (sample_batch is fixed per i), so IS and KID repeat. The FID is
  # stubbed (a 2048-d eigendecomposition takes seconds here): it must be
  # handed the cached square root of the reference covariance.
  with mock.patch.object(pipeline, 'create_eval_iterator',
                         side_effect=AssertionError('cache not used')), \
       mock.patch.object(distances, 'frechet_distance',
                         return_value=2.5) as fid:
    with pytest.warns(UserWarning, match='KID: only 12'):
      again = sample_quality.compute_sample_quality(sample_batch, **kwargs)
  for key in ('is_mean', 'kid_mean'):
    np.testing.assert_allclose(again[key], out[key], rtol=1e-6)
  ref = feature_stats.load_stats(out['reference_stats'])
  np.testing.assert_allclose(fid.call_args.kwargs['sqrt_sigma1'],
                             ref['sqrt_sigma'])
  # A published statistics file (mu/sigma only): FID and IS, no KID.
  published = str(tmp_path / 'published.npz')
  np.savez(published, mu=ref['mu'], sigma=ref['sigma'])
  with mock.patch.object(distances, 'frechet_distance',
                         return_value=1.5) as fid:
    alt = sample_quality.compute_sample_quality(
        sample_batch, **dict(kwargs, reference=published))
  assert alt['fd_vs'] == published and alt['kid_mean'] is None
  assert alt['fid'] == 1.5 and fid.call_args.kwargs['sqrt_sigma1'] is None
  np.testing.assert_array_equal(fid.call_args.args[0], ref['mu'])


def test_matches_pytorch_fid(tmp_path):
  """pytorch-fid's InceptionV3 vs ours, same random weights, same images.

  Runs only where pytorch-fid (with torch and torchvision) is installed:
  `pip install -r requirements-fid.txt`, in a venv of its own (see there).
  """
  pytest.importorskip('pytorch_fid')
  import torch  # pylint: disable=g-import-not-at-top
  import pytorch_fid.inception as pfi  # pylint: disable=g-import-not-at-top

  # pytorch-fid fetches its weights from a URL: build the FID network once
  # with loading disabled to get its state dict layout, randomise it, then
  # build pytorch-fid's InceptionV3 wrapper with that dict as the "download".
  with mock.patch.object(pfi, 'load_state_dict_from_url', return_value=None), \
       mock.patch.object(torch.nn.Module, 'load_state_dict'):
    template = pfi.fid_inception_v3()
  gen = torch.Generator().manual_seed(0)
  state = {}
  for key, value in template.state_dict().items():
    if key.endswith('num_batches_tracked'):
      state[key] = value
    elif key.endswith('running_var') or key.endswith('bn.weight'):
      state[key] = 0.5 + torch.rand(value.shape, generator=gen)
    elif key.endswith('.weight') and value.ndim > 1:
      fan_in = value[0].numel()
      state[key] = torch.randn(value.shape, generator=gen) * (2 / fan_in) ** .5
    else:  # bn bias, running_mean, fc bias
      state[key] = 0.1 * torch.randn(value.shape, generator=gen)
  with mock.patch.object(pfi, 'load_state_dict_from_url', return_value=state):
    reference = pfi.InceptionV3([3], resize_input=True, normalize_input=True,
                                use_fid_inception=True).eval()
  path = str(tmp_path / inception.FID_WEIGHTS_FILE)
  torch.save(state, path)
  ours = inception.load_pytorch_fid_weights(path)

  rng = np.random.default_rng(7)
  model = inception.FIDInceptionV3()
  apply = jax.jit(model.apply)
  for size in (32, 320):  # upsampling (samples) and downsampling to 299
    images = rng.uniform(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      x = torch.from_numpy(images.transpose(0, 3, 1, 2))
      pool_ref = reference(x)[0][:, :, 0, 0]
      logits_ref = torch.nn.functional.linear(pool_ref, state['fc.weight'],
                                              state['fc.bias']).numpy()
    pool, logits = apply(ours.variables, images)
    pool_diff = float(np.abs(np.asarray(pool) - pool_ref.numpy()).max())
    logits_diff = float(np.abs(np.asarray(logits) - logits_ref).max())
    print(f'input {size}x{size}: max |pool diff| {pool_diff:.2e} (pool '
          f'max {float(pool_ref.abs().max()):.3g}), max |logits diff| '
          f'{logits_diff:.2e} (logits max {np.abs(logits_ref).max():.3g})')
    assert pool_diff < 1e-3 and logits_diff < 1e-3


def test_eval_mode_reports_fid_is_kid_and_says_against_what(tmp_path):
  """--mode=eval with config.sample_quality.num_samples: the sample-quality
  block lands in metrics.json next to bits/dim, naming the reference split."""
  from tests.test_likelihood import write_checkpoint  # pylint: disable=g-import-not-at-top
  digits = sources.load_split(tiny_config().data, 'test').images
  np.savez(tmp_path / 'data.npz', train_images=digits[24:48],
           test_images=digits[:24])
  config = tiny_config(**{
      'data.source': 'npz', 'data.data_dir': str(tmp_path / 'data.npz'),
      'sample_quality.num_samples': 8, 'sample_quality.resize_to': SMALL,
      'sample_quality.reference': 'eval', 'sample_quality.floor_seeds': 0,
      'sample_quality.network': 'inception'})
  write_checkpoint(config, str(tmp_path), 2)
  with pytest.warns(UserWarning):
    metrics = run_eval(config, str(tmp_path))
  quality = metrics['sample_quality']
  assert quality['fd_vs'] == 'test' and quality['num_samples'] == 8
  assert quality['network_source'].startswith('random')
  assert np.isfinite(quality['fid']) and quality['fid'] > 0
  with open(tmp_path / 'eval' / 'step_00000002' / 'metrics.json') as f:
    assert json.load(f)['sample_quality']['fid'] == quality['fid']


def test_periodic_fid_during_training_goes_to_tensorboard(tmp_path):
  """config.sample_quality.every_steps: the loop scores its EMA params at
  those steps. compute_sample_quality itself is tested above; here it is
  recorded."""
  calls = []

  def fake(sample_batch, **kwargs):
    calls.append((kwargs['num_samples'], kwargs['network'],
                  callable(sample_batch), kwargs['floor']))
    floor = kwargs['floor'] or {'floor_fd_mean': 1.0 + len(calls),
                                'floor_fd_std': 0.1, 'floor_kid_mean': 0.0}
    return {'fd': 3.0, 'is_mean': 1.5, 'kid_mean': None, 'fd_vs': 'train',
            'num_samples': kwargs['num_samples'], 'network': 'classifier',
            'comparable_to_published': False, **floor}

  network = mock.Mock(kind='classifier')
  config = tiny_config(**{'sample_quality.every_steps': 2,
                          'sample_quality.train_num_samples': 8,
                          'sample_quality.resize_to': SMALL})
  with mock.patch.object(sample_quality, 'compute_sample_quality', fake), \
       mock.patch.object(sample_quality, 'load_network',
                         return_value=network):
    run_train(config, str(tmp_path))
  # steps 2 and 4
  assert [c[:2] for c in calls] == [(8, network), (8, network)]
  # The real-vs-real floor is computed at the first evaluation only and
  # handed to the next (the real images do not change during a run).
  assert calls[0][3] is None
  assert calls[1][3] == {'floor_fd_mean': 2.0, 'floor_fd_std': 0.1,
                         'floor_kid_mean': 0.0}


def test_sliced_wasserstein_against_scipy_and_its_limits():
  import scipy.stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(200, 3)), rng.normal(size=(200, 3)) + 0.5
  got = distances.sliced_wasserstein(x, y, num_projections=16, seed=4)
  dirs = np.random.default_rng(4).normal(size=(3, 16))
  dirs /= np.linalg.norm(dirs, axis=0)
  want = np.mean([scipy.stats.wasserstein_distance(x @ d, y @ d)
                  for d in dirs.T])
  assert got == pytest.approx(want, rel=1e-9)
  assert distances.sliced_wasserstein(x, x) == 0.0
  # A shift by c along a unit vector u moves each projection by c u.d; in
  # 3-D u.d is uniform on [-1, 1] over random directions, so E|2 u.d| = 1.
  shifted = distances.sliced_wasserstein(x, x + [2.0, 0, 0],
                                         num_projections=4000)
  assert shifted == pytest.approx(1.0, rel=0.05)


def test_mmd_rbf_against_the_direct_double_sum():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(7, 2)), rng.normal(size=(5, 2)) + 1.0
  h = 0.8
  k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h * h))
  xx = sum(k(a, b) for i, a in enumerate(x) for j, b in enumerate(x) if i != j)
  yy = sum(k(a, b) for i, a in enumerate(y) for j, b in enumerate(y) if i != j)
  xy = sum(k(a, b) for a in x for b in y)
  want = xx / 42 + yy / 20 - 2 * xy / 35
  assert distances.mmd_rbf(x, y, bandwidth=h) == pytest.approx(want)
  assert distances.mmd_rbf(x, y) > 0  # median-heuristic bandwidth
