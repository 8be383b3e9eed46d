"""The GAN method against independent math, and through the loop.

The two losses and their logit gradients against numpy closed forms (the
non-saturating generator gradient stays near -1 where the minimax one
vanishes); R1 against per-image input gradients taken separately; spectral
normalisation against numpy's SVD; slerp's endpoints, norms and constant
angular speed; each update changes only its own network (the other's
learning rate 0); two-optimizer training resumed 2 + 2 equal to 4 straight
in every leaf; the diagnose hook stopping a run with the earlier checkpoint
kept; eval mode writing interpolation.png; bad config values named.
"""

import importlib
import json
import shutil
from unittest import mock

from clu import parameter_overview
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import checkpointing, experiment, parallel, trainer
from diffusion_jax.methods import gan
from diffusion_jax.metrics import sample_quality
from diffusion_jax.models import dcgan
from tests.util import run_eval, run_train, tiny_config

# Every state field in use: BatchNorm statistics (generator), spectral-norm
# vectors (discriminator), R1 on.
TINY = {'method': 'gan', 'gan.z_dim': 8, 'gan.generator_widths': (16, 8),
        'gan.discriminator_widths': (8, 16), 'gan.spectral_norm': True,
        'gan.r1_gamma': 1.0, 'optim.grad_clip_norm': 0.0}


def gan_config(**overrides):
  return tiny_config(**{**TINY, **overrides})


def one_device():
  # As tests/test_autoencoder_method.py: one device, so the runs share one
  # compiled step (conftest's cache); sharding is test_train.py's.
  return parallel.create_mesh(jax.devices()[:1])


def _images(n=8, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype(
      np.float32)


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-np.float64(v)))


# ------------------------------------------------------------------ math --


def test_losses_match_their_closed_forms():
  real = np.array([2.0, 0.5, -1.0, 0.2, 30.0], np.float32)
  fake = np.array([-2.0, 0.3, 1.5, -0.4, -30.0], np.float32)
  d_real, d_fake = _sigmoid(real), _sigmoid(fake)
  # Goodfellow et al. eq. 1 in probabilities (float64: no rounding at +-30).
  want_d = np.mean(-np.log(d_real)) + np.mean(-np.log1p(-d_fake))
  np.testing.assert_allclose(gan.discriminator_loss(real, fake), want_d,
                             rtol=1e-6)
  np.testing.assert_allclose(gan.generator_loss(fake),
                             np.mean(-np.log(d_fake)), rtol=1e-6)
  np.testing.assert_allclose(gan.minimax_generator_loss(fake),
                             np.mean(np.log1p(-d_fake)), rtol=1e-6)


def test_non_saturating_gradient_survives_where_minimax_vanishes():
  """d/dl of mean log(1 - sigmoid(l)) is -sigmoid(l) / B, -> 0 as D(G(z))
  -> 0; of mean -log sigmoid(l) it is (sigmoid(l) - 1) / B, -> -1 / B
  (Goodfellow et al. sec. 3). Both push the fake logits up."""
  logits = np.array([-12.0, -6.0, 0.0, 3.0], np.float32)
  n = len(logits)
  minimax = jax.grad(gan.minimax_generator_loss)(logits)
  non_sat = jax.grad(gan.generator_loss)(logits)
  np.testing.assert_allclose(minimax, -_sigmoid(logits) / n, rtol=1e-5,
                             atol=1e-12)
  np.testing.assert_allclose(non_sat, (_sigmoid(logits) - 1) / n, rtol=1e-5)
  # At D(G(z)) = sigmoid(-12) = 6e-6: the saturating gradient is ~1e5 times
  # smaller than the non-saturating one.
  assert abs(minimax[0]) < 2e-6 and abs(non_sat[0]) > 0.999 / n
  assert np.all(minimax < 0) and np.all(non_sat < 0)


@pytest.fixture(scope='module')
def method_and_state():
  method = experiment.build(gan_config(), one_device()).method
  return method, jax.device_get(jax.jit(method.init)(jax.random.key(0)))


def test_r1_equals_separate_per_image_input_gradients(method_and_state):
  method, state = method_and_state
  real, fake = _images(4, 1), _images(4, 2)
  params, u = state.disc_params, state.disc_spectral
  loss, (d_real, d_fake, r1, _) = jax.jit(method.discriminator_terms)(
      params, u, real, fake)

  # One image at a time (each compiled once, reused for every image).
  logit = jax.jit(lambda x: method.discriminate(params, u, x[None])[0][0])
  input_grad = jax.jit(jax.grad(logit))
  grads = [np.asarray(input_grad(x), np.float64) for x in real]
  want_r1 = np.mean([np.sum(g ** 2) for g in grads])
  logits_real = np.array([logit(x) for x in real])
  logits_fake = np.array([logit(x) for x in fake])
  assert want_r1 > 0
  np.testing.assert_allclose(r1, want_r1, rtol=1e-4)
  # L_D + gamma/2 R1 with gamma = 1.
  np.testing.assert_allclose(
      loss, np.mean(np.log1p(np.exp(-np.float64(logits_real))))
      + np.mean(np.log1p(np.exp(np.float64(logits_fake)))) + 0.5 * want_r1,
      rtol=1e-5)
  np.testing.assert_allclose([d_real, d_fake],
                             [np.mean(_sigmoid(logits_real)),
                              np.mean(_sigmoid(logits_fake))], rtol=1e-5)


def test_spectral_norm_divides_each_kernel_by_its_top_singular_value(
    method_and_state):
  """After enough power iterations (one per update_stats call) each stored
  sigma is the largest singular value of its kernel as a (fan_in, out)
  matrix (Miyato et al. eq. 8), for every layer."""
  method, state = method_and_state
  params, u = state.disc_params, state.disc_spectral
  iterate = jax.jit(lambda u: method.discriminate(params, u, _images(1),
                                                  update_stats=True)[1])
  for _ in range(60):
    u = iterate(u)
  sigmas = {}
  for stats in u.values():
    for name, value in stats.items():
      if name.endswith('/sigma'):
        sigmas[name.split('/')[0]] = float(value)
  assert sorted(sigmas) == ['conv_0', 'conv_1', 'logit']
  for name, sigma in sigmas.items():
    kernel = np.asarray(params[name]['kernel'], np.float64)
    top = np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]),
                        compute_uv=False)[0]
    np.testing.assert_allclose(sigma, top, rtol=1e-3)


def test_slerp_endpoints_norms_and_constant_angular_speed():
  rng = np.random.default_rng(0)
  z0 = rng.normal(size=(3, 16)).astype(np.float32)
  z1 = rng.normal(size=(3, 16)).astype(np.float32)
  z1 *= np.linalg.norm(z0, axis=1, keepdims=True) / np.linalg.norm(
      z1, axis=1, keepdims=True)  # equal norms
  t = jnp.linspace(0.0, 1.0, 7)
  path = np.asarray(dcgan.slerp(z0, z1, t), np.float64)
  assert path.shape == (3, 7, 16)
  np.testing.assert_allclose(path[:, 0], z0, atol=1e-5)
  np.testing.assert_allclose(path[:, -1], z1, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(path, axis=-1),
                             np.linalg.norm(z0, axis=-1)[:, None].repeat(7, 1),
                             rtol=1e-5)
  cos = lambda a, b: np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / (
      np.linalg.norm(b, axis=-1))
  steps = np.arccos(np.clip(cos(path[:, 1:], path[:, :-1]), -1, 1))
  np.testing.assert_allclose(steps, steps[:, :1].repeat(6, 1), rtol=1e-3)
  np.testing.assert_allclose(steps.sum(1), np.arccos(cos(z0, z1)), rtol=1e-3)
  # Linear interpolation's midpoint is shorter: what slerp avoids.
  assert np.all(np.linalg.norm((z0 + z1) / 2, axis=-1)
                < np.linalg.norm(z0, axis=-1))
  # Equal endpoints: the constant path, no 0/0.
  same = np.asarray(dcgan.slerp(z0, z0, t))
  np.testing.assert_allclose(same, z0[:, None].repeat(7, 1), rtol=1e-6)


def test_each_update_changes_only_its_own_network(method_and_state):
  """One train step with the generator's learning rate 0 leaves the
  generator's parameters bitwise as they were and changes the
  discriminator's, and the other way round. The learning rates live in the
  optimizer states (inject_hyperparams): one compiled step for both."""
  method, state = method_and_state
  adam = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.5)
  probe = gan.GanMethod(
      generator=method.generator, discriminator=method.discriminator,
      z_dim=method.z_dim, image_shape=method.image_shape, r1_gamma=1.0,
      gen_optimizer=adam, disc_optimizer=adam, ema_decay=0.9,
      ema_warmup=False, seed=0)
  state = state.replace(gen_opt_state=adam.init(state.gen_params),
                        disc_opt_state=adam.init(state.disc_params))
  step = jax.jit(probe.train_step)

  def with_lr(opt_state, lr):  # a copy: the original keeps 1e-2
    return opt_state._replace(hyperparams={
        **opt_state.hyperparams,
        'learning_rate': jnp.asarray(lr, jnp.float32)})

  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  images = _images(16)
  frozen_g, _ = jax.device_get(step(state.replace(
      gen_opt_state=with_lr(state.gen_opt_state, 0.0)), images))
  assert same(frozen_g.gen_params, state.gen_params)
  assert not same(frozen_g.disc_params, state.disc_params)
  frozen_d, _ = jax.device_get(step(state.replace(
      disc_opt_state=with_lr(state.disc_opt_state, 0.0)), images))
  assert same(frozen_d.disc_params, state.disc_params)
  assert not same(frozen_d.gen_params, state.gen_params)


def test_diagnose_names_the_fixes_only_when_the_discriminator_won(
    method_and_state):
  method, _ = method_and_state
  won = {'d_real': 0.999, 'd_fake': 0.001, 'g_loss': 8.0, 'loss': 8.0}
  message = method.diagnose(won)
  for fix in ('disc_learning_rate', 'r1_gamma', 'spectral_norm'):
    assert fix in message
  assert method.diagnose({'d_real': 0.7, 'd_fake': 0.3, 'g_loss': 1.2}) is None
  assert method.diagnose({**won, 'd_real': 0.98}) is None
  assert method.diagnose({**won, 'd_fake': 0.02}) is None
  off = experiment.build(gan_config(**{'gan.diagnose': False})).method
  assert off.diagnose(won) is None


@pytest.mark.parametrize('norm, spectral', [('group', False),
                                             ('none', True)])
def test_other_norms_build_a_state_the_loop_can_log(norm, spectral):
  """Without BatchNorm there are no statistics: no None in what the
  trainer counts (clu's parameter overview), nothing kept for them."""
  method = experiment.build(gan_config(**{
      'gan.generator_norm': norm, 'gan.spectral_norm': spectral})).method
  state = method.abstract_init()
  assert state.gen_stats is None and state.ema_stats is None
  assert (state.disc_spectral is None) != spectral
  params = method.sample_params(state)
  assert parameter_overview.count_parameters(params) == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(state.ema_params))
  z = jax.ShapeDtypeStruct((3, method.z_dim), jnp.float32)
  assert jax.eval_shape(method.sample, params, z, None).shape == (3, 8, 8, 1)


@pytest.mark.parametrize('size, widths', [(8, (16, 8)), (28, (16, 8)),
                                          (32, (16, 8, 8))])
def test_generator_and_discriminator_shapes(size, widths):
  base = dcgan.generator_base_size(size, len(widths))
  gen = dcgan.Generator(widths=widths, base=base, channels=3)
  disc = dcgan.Discriminator(widths=(8, 16, 16))
  z = jnp.zeros((2, 5))
  images = jax.eval_shape(lambda: gen.apply(gen.init(jax.random.key(0), z),
                                            z))
  assert images.shape == (2, size, size, 3)
  x = jnp.zeros((2, size, size, 3))
  logits = jax.eval_shape(lambda: disc.apply(
      disc.init(jax.random.key(0), x), x))
  assert logits.shape == (2,)


# ------------------------------------------------------------- the loop --


def _state_leaves(state):
  return {name: getattr(state, name) for name in (
      'gen_params', 'gen_opt_state', 'gen_stats', 'disc_params',
      'disc_opt_state', 'disc_spectral', 'ema_params', 'ema_stats')}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """4 steps straight (with sample grids); 2, then 2 more resumed; and a
  copy of the 2-step run resumed with diagnose thresholds every interval
  meets (the stopped run)."""
  root = tmp_path_factory.mktemp('gan')
  config = gan_config(**{'sample_grid.every_steps': 2})
  mesh = one_device()
  full = jax.device_get(run_train(config, str(root / 'a'), mesh))
  half = jax.device_get(run_train(gan_config(num_train_steps=2),
                                  str(root / 'b'), mesh))
  shutil.copytree(root / 'b', root / 'c')
  resumed = jax.device_get(run_train(gan_config(), str(root / 'b'), mesh))
  forced = gan_config(**{'gan.diagnose_d_real_above': 0.0,
                         'gan.diagnose_d_fake_below': 1.0,
                         'gan.diagnose_g_loss_above': 0.0})
  with pytest.raises(trainer.NonFiniteLossError) as stopped:
    run_train(forced, str(root / 'c'), mesh)
  return config, root, full, half, resumed, str(stopped.value)


def test_resume_two_plus_two_is_bitwise_four_straight(trained):
  _, root, full, half, resumed, _ = trained
  assert int(full.step) == int(resumed.step) == 4 and int(half.step) == 2
  for name, tree in _state_leaves(full).items():
    assert jax.tree.leaves(tree), name  # every field in use
    jax.tree.map(np.testing.assert_array_equal, _state_leaves(resumed)[name],
                 tree)
  # Both optimizers stepped every step; the state moved.
  counts = [int(x) for x in jax.tree.leaves(full.gen_opt_state)
            + jax.tree.leaves(full.disc_opt_state) if x.dtype == np.int32]
  assert counts and set(counts) == {4}
  assert not np.array_equal(jax.tree.leaves(full.ema_stats)[0],
                            jax.tree.leaves(half.ema_stats)[0])
  assert sorted(p.name for p in (root / 'a' / 'samples').iterdir()) == [
      'ema_step_00000002.png', 'ema_step_00000004.png']


def test_diagnosed_run_stops_and_keeps_the_earlier_checkpoint(trained):
  *_, message = trained
  assert 'stopped at step 4' in message and 'discriminator won' in message
  assert 'last good checkpoint (step 2)' in message
  ckpt = checkpointing.Checkpointer(str(trained[1] / 'c' / 'checkpoints'))
  try:
    assert ckpt.latest_step() == 2
  finally:
    ckpt.close()


def test_eval_writes_the_interpolation_figure_and_scores_samples(trained):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  config, root, *_ = trained
  config = gan_config(**{'sample_quality.num_samples': 8})
  seen = []

  def fake_quality(sample_batch, **kwargs):  # the metric is tested elsewhere
    seen.append(np.asarray(sample_batch(0)))
    return {'fd': 1.0, 'is_mean': 1.5, 'is_std': 0.1, 'kid_mean': None,
            'fd_vs': 'test', 'num_samples': kwargs['num_samples'],
            'network': 'classifier', 'comparable_to_published': False}

  with mock.patch.object(sample_quality, 'compute_sample_quality',
                         fake_quality), \
       mock.patch.object(sample_quality, 'load_network'):
    metrics = run_eval(config, str(root / 'a'), one_device())
  out = root / 'a' / 'eval' / 'step_00000004'
  assert json.loads((out / 'metrics.json').read_text())['sample_quality'][
      'fd'] == metrics['sample_quality']['fd'] == 1.0
  assert seen[0].shape == (8, 8, 8, 1) and np.abs(seen[0]).max() <= 1.0
  # 8 rows of 10 8x8 tiles with 1-pixel gaps, upscaled 3x to >= 256 px.
  figure = np.asarray(Image.open(out / 'interpolation.png'))
  assert figure.shape == (3 * (8 * 9 + 1), 3 * (10 * 9 + 1))


def test_interpolation_ends_at_the_samples_of_its_endpoints(trained):
  config, _, full, *_ = trained
  method = experiment.build(config, one_device()).method
  params = method.sample_params(full)
  z0, z1 = jax.random.normal(jax.random.key(3), (2, 2, method.z_dim))
  path = np.asarray(jax.jit(method.interpolate, static_argnums=3)(
      params, z0, z1, 5))
  assert path.shape == (2, 5, 8, 8, 1)
  ends = np.asarray(jax.jit(method.sample)(params, jnp.stack([z0, z1]).reshape(
      4, method.z_dim), None)).reshape(2, 2, 8, 8, 1)
  np.testing.assert_allclose(path[:, 0], ends[0], atol=1e-5)
  np.testing.assert_allclose(path[:, -1], ends[1], atol=1e-5)
  assert not np.allclose(path[:, 0], path[:, -1])


# ---------------------------------------------------------------- config --


def test_digits_gan_config_builds_in_every_mode():
  config = importlib.import_module('configs.digits_gan').get_config()
  for mode in ('train', 'sample', 'eval'):
    exp = experiment.build(config, parallel.create_mesh(), mode=mode)
  assert exp.method.noise_shape(3) == (3, 32)


@pytest.mark.parametrize('overrides, match', [
    ({'gan.generator_widths': (8, 8, 8, 8)},
     r'outputs multiples of 16, not config.data.image_size=8.*'
     r'1 \(base 4x4\), 2 \(base 2x2\), 3 \(base 1x1\)'),
    ({'data.image_size': 28, 'gan.generator_widths': (8, 8, 8)},
     r'config.data.image_size=28.*1 \(base 14x14\), 2 \(base 7x7\)$'),
    ({'gan.z_dim': 0}, r'config.gan.z_dim=0 must be an integer >= 1'),
    ({'gan.discriminator_widths': ()}, r'config.gan.discriminator_widths=\(\)'),
    ({'gan.generator_norm': 'layer'}, r"config.gan.generator_norm='layer'"),
    ({'gan.discriminator_norm': 'batch'},
     r"config.gan.discriminator_norm='batch'"),
    ({'gan.adam_b1': 1.0}, r'config.gan.adam_b1=1.0'),
    ({'gan.disc_learning_rate': -1.0}, r'config.gan.disc_learning_rate=-1.0'),
    ({'model.num_classes': 10}, r'config.model.num_classes=10.*unconditional'),
    ({'grad_accum_steps': 2}, r'config.grad_accum_steps=2'),
    ({'posthoc_ema.sigma_rels': (0.05,),
      'posthoc_ema.snapshot_every_steps': 2}, r'config.posthoc_ema.sigma_rels'),
])
def test_bad_gan_values_fail_at_build_with_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiment.build(gan_config(**overrides))
