"""Latent diffusion: the latent cache, its checks, and diffusion on latents.

One tiny autoencoder run (a freshly initialised f=2 AutoencoderKL, 4x4x2
latents of the 8x8 digits) and one cache of it are shared by the module.
"""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from configs import default
from diffusion_jax import checkpointing, experiment, methods, parallel
from diffusion_jax.data import pipeline, sources
from diffusion_jax.latent import autoencoder_source, encode, store
from diffusion_jax.methods.latent_diffusion import LatentDiffusion
from diffusion_jax.models import autoencoder as autoencoder_lib
from util import run_sample, run_train, tiny_config


def _autoencoder_run(workdir, seed: int) -> str:
  """An autoencoder run directory (config.json, checkpoint 1) of a tiny
  AutoencoderKL (f = 2, C = 2) with random N(0, 0.2) weights (drawn in
  numpy: nothing to compile)."""
  config = default.get_config()
  config.method = 'autoencoder'
  config.seed = seed
  ae = config.autoencoder
  ae.block_out_channels, ae.latent_channels = (8, 8), 2
  ae.norm_num_groups, ae.disc_ch = 4, 8
  experiment.write_config(config, str(workdir))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(
      lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype)
      if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype),
      methods.create_method(config).abstract_init())
  ckpt = checkpointing.Checkpointer(str(workdir / 'checkpoints'))
  ckpt.save(1, state, {'step': 1})
  ckpt.wait_until_finished()
  ckpt.close()
  return str(workdir)


def _latent_config(ae_dir, cache_dir, **overrides):
  config = tiny_config(**{
      'latent.autoencoder': ae_dir, 'latent.cache_dtype': 'float32',
      'data.source': 'latents', 'data.data_dir': str(cache_dir),
      'data.random_flip': True, 'diffusion.clip_denoised': False,
      'eval.batch_size': 96})
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('latents')
  ae_dir = _autoencoder_run(root / 'ae', seed=0)
  config = _latent_config(ae_dir, root / 'cache')
  assert encode.cache_latents(config)
  return {'root': root, 'ae': ae_dir, 'cache': str(root / 'cache'),
          'config': config}


def _digits(split):
  cfg = default.get_config().data
  return sources.load_split(cfg, split)


def test_cache_rows_equal_a_direct_encode(runs):
  manifest = store.read_manifest(runs['cache'])
  assert manifest['latent_shape'] == [4, 4, 2]
  assert manifest['image_shape'] == [8, 8, 1]
  assert manifest['variants'] == 2 and manifest['dtype'] == 'float32'
  assert {k: v['count'] for k, v in manifest['splits'].items()} == {
      'train': 1497, 'test': 300}
  ae = autoencoder_source.load(runs['ae'])
  assert manifest['autoencoder'] == ae.identity()
  encode_fn = jax.jit(lambda x: ae.info.model().apply(
      {'params': ae.params}, x, method=autoencoder_lib.AutoencoderKL.encode))
  for split, rows in (('train', [0, 1, 95, 96, 1000, 1496]),
                      ('test', [0, 299])):
    data = _digits(split)
    cached = store.LatentSplit(runs['cache'], split)
    x = data.images[rows].astype(np.float32) / 127.5 - 1.0
    for variant, images in enumerate((x, x[:, :, ::-1])):
      mean, logvar = map(np.asarray, encode_fn(images))
      got = np.stack([cached.row(i)[0][variant] for i in rows])
      np.testing.assert_allclose(got[:, 0], mean, atol=1e-5)
      np.testing.assert_allclose(got[:, 1], logvar, atol=1e-5)
    assert [cached.row(i)[1] for i in rows] == list(data.labels[rows])
  # Scale: 1/std of z ~ q(z|x) over the train split, both variants.
  train = store.LatentSplit(runs['cache'], 'train')
  moments = np.stack([train[i] for i in range(len(train))])
  mean, var = moments[:, :, 0], np.exp(moments[:, :, 1])
  std = np.sqrt(np.mean(mean ** 2 + var) - np.mean(mean) ** 2)
  np.testing.assert_allclose(manifest['scale_factor'], 1 / std, rtol=1e-4)
  # The training pipeline serves (moments of one variant, labels); the
  # eval pipeline and open_split serve the images the cache encoded.
  it = pipeline.create_train_iterator(
      runs['config'].data, global_batch_size=16, seed=0, sharding=None,
      with_labels=True, num_classes=10)
  moments, labels = next(it)
  assert moments.shape == (16, 2, 4, 4, 2) and labels.shape == (16,)
  pixels = sources.open_split(runs['config'].data, 'test')
  np.testing.assert_array_equal(pixels[5], _digits('test').images[5])


def test_rerun_is_a_no_op_and_other_settings_are_not_overwritten(
    runs, caplog):
  with caplog.at_level(logging.INFO):
    assert not encode.cache_latents(runs['config'])
  assert 'nothing to do' in caplog.text
  other = _latent_config(runs['ae'], runs['cache'],
                         **{'latent.cache_dtype': 'float16'})
  with pytest.raises(store.LatentCacheError, match='dtype'):
    encode.cache_latents(other)


def test_an_interrupted_encode_is_never_read_as_complete(runs, monkeypatch):
  cache = str(runs['root'] / 'interrupted')
  config = _latent_config(runs['ae'], cache, **{
      'latent.cache_dtype': 'float16', 'data.random_flip': False})
  write = encode._SplitWriter.write  # pylint: disable=protected-access
  calls = []

  def failing_write(self, *args):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt('stopped mid-way')
    return write(self, *args)

  monkeypatch.setattr(encode._SplitWriter, 'write', failing_write)  # pylint: disable=protected-access
  with pytest.raises(KeyboardInterrupt):
    encode.cache_latents(config)
  assert not os.path.exists(cache)
  assert os.path.isdir(cache + store.PARTIAL_SUFFIX)
  with pytest.raises(store.LatentCacheError, match='interrupted encode'):
    experiment.build(config, parallel.create_mesh())
  monkeypatch.setattr(encode._SplitWriter, 'write', write)  # pylint: disable=protected-access
  assert encode.cache_latents(config)  # starts over
  assert not os.path.exists(cache + store.PARTIAL_SUFFIX)
  manifest = store.read_manifest(cache)
  assert (manifest['dtype'], manifest['variants']) == ('float16', 1)
  row = store.LatentSplit(cache, 'train').row(7)[0]
  full = store.LatentSplit(runs['cache'], 'train').row(7)[0]
  np.testing.assert_allclose(row[0], full[0], atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize('overrides, match', [
    ({'data.image_size': 16}, 'config.data.image_size=8'),
    ({'latent.scale_factor': 0.5}, 'config.latent.scale_factor=0'),
    ({'latent.images.source': 'idx'}, 'config.latent.images.source'),
    ({'data.train_split': 'test'}, 'config.data.train_split'),
])
def test_a_cache_for_other_settings_is_refused_with_the_key(
    runs, overrides, match):
  config = _latent_config(runs['ae'], runs['cache'], **overrides)
  with pytest.raises(store.LatentCacheError, match=match):
    experiment.build(config, parallel.create_mesh())


def test_a_cache_of_another_autoencoder_is_refused(runs, tmp_path):
  other = _autoencoder_run(tmp_path / 'other_ae', seed=1)
  config = _latent_config(other, runs['cache'])
  with pytest.raises(store.LatentCacheError,
                     match='another autoencoder.*config.latent.autoencoder'):
    experiment.build(config, parallel.create_mesh())
  # Same path and config, other weights: refused where they are read.
  cache = tmp_path / 'cache'
  shutil.copytree(runs['cache'], cache)
  manifest = json.loads((cache / store.MANIFEST).read_text())
  manifest['autoencoder']['params_sha256'] = '0' * 64
  (cache / store.MANIFEST).write_text(json.dumps(manifest))
  exp = experiment.build(_latent_config(runs['ae'], cache),
                         parallel.create_mesh())
  with pytest.raises(store.LatentCacheError,
                     match='other parameters.*config.latent.autoencoder'):
    exp.init_state()


def test_config_checks_name_the_latent_keys(runs):
  from diffusion_jax import config_checks, errors  # pylint: disable=g-import-not-at-top
  for overrides, match in (
      ({'diffusion.clip_denoised': True}, 'config.diffusion.clip_denoised'),
      ({'latent.autoencoder': ''}, 'config.latent.autoencoder'),
      ({'data.source': 'digits'}, "data.source='latents'")):
    with pytest.raises(errors.ConfigError, match=match):
      config_checks.check(_latent_config(runs['ae'], runs['cache'],
                                         **overrides))


def test_rows_of_a_two_process_cache_are_read_in_global_order(tmp_path):
  """5 rows, global batch 4 over 2 processes (2 rows each per batch, the
  last batch padded): process 0 wrote rows 0, 1, 4, pad; process 1 rows
  2, 3, pad, pad."""
  written = {0: [0, 1, 4, -1], 1: [2, 3, -1, -1]}
  for p, rows in written.items():
    mean = np.asarray(rows, np.float32).reshape(4, 1, 1, 1, 1)
    np.save(tmp_path / store.file_name('train', 'mean', p), mean)
    np.save(tmp_path / store.file_name('train', 'logvar', p), -mean)
  manifest = {'splits': {'train': {'count': 5, 'labels': False}},
              'variants': 1, 'batch_size': 4, 'num_processes': 2}
  split = store.LatentSplit(str(tmp_path), 'train', manifest)
  assert len(split) == 5 and split.row(0)[1] is None
  moments = np.stack([split[i][0, :, 0, 0, 0] for i in range(5)])
  np.testing.assert_array_equal(moments.T, [[0, 1, 2, 3, 4],
                                            [0, -1, -2, -3, -4]])
  with pytest.raises(IndexError):
    split.row(5)


def test_pad_and_center_crop_make_the_configured_size():
  cfg = default.get_config().data
  cfg.unlock()
  cfg.image_size, cfg.resize = 12, 'pad'
  padded = sources.open_split(cfg, 'test')[3]
  assert padded.shape == (12, 12, 1) and not padded[:2].any()
  np.testing.assert_array_equal(padded[2:10, 2:10], _digits('test').images[3])
  cfg.image_size, cfg.resize = 4, 'center_crop'
  assert sources.open_split(cfg, 'test')[3].shape == (4, 4, 1)


def _mesh():
  """One device: training on latents is mesh-agnostic code (the cache above
  is encoded over all 8), and one device compiles several times faster."""
  return parallel.create_mesh(jax.devices()[:1])


@pytest.fixture
def encoder_guard(monkeypatch):
  """Fails if the encoder runs inside a train step (it still runs where
  abstract shapes are derived, outside the step); yields its call count."""
  tracing, calls = [], []
  step, encoder = LatentDiffusion.train_step, autoencoder_lib.Encoder.__call__

  def traced_step(self, state, batch):
    tracing.append(True)
    try:
      return step(self, state, batch)
    finally:
      tracing.pop()

  def guarded_encoder(self, x):
    assert not tracing, 'the encoder ran inside the train step'
    calls.append(True)
    return encoder(self, x)

  monkeypatch.setattr(LatentDiffusion, 'train_step', traced_step)
  monkeypatch.setattr(autoencoder_lib.Encoder, '__call__', guarded_encoder)
  yield calls
  assert calls  # the guard was live


def test_latent_unet_trains_and_resumes_exactly(runs, tmp_path,
                                                encoder_guard):
  """A U-Net on the posterior means: 2 + 2 steps == 4 steps, bitwise."""
  del encoder_guard
  config = _latent_config(runs['ae'], runs['cache'], **{
      'latent.sample_posterior': False, 'model.ch_mult': (1,),
      'model.attn_resolutions': ()})
  full = jax.device_get(run_train(config, str(tmp_path / 'full'), _mesh()))
  # The 4-step run's step-2 checkpoint, trained on to step 4 (a 2-step
  # run's: nothing before step 4 depends on where the run ends).
  workdir = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'full' / 'checkpoints' / '2',
                  workdir / 'checkpoints' / '2')
  resumed = jax.device_get(run_train(config, str(workdir), _mesh()))
  assert int(resumed.step) == int(full.step) == 4
  jax.tree.map(np.testing.assert_array_equal, resumed, full)
  # The frozen decoder is the autoencoder's, untouched by the steps.
  decoder = autoencoder_source.load(runs['ae']).decoder_params()
  jax.tree.map(np.testing.assert_array_equal,
               full.loss_history['decoder'], decoder)


def test_latent_dit_trains_and_samples_decoded_pixels(runs, tmp_path,
                                                      encoder_guard):
  """A class-conditional DiT with learned variance and guidance (DiT's
  recipe) on posterior samples; sample mode writes 8x8 digits."""
  del encoder_guard
  config = _latent_config(runs['ae'], runs['cache'], **{
      'model.name': 'dit', 'model.dit_variant': 'custom',
      'model.dit_depth': 2, 'model.dit_hidden_size': 32,
      'model.dit_num_heads': 2, 'model.patch_size': 2,
      'model.num_classes': 10, 'diffusion.loss': 'hybrid',
      'diffusion.sampler_variance': 'learned', 'sample.guidance_scale': 0.5,
      'num_train_steps': 2})
  workdir = str(tmp_path / 'run')
  state = run_train(config, workdir, _mesh())
  assert int(state.step) == 2 and set(state.loss_history) == {'decoder'}
  exp = experiment.build(config, _mesh(), mode='sample')
  assert exp.method.image_shape == (4, 4, 2)
  assert exp.method.noise_shape(3) == (3, 4, 4, 2)
  assert exp.method.pixel_shape == (8, 8, 1)
  out = run_sample(config, workdir, _mesh())
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
  assert os.path.exists(os.path.join(out, 'samples.png'))


def _sd_vae_dir(path) -> str:
  """A diffusers AutoencoderKL directory with Stable Diffusion's VAE config
  (no weights: building reads config files only)."""
  path.mkdir()
  (path / 'config.json').write_text(json.dumps({
      '_class_name': 'AutoencoderKL', 'in_channels': 3, 'out_channels': 3,
      'down_block_types': ['DownEncoderBlock2D'] * 4,
      'up_block_types': ['UpDecoderBlock2D'] * 4,
      'block_out_channels': [128, 256, 512, 512], 'layers_per_block': 2,
      'act_fn': 'silu', 'latent_channels': 4, 'norm_num_groups': 32,
      'sample_size': 512, 'scaling_factor': 0.18215}))
  return str(path)


def test_imagenet_dit_xl2_config_builds_with_the_papers_sizes(tmp_path):
  from configs import imagenet256_dit_xl2  # pylint: disable=g-import-not-at-top
  config = imagenet256_dit_xl2.get_config()
  config.latent.autoencoder = _sd_vae_dir(tmp_path / 'sd-vae')
  config.data.data_dir = str(tmp_path / 'latents')
  info = autoencoder_source.describe(config.latent.autoencoder)
  os.makedirs(config.data.data_dir)
  manifest = {
      'format': store.FORMAT, 'version': store.VERSION,
      'autoencoder': {**info.identity(), 'params_sha256': ''},
      'data': store.data_identity(store.pixel_data_config(config)),
      'dtype': 'float16', 'variants': 2, 'latent_shape': [32, 32, 4],
      'image_shape': [256, 256, 3], 'scale_factor': 0.18215,
      'scale_source': 'the diffusers scaling_factor',
      'splits': {'train': {'count': 1281167, 'labels': True},
                 'validation': {'count': 50000, 'labels': True}},
      'batch_size': 256, 'num_processes': 1}
  with open(os.path.join(config.data.data_dir, store.MANIFEST), 'w') as f:
    json.dump(manifest, f)
  for mode in ('train', 'sample', 'eval'):
    exp = experiment.build(config, parallel.create_mesh(), mode=mode)
  method = exp.method
  assert method.image_shape == (32, 32, 4) and method.scale == 0.18215
  assert method.pixel_shape == (256, 256, 3)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  state = method.abstract_init()
  # DiT-XL/2 with learned sigma: the reference's 675,129,632 less its
  # fixed position embedding, 256 x 1152 (tests/test_dit.py).
  assert count(state.params) == 675_129_632 - 294_912
  assert count(state.loss_history['decoder']) == 49_490_199  # SD's decoder
  assert method.network_calls() == 2 * 250
  assert (config.batch_size, config.optim.learning_rate,
          config.optim.ema_decay) == (256, 1e-4, 0.9999)


@pytest.mark.parametrize('name', ['digits_latent', 'fashion_mnist_latent'])
def test_latent_configs_pass_the_checks(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from diffusion_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.check(config)
  assert config.data.source == 'latents' and config.latent.autoencoder
