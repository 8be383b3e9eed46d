"""Imported DiT + VAE weights alone -> class-conditional samples (issue 14).

A tiny random diffusers DiTTransformer2DModel (2 blocks, hidden 64, 8x8x4
latents, learned sigma, 10 classes) and a tiny diffusers AutoencoderKL
(f = 2) are saved with save_pretrained; the import command
(convert/diffusers_cli.py) turns them into a run directory under
configs/imagenet256_dit_xl2.py shrunk to them, and sample mode draws 16x16
images with DDPM (respaced, learned variance) and guidance, with no latent
cache anywhere. Skips without torch / diffusers / safetensors.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('safetensors')
diffusers = pytest.importorskip('diffusers')

# pylint: disable=g-import-not-at-top,wrong-import-position
import torch

from configs import imagenet256_dit_xl2
from diffusion_jax import experiment, generate, methods, parallel
from diffusion_jax.convert import diffusers_cli, diffusers_dit
from diffusion_jax.latent import autoencoder_source, store
from tests.compile_flags import FAST_COMPILE
from tests.test_dit import RELEASED_256, _perturbed_dit
from tests.util import run_sample
# pylint: enable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIT = {**{k: v for k, v in RELEASED_256.items() if not k.startswith('_')},
       'num_layers': 2, 'num_attention_heads': 2, 'attention_head_dim': 32,
       'sample_size': 8, 'num_embeds_ada_norm': 10}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=['DownEncoderBlock2D'] * 2,
           up_block_types=['UpDecoderBlock2D'] * 2,
           block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4,
           scaling_factor=0.25)
# The paper config, shrunk to the tiny DiT: its process and sampler (DDPM
# with learned variance, respaced to 3 of T = 1000 steps; guidance 0.5).
OVERRIDES = {
    'data.image_size': 16, 'model.dit_variant': 'custom',
    'model.dit_depth': 2, 'model.dit_hidden_size': 64,
    'model.dit_num_heads': 2, 'model.num_classes': 10,
    'sample.num_steps': 3, 'sample.num_images': 4, 'sample.batch_size': 4,
    'sample.class_label': 7}


def _config(vae_dir, data_dir, **extra):
  config = imagenet256_dit_xl2.get_config()
  config.update_from_flattened_dict({
      **OVERRIDES, 'latent.autoencoder': vae_dir, 'data.data_dir': data_dir,
      **extra})
  return config


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """The DiT (as a pipeline root: transformer/) and VAE directories, and
  a run directory imported from them by the command line."""
  root = tmp_path_factory.mktemp('released')
  dit = _perturbed_dit(DIT)
  dit.save_pretrained(str(root / 'DiT' / 'transformer'))
  torch.manual_seed(0)
  diffusers.AutoencoderKL(**VAE).save_pretrained(str(root / 'vae'))
  workdir = root / 'run'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3',
         'XLA_FLAGS': FAST_COMPILE}
  cmd = [sys.executable, '-m', 'diffusion_jax.convert.diffusers_cli',
         f'--src={root / "DiT"}', '--config=configs/imagenet256_dit_xl2.py',
         f'--config.latent.autoencoder={root / "vae"}',
         *[f'--config.{k}={v}' for k, v in OVERRIDES.items()],
         f'--workdir={workdir}']
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return dict(dit=dit, dit_dir=str(root / 'DiT'), vae_dir=str(root / 'vae'),
              workdir=str(workdir), stdout=out.stdout,
              no_cache=str(root / 'no_latent_cache'))


def _mesh():
  return parallel.create_mesh(jax.devices()[:1])


def test_import_then_sample_without_any_data(released):
  """The printed sample command's config restores the imported weights
  bitwise, and sample mode writes 16x16 RGB images, the same twice."""
  assert ('--mode=sample' in released['stdout'] and
          '--config.model.dit_depth=2' in released['stdout'])
  config = _config(released['vae_dir'], released['no_cache'])
  assert not os.path.exists(released['no_cache'])
  exp = experiment.build(config, _mesh(), mode='sample')
  assert exp.method.scale == 0.25  # the VAE's scaling_factor
  # The paper config's sampler, respaced from 250 to 3 steps; both guided
  # halves (w = 0.5) per call.
  settings = exp.method.sample_settings
  assert (settings.sampler, settings.num_steps, settings.variance) == (
      'ddpm', 3, 'learned')
  assert exp.method.network_calls() == 2 * 3
  params, step = generate.load_sample_params(exp, released['workdir'])
  assert step == 0
  imported, _ = diffusers_dit.import_dit(released['dit_dir'])
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(params['network']), imported)
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(params['decoder']),
               autoencoder_source.load(released['vae_dir']).decoder_params())

  out = run_sample(config, released['workdir'], _mesh())
  first = np.load(os.path.join(out, 'samples.npz'))['images']
  assert first.shape == (4, 16, 16, 3) and first.dtype == np.uint8
  assert first.std() > 0 and os.path.exists(os.path.join(out, 'samples.png'))
  again = np.load(os.path.join(run_sample(config, released['workdir'],
                                          _mesh()), 'samples.npz'))['images']
  np.testing.assert_array_equal(again, first)


def test_the_restored_denoiser_is_diffusers_forward(released):
  """One network evaluation of the method, as the sampler calls it
  (process.model_time(t), labels, learned-sigma channels), equals
  diffusers' on the same input. With diffusers' two conventions
  (dit_time_freq_shift=1, its norm_eps): the config file's are the
  reference code's, which diffusers' port does not reproduce exactly
  (convert/diffusers_dit.py)."""
  config = _config(released['vae_dir'], released['no_cache'], **{
      'model.dit_time_freq_shift': 1, 'model.dit_mlp_norm_eps': 1e-5})
  exp = experiment.build(config, _mesh(), mode='sample')
  params, _ = generate.load_sample_params(exp, released['workdir'])
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
  t, y = np.array([0, 421, 999]), np.array([7, 0, 10])  # 10: the null class
  got = np.asarray(jax.jit(
      lambda p, x: exp.method.network_fn(p, jnp.asarray(y))(x, jnp.asarray(t))
  )(params['network'], x))
  with torch.no_grad():
    want = released['dit'](
        torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
        torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
  assert got.shape == want.shape == (3, 8, 8, 8)
  assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_a_dit_that_disagrees_with_the_config_is_refused_first(
    released, tmp_path):
  """patch 4 in the file, 2 in the config: the key is named and nothing is
  written."""
  dit = diffusers.DiTTransformer2DModel.from_config({**DIT, 'patch_size': 4})
  dit.save_pretrained(str(tmp_path / 'dit4'))
  workdir = tmp_path / 'run'
  config = _config(released['vae_dir'], released['no_cache'])
  with pytest.raises(ValueError, match=r'config\.model\.patch_size=2 \(use '
                     r'--config\.model\.patch_size=4\)'):
    diffusers_cli.convert_dit_to_workdir(str(tmp_path / 'dit4'),
                                         str(workdir), config)
  assert not workdir.exists()
  # The learned variance is the loss's: an mse config is refused by name.
  config = _config(released['vae_dir'], released['no_cache'], **{
      'diffusion.loss': 'mse', 'diffusion.sampler_variance': 'beta'})
  with pytest.raises(ValueError, match=r"config\.diffusion\.loss='mse' \(use "
                     r'--config\.diffusion\.loss=hybrid'):
    diffusers_cli.convert_dit_to_workdir(released['dit_dir'], str(workdir),
                                         config)
  assert not workdir.exists()
  # Into an existing run: refused.
  with pytest.raises(ValueError, match='already holds checkpoints'):
    diffusers_cli.convert_dit_to_workdir(
        released['dit_dir'], released['workdir'],
        _config(released['vae_dir'], released['no_cache']))


def test_training_without_the_cache_still_names_it(released):
  """Only sampling goes without the cache: init refuses before compiling."""
  config = _config(released['vae_dir'], released['no_cache'])
  exp = experiment.build(config, _mesh(), mode='train')
  with pytest.raises(store.LatentCacheError,
                     match='config.data.data_dir=.*cache_latents'):
    exp.init_state()
  assert methods.create_method(config).missing_cache is not None


@pytest.mark.parametrize('change, match', [
    ({}, None),
    ({'patch_size': 4}, r'config\.model\.patch_size=2 \(use '
     r'--config\.model\.patch_size=4\)'),
    ({'num_embeds_ada_norm': 10}, r'config\.model\.num_classes=1000 \(use '
     r'--config\.model\.num_classes=10\)'),
    ({'num_layers': 12}, r"config\.model\.dit_variant='XL' \(use --config"
     r'\.model\.dit_variant=custom --config\.model\.dit_depth=12'),
    ({'sample_size': 64}, r'config\.data\.image_size=256 \(use --config\.'
     r'data\.image_size=512: the network takes 64x64x4 .* this config gives '
     r'32x32x4 through the f=8 autoencoder'),
    ({'out_channels': 4}, r"config\.diffusion\.loss='hybrid' \(use "
     r'--config\.diffusion\.loss=mse'),
])
def test_the_released_config_json_is_checked_against_the_paper_config(
    tmp_path, change, match):
  """facebook/DiT-XL-2-256's config.json fits configs/imagenet256_dit_xl2.py
  as it is (SD's VAE: f = 8, 4 channels); each changed field is named by
  the config key that would have to follow it."""
  vae = tmp_path / 'sd-vae'
  vae.mkdir()
  (vae / 'config.json').write_text(json.dumps({
      '_class_name': 'AutoencoderKL', 'latent_channels': 4,
      'block_out_channels': [128, 256, 512, 512], 'layers_per_block': 2,
      'down_block_types': ['DownEncoderBlock2D'] * 4,
      'up_block_types': ['UpDecoderBlock2D'] * 4, 'norm_num_groups': 32}))
  config = imagenet256_dit_xl2.get_config()
  config.latent.autoencoder = str(vae)
  config.data.data_dir = str(tmp_path / 'no_cache')
  method = methods.create_method(config)  # config files only
  check = lambda: diffusers_cli.check_dit_against_config(
      {**RELEASED_256, **change}, config, method, 'DiT-XL-2-256')
  if match is None:
    check()
  else:
    with pytest.raises(ValueError, match=match):
      check()
