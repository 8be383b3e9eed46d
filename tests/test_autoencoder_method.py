"""The autoencoder method against independent math, and through the loop.

The adaptive weight against gradients taken separately with jax.grad; the
GAN losses and the KL against their closed forms; the discriminator frozen
before disc_start (its loss weight is 0, so Adam leaves it bitwise
unchanged); two-optimizer training resumed 2 + 2 equal to 4 straight; eval
mode's MSE/PSNR against numpy on the same reconstructions; bad config
values named.
"""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_checks, experiment, parallel
from diffusion_jax.generate import load_sample_params
from diffusion_jax.methods import autoencoder_losses as losses
from diffusion_jax.models import discriminator as disc_lib
from tests.util import run_eval, run_train, tiny_config

# One level (f = 1): compiling the init (threefry per kernel) and the train
# step dominates this file's time; configs with f = 2 and 4 build below.
TINY = {'method': 'autoencoder', 'autoencoder.block_out_channels': (8,),
        'autoencoder.norm_num_groups': 4, 'autoencoder.latent_channels': 2,
        'autoencoder.disc_ch': 8, 'autoencoder.disc_layers': 1,
        'autoencoder.disc_start': 2, 'autoencoder.disc_learning_rate': 1e-3,
        'autoencoder.perceptual_weight': 0.0, 'optim.grad_clip_norm': 0.0}


def ae_config(**overrides):
  return tiny_config(**{**TINY, **overrides})


def _images(n=8, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype(
      np.float32)


def one_device():
  # One device throughout: every test then shares the compiled init and
  # train step (tests/conftest.py's cache); the trainer's sharding of any
  # state pytree is tested with diffusion's on 8 devices (test_train.py).
  return parallel.create_mesh(jax.devices()[:1])


# ------------------------------------------------------------------ math --


def test_gan_losses_match_their_closed_forms():
  real = np.array([2.0, 0.5, -1.0, 0.2], np.float32)
  fake = np.array([-2.0, 0.3, 1.5, -0.4], np.float32)
  softplus = lambda v: np.log1p(np.exp(v.astype(np.float64)))
  want = {
      'hinge': (0.5 * (np.mean(np.maximum(0, 1 - real))
                       + np.mean(np.maximum(0, 1 + fake))), -np.mean(fake)),
      'non_saturating': (0.5 * (np.mean(softplus(-real))
                                + np.mean(softplus(fake))),
                         np.mean(softplus(-fake))),
  }
  # By hand for the hinge: relu(1 - real) = (0, 0.5, 2, 0.8), relu(1 +
  # fake) = (0, 1.3, 2.5, 0.6): (0.825 + 1.1) / 2.
  np.testing.assert_allclose(want['hinge'][0], 0.9625, rtol=1e-6)
  for kind, (d_loss, g_loss) in want.items():
    np.testing.assert_allclose(losses.discriminator_loss(real, fake, kind),
                               d_loss, rtol=1e-6)
    np.testing.assert_allclose(losses.generator_loss(fake, kind), g_loss,
                               rtol=1e-6)


def test_disc_factor_is_zero_before_disc_start():
  np.testing.assert_array_equal(
      [float(losses.disc_factor(jnp.asarray(s), 2)) for s in range(4)],
      [0, 0, 1, 1])


def test_adaptive_weight_is_clipped_and_guarded():
  rec = jnp.full((3, 3), 2.0)  # norm 6
  np.testing.assert_allclose(losses.adaptive_weight(rec, rec / 3),
                             6 / (2 + 1e-4), rtol=1e-6)
  assert float(losses.adaptive_weight(rec, jnp.zeros((3, 3)))) == 1e4


def _replace_kernel(params, kernel):
  ae = dict(params['autoencoder'])
  ae['decoder'] = {**ae['decoder'], 'conv_out': {
      **ae['decoder']['conv_out'], 'kernel': kernel}}
  return ae


def test_adaptive_weight_kl_and_gradient_match_separate_jax_grads(step_two):
  """lambda = ||d NLL / d G_L|| / (||d L_G / d G_L|| + 1e-4) (Esser et al.
  eq. 7), each gradient by its own jax.grad of the loss written out here
  (the KL in closed form); the update's gradient is that of NLL + kl_w KL
  + lambda' L_G with lambda' = disc_weight lambda = 0.5 lambda held
  constant (its norm is the step's grad_norm)."""
  method, state, images, rng, metrics = step_two
  params, disc = state.params, state.disc_params
  model, d_net = method.model, method.discriminator

  def terms(ae_params, s=params['logvar']):
    rec, mean, logvar = model.apply({'params': ae_params}, images, rng)
    nll = jnp.mean(jnp.sum(jnp.abs(images - rec) / jnp.exp(s) + s,
                           axis=(1, 2, 3)))
    kl = jnp.mean(0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar,
                                axis=(1, 2, 3)))
    return nll, kl, -jnp.mean(d_net.apply({'params': disc}, rec))

  @jax.jit  # one compilation for all the gradients below
  def brute_force(ae_params):
    kernel = ae_params['decoder']['conv_out']['kernel']
    of_kernel = lambda i: lambda k: terms(_replace_kernel(params, k))[i]
    g_nll, g_gan = jax.grad(of_kernel(0))(kernel), jax.grad(of_kernel(2))(
        kernel)
    lam = 0.5 * jnp.clip(jnp.linalg.norm(g_nll) / (
        jnp.linalg.norm(g_gan) + 1e-4), 0, 1e4)
    total = lambda *p: (lambda t: t[0] + 1e-6 * t[1] + lam * t[2])(
        terms(*p))
    return lam, terms(ae_params), jax.grad(total, argnums=(0, 1))(
        ae_params, params['logvar'])

  lam, (nll, kl, g_loss), want = brute_force(params['autoencoder'])
  assert 0 < lam < 0.5e4  # not at a clip bound
  assert metrics['disc_factor'] == 1.0
  np.testing.assert_allclose(metrics['adaptive_weight'], lam, rtol=1e-5)
  np.testing.assert_allclose(
      [metrics['nll'], metrics['kl'], metrics['g_loss']], [nll, kl, g_loss],
      rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], nll + 1e-6 * kl + lam * g_loss,
                             rtol=1e-5)
  # The gradient's norm over the autoencoder and the log-scale s.
  norm = np.sqrt(sum(np.sum(np.square(np.float64(g)))
                     for g in jax.tree.leaves(want)))
  np.testing.assert_allclose(metrics['grad_norm'], norm, rtol=1e-4)


def test_discriminator_output_size_is_the_checked_one():
  for size, layers in ((8, 1), (28, 2), (28, 3), (32, 3)):
    net = disc_lib.PatchDiscriminator(ch=4, num_layers=layers)
    x = jnp.zeros((1, size, size, 1))
    out = jax.eval_shape(lambda: net.apply(net.init(jax.random.key(0), x), x))
    side = disc_lib.output_size(size, layers)
    assert out.shape == (1, side, side, 1) and side >= 1
    assert side == (size >> layers) - 2  # config_checks' arithmetic


# ------------------------------------------------------------- the loop --


def _state_leaves(state):
  return {name: getattr(state, name) for name in (
      'params', 'ema_params', 'opt_state', 'disc_params', 'disc_opt_state')}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """4 steps straight (with sample grids), and 2 then 2 more resumed."""
  root = tmp_path_factory.mktemp('autoencoder')
  config = ae_config(**{'sample_grid.every_steps': 2})
  mesh = one_device()
  full = jax.device_get(run_train(config, str(root / 'a'), mesh))
  half = jax.device_get(run_train(ae_config(num_train_steps=2),
                                  str(root / 'b'), mesh))
  resumed = jax.device_get(run_train(ae_config(), str(root / 'b'), mesh))
  return config, root, full, half, resumed


@pytest.fixture(scope='module')
def step_two(trained):
  """(method, state, batch, rng, metrics) of one train step at step 2
  = disc_start (disc_factor 1) from the trained run's step-2 state, through
  the compiled step the loop runs (taken after the runs, so its trace is
  theirs and conftest's compilation cache serves it); rng is the
  posterior draw's key (methods/autoencoder.py: key(seed) folded with the
  step)."""
  config, _, _, half, _ = trained
  exp = experiment.build(config, one_device())
  images = _images(16)
  # Device arrays, as the loop's: host ones trace differently.
  state = jax.device_put(half, parallel.replicated(exp.mesh))
  _, metrics = exp.jit_train_step()(state, images)
  rng = jax.random.fold_in(jax.random.key(0), 2)
  return exp.method, half, images, rng, jax.device_get(metrics)


def test_resume_two_plus_two_is_bitwise_four_straight(trained):
  _, root, full, _, resumed = trained
  assert int(full.step) == int(resumed.step) == 4
  for name, tree in _state_leaves(full).items():
    jax.tree.map(np.testing.assert_array_equal, _state_leaves(resumed)[name],
                 tree)
  # Both optimizers stepped every step.
  counts = [int(x) for x in jax.tree.leaves(full.opt_state)
            + jax.tree.leaves(full.disc_opt_state) if x.dtype == np.int32]
  assert counts and set(counts) == {4}
  assert sorted(os.listdir(root / 'a' / 'samples')) == [
      'ema_step_00000002.png', 'ema_step_00000004.png']


def test_discriminator_is_frozen_before_disc_start(trained):
  """disc_factor 0 weights its loss: zero gradient, so Adam (m = v = 0)
  leaves the parameters bitwise as initialised for steps 0 and 1; from
  step 2 (disc_start) it trains. The autoencoder trains from step 0."""
  config, _, full, half, _ = trained
  init = jax.device_get(experiment.build(config, one_device()).init_state())
  jax.tree.map(np.testing.assert_array_equal, half.disc_params,
               init.disc_params)
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(half.params, init.params)
  assert changed(full.disc_params, init.disc_params)


def test_eval_writes_mse_and_psnr_of_the_reconstructions(trained):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  config, root, *_ = trained
  workdir = str(root / 'b')
  metrics = run_eval(config, workdir, one_device())
  out = root / 'b' / 'eval' / 'step_00000004'
  assert json.loads((out / 'metrics.json').read_text())['psnr'] == (
      metrics['psnr'])
  # The same reconstructions, recomputed here on one device in one batch.
  exp = experiment.build(config, one_device(), mode='eval')
  params, _ = load_sample_params(exp, workdir)
  batches = [jax.device_get(b) for b in exp.eval_iterator('test')]
  x = np.concatenate([b['images'][b['mask'] > 0] for b in batches])
  rec = np.asarray(jax.jit(exp.method.reconstruct)(params, x, None))
  mse = np.mean(np.square((rec.astype(np.float64) + 1) / 2 - (x + 1) / 2))
  assert metrics['num_images'] == len(x) == 300
  np.testing.assert_allclose(metrics['mse'], mse, rtol=1e-5)
  np.testing.assert_allclose(metrics['psnr'], 10 * np.log10(1.0 / mse),
                             rtol=1e-5)
  assert metrics['psnr'] == pytest.approx(10 * np.log10(1 / metrics['mse']))
  assert 'total_bpd' not in metrics
  figure = np.asarray(Image.open(out / 'reconstructions.png'))
  assert figure.shape[1] > figure.shape[0]  # two 8x8 grids side by side


# ---------------------------------------------------------------- config --


@pytest.mark.parametrize('name, latent', [
    ('digits_autoencoder', (4, 4, 2)), ('fashion_mnist_autoencoder',
                                        (7, 7, 4))])
def test_autoencoder_configs_pass_the_checks_and_build(name, latent):
  config = importlib.import_module(f'configs.{name}').get_config()
  for mode in ('train', 'sample', 'eval'):
    exp = experiment.build(config, parallel.create_mesh(), mode=mode)
  assert exp.method.noise_shape(3) == (3, *latent)


@pytest.mark.parametrize('overrides, match', [
    ({'autoencoder.block_out_channels': (8, 8, 8, 8, 8)},
     r'config.data.image_size=8 is not divisible by the down factor f=16'),
    ({'autoencoder.disc_layers': 2},
     r'config.autoencoder.disc_layers=2 is too deep.*disc_layers <= 1'),
    ({'autoencoder.norm_num_groups': 3},
     r'config.autoencoder.norm_num_groups=3 does not divide'),
    ({'autoencoder.rec_loss': 'l3'}, r"config.autoencoder.rec_loss='l3'"),
    ({'autoencoder.disc_loss': 'wgan'}, r"config.autoencoder.disc_loss="),
    ({'autoencoder.kl_weight': -1.0}, r'config.autoencoder.kl_weight=-1.0'),
    ({'autoencoder.adam_b1': 1.0}, r'config.autoencoder.adam_b1=1.0'),
    ({'autoencoder.disc_ch': 0}, r'config.autoencoder.disc_ch=0'),
    ({'autoencoder.lpips_weights_path': '/w/vgg.pth'},
     r'lpips_weights_path=.*LPIPS perceptual loss.*not available yet'),
    ({'grad_accum_steps': 2}, r'config.grad_accum_steps=2'),
])
def test_bad_autoencoder_values_fail_at_build_with_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiment.build(ae_config(**overrides))


def test_autoencoder_checks_leave_other_methods_alone():
  config = tiny_config(**{'autoencoder.disc_layers': 3})
  config_checks.check(config)  # diffusion builds no discriminator
