"""Glow against independent math, and through the loop.

Every layer's log-determinant, and the whole flow's, against slogdet of
the brute-force Jacobian (jax.jacrev: the CPU convolution's custom VJP has
no forward mode) of the flattened map on a tiny input; the inverses to
float tolerance; actnorm's data-dependent init against the batch
statistics it promises; bits/dim of a flow that is a permutation with a
standard normal prior against its closed form; training 2 + 2 resumed
equal to 4 straight; eval mode's bits/dim recomputed; bad configs named.
"""

import json
import math
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import experiment, generate, methods, parallel
from diffusion_jax import visualization
from diffusion_jax.generate import load_sample_params
from diffusion_jax.methods import glow as glow_method
from diffusion_jax.methods.base import OneOptimizerMethod
from diffusion_jax.models import glow, glow_layers
from tests.util import run_eval, run_train, tiny_config

TINY = {'method': 'glow', 'glow.levels': 2, 'glow.steps_per_level': 1,
        'glow.hidden_channels': 4, 'optim.grad_clip_norm': 0.0}


def glow_config(**overrides):
  return tiny_config(**{**TINY, **overrides})


def one_device():
  return parallel.create_mesh(jax.devices()[:1])


def _randomised(params, seed=0, scale=0.2):
  """Every parameter moved by N(0, scale^2): no layer stays the identity
  (zero-initialised convolutions, actnorm) or orthogonal."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _slogdet(jac):
  sign, logdet = np.linalg.slogdet(np.asarray(jac, np.float64))
  assert sign != 0
  return logdet


def _brute_force_logdet(fn, x):
  """log |det| of the Jacobian of flat x -> flat fn(x), in float64."""
  flat = lambda v: fn(v.reshape(x.shape)).reshape(-1)
  jac = jax.jit(jax.jacrev(flat))(x.reshape(-1))
  assert jac.shape == (x.size, x.size)
  return _slogdet(jac)


def _check_flow(forward, inverse, x, flatten=lambda y: y, atol=1e-5):
  """forward(x) = (y, logdet): logdet against the brute-force Jacobian of
  x -> flatten(y); inverse(y) = (x, -logdet). One compilation. Returns
  the brute-force log |det|."""

  @jax.jit
  def run(v):
    def flat(u):
      y, logdet = forward(u.reshape(x.shape))
      return flatten(y).reshape(-1), (y, logdet)
    jac, (y, logdet) = jax.jacrev(flat, has_aux=True)(v.reshape(-1))
    return jac, logdet, inverse(y)

  jac, logdet, (x_back, logdet_back) = run(x)
  assert jac.shape == (x.size, x.size)
  brute = _slogdet(jac)
  np.testing.assert_allclose(logdet, [brute], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(x_back, x, atol=atol)
  np.testing.assert_allclose(logdet_back, -logdet, rtol=1e-4, atol=1e-4)
  return brute


def _x(shape, seed=1):
  return 0.5 * jax.random.normal(jax.random.key(seed), shape)


# ---------------------------------------------------------------- layers --

LAYERS = {
    'actnorm': lambda: glow_layers.ActNorm(),
    'invconv': lambda: glow_layers.InvConv1x1(),
    'invconv_lu': lambda: glow_layers.InvConv1x1LU(seed=3),
    'shuffle': lambda: glow_layers.Permutation('shuffle', seed=2),
    'affine_coupling': lambda: glow_layers.Coupling(8, 'affine'),
    'additive_coupling': lambda: glow_layers.Coupling(8, 'additive'),
}


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_layer_logdet_is_the_jacobians_and_reverse_inverts(name):
  layer = LAYERS[name]()
  x = _x((1, 2, 2, 6))  # 24 dimensions
  params = _randomised(layer.init(jax.random.key(0), x))
  brute = _check_flow(lambda v: layer.apply(params, v),
                      lambda y: layer.apply(params, y, reverse=True), x)
  if name not in ('shuffle', 'additive_coupling'):
    assert abs(brute) > 0.1  # not volume preserving: the test can fail


def test_lu_factors_rebuild_the_rotation():
  """P L (U + diag(sign exp(log|s|))) is the rotation they came from."""
  p, lower, upper, sign, log_s = glow_layers.lu_of_random_rotation(5, 7)
  w = p @ lower @ (upper + np.diag(sign * np.exp(log_s)))
  np.testing.assert_allclose(w @ w.T, np.eye(5), atol=1e-5)
  np.testing.assert_allclose(np.sum(log_s), 0.0, atol=1e-5)  # |det| = 1


def test_squeeze_is_a_permutation_with_openai_channel_order():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  s = glow_layers.squeeze2d(x)
  assert s.shape == (2, 2, 3, 12)
  # channel c * 4 + 2 dy + dx of output pixel (i, j) = x[2i + dy, 2j + dx, c]
  np.testing.assert_array_equal(s[1, 1, 2, 2 * 4 + 2 * 1 + 0],
                                x[1, 3, 4, 2])
  np.testing.assert_array_equal(np.sort(s.reshape(-1)), x.reshape(-1))
  np.testing.assert_array_equal(glow_layers.unsqueeze2d(s), x)
  assert _brute_force_logdet(glow_layers.squeeze2d, x[:1, :2, :2]) == (
      pytest.approx(0.0, abs=1e-6))


@pytest.mark.parametrize('learn_top', [False, True])
def test_priors_logdet_is_the_jacobians(learn_top):
  """(z_a, z_b) -> (z_a, eps) of the split prior, and z -> eps of the top
  prior: the standardisation whose scale enters log p(x)."""
  x = _x((1, 2, 2, 8))
  split = glow_layers.SplitPrior()
  params = _randomised(split.init(jax.random.key(0), x[..., :4], x[..., 4:]))

  def split_map(v, reverse=False):
    z_b, logdet = split.apply(params, v[..., :4], v[..., 4:], reverse=reverse)
    return jnp.concatenate([v[..., :4], z_b], -1), logdet

  assert abs(_check_flow(split_map, lambda y: split_map(y, True), x)) > 0.1
  top = glow_layers.TopPrior(learn_top)
  top_params = _randomised(top.init(jax.random.key(0), x))
  brute = _check_flow(lambda v: top.apply(top_params, v),
                      lambda y: top.apply(top_params, y, reverse=True), x)
  assert (abs(brute) > 0.1) == learn_top


# ------------------------------------------------------------ whole flow --


@pytest.mark.parametrize('coupling,permutation,learn_top', [
    ('additive', 'invconv_lu', True),
    # The affine coupling has its own test above; this one adds ~20 s of
    # compilation on a loaded 2-core CPU, so it runs with -m slow.
    pytest.param('affine', 'invconv', True, marks=pytest.mark.slow)])
def test_flow_logdet_is_the_jacobians_and_it_inverts(coupling, permutation,
                                                     learn_top):
  model = glow.Glow(levels=2, steps_per_level=1, hidden_channels=4,
                    coupling=coupling, permutation=permutation,
                    learn_top=learn_top)
  x = _x((1, 4, 4, 2))  # 32 dimensions: 2x2x4 factored out, 1x1x16 top
  params = _randomised(model.init(jax.random.key(0), x))
  latents = jax.eval_shape(lambda v: model.apply(params, v), x)[0]
  assert [z.shape[1:] for z in latents] == glow.latent_shapes((4, 4, 2), 2)
  assert [z.shape[1:] for z in latents] == [(2, 2, 4), (1, 1, 16)]
  brute = _check_flow(
      lambda v: model.apply(params, v),
      lambda z: model.apply(params, z, method=glow.Glow.inverse), x,
      flatten=glow.flatten_latents, atol=1e-4)
  assert abs(brute) > 0.5
  # The flat layout sampling splits noise by.
  flat = jnp.arange(32.0).reshape(1, 32)
  split = glow.split_latents(flat, glow.latent_shapes((4, 4, 2), 2))
  np.testing.assert_array_equal(glow.flatten_latents(split), flat)
  np.testing.assert_array_equal(split[1].reshape(-1), np.arange(16, 32))


def test_latent_shapes_add_up_for_three_levels():
  shapes = glow.latent_shapes((32, 32, 3), 3)  # the paper's CIFAR-10
  assert shapes == [(16, 16, 6), (8, 8, 12), (4, 4, 48)]
  assert sum(math.prod(s) for s in shapes) == 32 * 32 * 3


# --------------------------------------------------- init and likelihood --


def test_data_init_normalises_every_actnorm_on_its_batch():
  method = methods.create_method(glow_config())
  params = method.init_params(jax.random.key(0))
  y = 0.3 + 2.0 * jax.random.normal(jax.random.key(1), (32, 8, 8, 1))
  new = jax.jit(method.data_init)(params, y)
  _, state = jax.jit(lambda p, v: method.model.apply(
      {'params': p}, v, mutable=['intermediates']))(new, y)
  outputs = jax.tree.leaves(state['intermediates'])
  # Per flow step (L = 2, K = 1): its own actnorm and the coupling
  # network's two.
  assert len(outputs) == 3 * 2
  for out in outputs:
    flat = np.asarray(out, np.float64).reshape(-1, out.shape[-1])
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.var(0), 1.0, rtol=1e-3)
  # Only actnorm parameters changed.
  changed = jax.tree_util.tree_map_with_path(
      lambda path, a, b: (jax.tree_util.keystr(path),
                          not np.array_equal(a, b)), params, new)
  for path, did_change in jax.tree.leaves(
      changed, is_leaf=lambda v: isinstance(v, tuple)):
    assert did_change == ('actnorm' in path), path


def test_train_step_initialises_actnorm_at_step_zero_only():
  method = methods.create_method(glow_config())
  state = method.init(jax.random.key(0))
  batch = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (16, 8, 8, 1)) / 255.0 * 2 - 1, jnp.float32)
  step = jax.jit(method.train_step)
  by_hand = jax.jit(lambda s, b: OneOptimizerMethod.train_step(
      method, method.data_init_state(s, b), b))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  state1, metrics = step(state, batch)
  jax.tree.map(close, state1, by_hand(state, batch)[0])
  bias = lambda s: s.params['steps_0']['actnorm']['bias']
  assert not np.array_equal(bias(state1), bias(state))
  # The EMA restarts from the initialised parameters.
  jax.tree.map(close, state1.ema_params, state1.params)
  # At step 1 the data pass does not run again: by hand it would move
  # actnorm to the statistics of this all-black batch (mean y ~ -1/2).
  black = -jnp.ones_like(batch)
  state2, _ = step(state1, black)
  again, _ = by_hand(state1, black)
  assert np.max(np.abs(bias(state2) - bias(state1))) < 1e-2
  assert np.max(np.abs(bias(again) - bias(state1))) > 0.1
  assert np.isfinite(float(metrics['loss']))


def test_dequantization_stays_in_each_level_bin():
  levels = np.arange(256)
  x = jnp.asarray(levels / 255.0 * 2 - 1, jnp.float32).reshape(1, 16, 16, 1)
  for n_bits in (8, 5):
    y = np.asarray(glow_method.dequantize(x, jax.random.key(0), n_bits))
    bins = levels.reshape(1, 16, 16, 1) // 2 ** (8 - n_bits)
    np.testing.assert_array_equal(np.floor((y + 0.5) * 2 ** n_bits), bins)
    # Samples map back to the 8-bit levels of their bins.
    back = np.asarray(glow_method.quantize(jnp.asarray(y), n_bits))
    np.testing.assert_allclose(back, (bins * 2 ** (8 - n_bits)) / 255 * 2 - 1,
                               atol=1e-6)
  # An overflowed inverse: +-inf clip to the end levels, NaN stays NaN for
  # sample mode to count (and draw mid-grey).
  back = np.asarray(glow_method.quantize(jnp.asarray(
      [np.inf, -np.inf, np.nan, 0.0])))
  np.testing.assert_array_equal(back[:2], [1.0, -1.0])
  assert np.isnan(back[2]) and back[3] == 1 / 255
  np.testing.assert_array_equal(visualization.to_uint8(back), [255, 0, 128,
                                                               128])
  # A uniform density on [-1/2, 1/2)^D costs the raw bits.
  assert float(glow_method.bits_per_dim(jnp.zeros(()), 64)) == 8.0
  assert float(glow_method.bits_per_dim(jnp.zeros(()), 64, 5)) == 5.0


@pytest.fixture(scope='module')
def identity_flow():
  """Additive couplings (zero NN output), actnorm at b = s = 0, a
  'reverse' permutation and zero-initialised priors: at init the flow is
  a permutation of y with a standard normal prior."""
  config = glow_config(**{'glow.coupling': 'additive',
                          'glow.permutation': 'reverse',
                          'glow.learn_top': True})
  method = methods.create_method(config)
  return method, method.init_params(jax.random.key(0))


def test_bits_per_dim_of_a_standard_normal_flow_is_the_closed_form(
    identity_flow):
  method, params = identity_flow
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (4, 8, 8, 1)) / 255.0 * 2 - 1, jnp.float32)
  rng = jax.random.key(5)
  out = jax.jit(method.log_likelihood)(params, images, rng)
  y = np.asarray(glow_method.dequantize(images, rng), np.float64)
  d = 64
  # -log p(y) = |y|^2 / 2 + D/2 log(2 pi); + D log 256 for the 8-bit bins.
  nll = 0.5 * np.sum(y.reshape(4, -1) ** 2, 1) + d / 2 * np.log(2 * np.pi)
  want = (nll + d * np.log(256)) / (d * np.log(2))
  np.testing.assert_allclose(out['total_bpd'], want, rtol=1e-6)
  np.testing.assert_allclose(out['logdet_bpd'], 0.0, atol=1e-6)
  np.testing.assert_allclose(
      out['prior_bpd'] + out['logdet_bpd'] + 8, out['total_bpd'], rtol=1e-6)


def test_a_non_finite_logdet_makes_the_loss_non_finite(identity_flow):
  method, params = identity_flow
  bad = jax.tree.map(lambda x: x, params)
  bad['steps_1']['actnorm']['logs'] = bad['steps_1']['actnorm'][
      'logs'].at[0].set(jnp.nan)
  y = glow_method.dequantize(jnp.zeros((2, 8, 8, 1)), jax.random.key(0))
  loss, values = jax.jit(method.loss)(bad, y, None)
  assert not np.isfinite(float(loss))
  assert not np.any(np.isfinite(values))
  loss, _ = jax.jit(method.loss)(params, y, None)
  assert np.isfinite(float(loss))


# -------------------------------------------------------------- config --


@pytest.mark.parametrize('overrides,match', [
    ({'data.image_size': 7}, r'config\.data\.image_size=7 .*config\.glow\.'
     r'levels=2.*no number of levels works for an odd size'),
    ({'data.image_size': 12, 'glow.levels': 3},
     r'image_size=12 .*levels=3.*2\^3=8.*levels in 1\.\.2.*e\.g\. 16'),
    ({'model.num_classes': 10}, r'config\.model\.num_classes=10'),
    ({'glow.coupling': 'spline'}, r"config\.glow\.coupling='spline'"),
    ({'glow.permutation': 'lu'}, r"config\.glow\.permutation='lu'"),
    ({'glow.n_bits': 9}, r'config\.glow\.n_bits=9'),
    ({'glow.steps_per_level': 0}, r'config\.glow\.steps_per_level=0'),
])
def test_bad_config_is_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    methods.create_method(glow_config(**overrides))


def test_shipped_configs_build():
  import importlib  # pylint: disable=g-import-not-at-top
  for name, size in (('digits_glow', 8), ('cifar10_glow', 32)):
    config = importlib.import_module(f'configs.{name}').get_config()
    method = methods.create_method(config)
    assert method.image_shape[0] == size
    assert math.prod(method.noise_shape(2)) == 2 * math.prod(
        method.image_shape)


# ------------------------------------------------------------- the loop --


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """4 steps straight (with sample grids), and 2 then 2 more resumed."""
  root = tmp_path_factory.mktemp('glow')
  config = glow_config(**{'sample_grid.every_steps': 2})
  mesh = one_device()
  full = jax.device_get(run_train(config, str(root / 'a'), mesh))
  half = jax.device_get(run_train(glow_config(num_train_steps=2),
                                  str(root / 'b'), mesh))
  resumed = jax.device_get(run_train(glow_config(), str(root / 'b'), mesh))
  return config, root, full, resumed


def test_resume_two_plus_two_is_bitwise_four_straight(trained):
  _, root, full, resumed = trained
  assert int(full.step) == int(resumed.step) == 4
  for name in ('params', 'ema_params', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(resumed, name),
                 getattr(full, name))
  assert sorted(p.name for p in (root / 'a' / 'samples').iterdir()) == [
      'ema_step_00000002.png', 'ema_step_00000004.png']


def test_eval_writes_the_bits_per_dim_of_the_test_split(trained):
  config, root, _, resumed = trained
  workdir = str(root / 'b')
  metrics = run_eval(config, workdir, one_device())
  out = root / 'b' / 'eval' / 'step_00000004' / 'metrics.json'
  assert json.loads(out.read_text())['total_bpd'] == metrics['total_bpd']
  # Recomputed: evaluate.py's batches and keys (EVAL_STREAM folded with
  # the batch index), the EMA parameters, a masked mean.
  from diffusion_jax import evaluate  # pylint: disable=g-import-not-at-top
  exp = experiment.build(config, one_device(), mode='eval')
  params, _ = load_sample_params(exp, workdir)
  rng = exp.sample_rng(evaluate.EVAL_STREAM)
  fn = jax.jit(exp.method.log_likelihood)
  total, count = 0.0, 0.0
  for i, batch in enumerate(exp.eval_iterator('test')):
    bpd = np.asarray(fn(params, batch['images'], jax.random.fold_in(rng, i))[
        'total_bpd'], np.float64)
    mask = np.asarray(batch['mask'])
    total, count = total + np.sum(bpd * mask), count + mask.sum()
  assert metrics['num_images'] == count == 300
  np.testing.assert_allclose(metrics['total_bpd'], total / count, rtol=1e-5)
  assert 0 < metrics['total_bpd'] < 16
  # Samples of the trained state: on the 8-bit grid in [-1, 1].
  noise = jax.random.normal(jax.random.key(0), exp.method.noise_shape(4))
  images = np.asarray(jax.jit(exp.method.sample)(
      resumed.ema_params, noise, None))
  assert images.shape == (4, 8, 8, 1)
  assert images.min() >= -1 and images.max() <= 1
  levels = (images + 1) / 2 * 255
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)


def test_sample_mode_counts_non_finite_samples(trained):
  """A sampler whose samples 0, 3, 6, 9 came back NaN in one pixel
  (Glow's overflowed inverse): sample mode keeps them, mid-grey there,
  says how many in the log and in samples.npz's 'nonfinite'."""
  config, root, _, _ = trained
  real = experiment.Experiment.jit_sample_fn

  def with_nan_pixels(self, x0_at=()):
    fn = real(self, x0_at)
    calls = []

    def sample(params, noise, rng):
      images = fn(params, noise, rng)
      first = len(calls) * images.shape[0]
      calls.append(first)
      rows = [i for i in range(images.shape[0]) if (first + i) % 3 == 0]
      return images.at[jnp.asarray(rows), 1, 2, 0].set(jnp.nan)

    return sample

  with mock.patch.object(experiment.Experiment, 'jit_sample_fn',
                         with_nan_pixels), \
       mock.patch.object(visualization.logging, 'warning') as warning:
    out = generate.generate(
        experiment.build(config, one_device(), mode='sample'),
        str(root / 'b'))
  saved = np.load(os.path.join(out, 'samples.npz'))
  assert config.sample.num_images == 12 and config.sample.batch_size == 8
  np.testing.assert_array_equal(saved['nonfinite'], np.arange(12) % 3 == 0)
  np.testing.assert_array_equal(saved['images'][::3, 1, 2, 0], 128)
  messages = [c[0][0] % c[0][1:] for c in warning.call_args_list]
  messages = [m for m in messages if m.startswith('sample mode')]
  assert len(messages) == 1
  assert messages[0].startswith('sample mode: 4 of 12 samples (33.3%)')
  assert 'glow.temperature' in messages[0]
