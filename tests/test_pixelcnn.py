"""PixelCNN++ against independent math, and through the loop.

The network's causality by its exact input gradients (zero on the pixel
itself and everything after it in raster order; the channel coupling's
per-channel marginals zero on the pixel's later channels); the discretised
logistic mixture's 256 bin masses summing to one (RGB: its marginals
summing to one and equal to sums of the joint; all 256^3 colours in a
slow test); its NLL against a brute-force numpy loop over components and
channels; the sampler against a degenerate mixture (its mean) and against
the likelihood's own distribution (frequencies and moments); the method
trained, resumed 2 + 2 == 4 bit for bit, evaluated and sampled through
the loop; bad config values named.
"""

import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import experiment, parallel
from diffusion_jax.generate import load_sample_params
from diffusion_jax.methods.pixelcnn import decayed_learning_rate
from diffusion_jax.models import logistic_mixture as lm
from diffusion_jax.models.pixelcnn import PixelCNNPP
from tests.util import run_eval, run_sample, run_train, tiny_config

# One resolution and one block per stream: compiling the init (threefry
# per kernel) and the train step dominates this file's time; two
# resolutions are covered by the causality test's network.
TINY = {'method': 'pixelcnn', 'pixelcnn.nr_resnet': 1,
        'pixelcnn.nr_filters': 8, 'pixelcnn.nr_logistic_mix': 2,
        'pixelcnn.num_resolutions': 1, 'pixelcnn.dropout': 0.1,
        'pixelcnn.lr_decay': 0.99, 'optim.grad_clip_norm': 0.0,
        'sample_grid.num_images': 8, 'sample.batch_size': 8}
LEVELS = np.arange(256) / 127.5 - 1.0  # the 8-bit grid on [-1, 1]
# Compiled once per shape: op-by-op dispatch compiles every op instead.
log_prob = jax.jit(lm.log_prob, static_argnums=2)
marginal_log_probs = jax.jit(lm.marginal_log_probs, static_argnums=2)
sample = jax.jit(lm.sample, static_argnums=(2, 3))


def pixelcnn_config(**overrides):
  return tiny_config(**{**TINY, **overrides})


def one_device():
  return parallel.create_mesh(jax.devices()[:1])


def _on_grid(x):
  v = (np.asarray(x, np.float64) + 1.0) * 127.5
  return np.all(np.abs(v - np.round(v)) < 1e-3) and np.all(
      (v > -1e-3) & (v < 255 + 1e-3))


# ----------------------------------------------------------- causality --


def _random_params(net, x):
  """Parameters of net's shapes drawn in numpy (kernels N(0, 1 / fan_in),
  biases N(0, 0.1^2)): no init to compile (threefry per kernel)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(net.init, jax.random.key(0), x)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(
      0, 0.1 if len(s.shape) == 1 else 1 / np.sqrt(np.prod(s.shape[:-1])),
      s.shape), jnp.float32), shapes)


def test_outputs_depend_only_on_earlier_pixels_and_channels():
  """Exact gradients of a randomly initialised network (two resolutions,
  RGB): output logits at pixel i = 8 r + c have zero gradient w.r.t. input
  pixels j >= i and a nonzero one w.r.t. the pixel to the left and the one
  above; log p(x_i1..x_ic) is constant in the pixel's channels after c."""
  k = 2
  net = PixelCNNPP(out_channels=lm.num_params(3, k), nr_resnet=1,
                   nr_filters=8, num_resolutions=2, dropout=0.0)
  x = jnp.asarray(np.random.default_rng(0).choice(LEVELS, (1, 8, 8, 3)),
                  jnp.float32)
  params = _random_params(net, x)
  weights = jax.random.normal(jax.random.key(1), (1, 8, 8, net.out_channels))

  @jax.jit
  def input_gradients(x):
    out, pull_out = jax.vjp(lambda v: net.apply(params, v), x)
    # One cotangent per output pixel: a random combination of its logits.
    per_pixel = jnp.eye(64).reshape(64, 1, 8, 8, 1) * weights
    d_out = jax.vmap(lambda c: pull_out(c)[0])(per_pixel)
    _, pull_lp = jax.vjp(lambda v: lm.marginal_log_probs(v, out, k), x)
    d_lp = jax.vmap(lambda c: pull_lp(c)[0])(
        jnp.eye(192).reshape(192, 1, 8, 8, 3))
    return d_out, d_lp

  d_out, d_lp = jax.device_get(input_gradients(x))
  depends = np.any(d_out != 0, axis=(1, 4)).reshape(64, 64)  # [i, j]
  i, j = np.meshgrid(np.arange(64), np.arange(64), indexing='ij')
  assert not np.any(depends[j >= i]), 'an output sees its own or a later pixel'
  for p in range(1, 64):
    r, c = divmod(p, 8)
    assert depends[p, p - 1] if c else depends[p, p - 8]
    if r:
      assert depends[p, p - 8]
  assert depends.sum() > 0.9 * (j < i).sum()  # nearly all of the past seen
  # The channel coupling: entry (i, c) of the marginals w.r.t. (j, c').
  d_lp = d_lp.reshape(64, 3, 64, 3)
  for c in range(3):
    for c2 in range(3):
      at_pixel = d_lp[np.arange(64), c, np.arange(64), c2]
      if c2 > c:
        np.testing.assert_array_equal(at_pixel, 0.0)
      else:  # its own value and, through alpha, beta, gamma, earlier ones
        assert np.all(at_pixel != 0)
  later = (j > i)[:, None, :, None] & np.ones((1, 3, 1, 3), bool)
  assert not np.any(d_lp[later])


# -------------------------------------------------------- the likelihood --


def _random_net_out(rng, n, channels, k, log_scale=(-7.5, 2.0)):
  """(n, P) raw outputs: means N(0, 0.7), raw log-scales uniform in
  log_scale (below -7 clamped), coefficients tanh of N(0, 1)."""
  logits = rng.normal(0, 1.5, (n, k))
  per_channel = [rng.normal(0, 0.7, (n, channels, k)),
                 rng.uniform(*log_scale, (n, channels, k))]
  if channels == 3:
    per_channel.append(rng.normal(0, 1.0, (n, channels, k)))
  rest = np.concatenate(per_channel, axis=-1).reshape(n, -1)
  return np.concatenate([logits, rest], axis=-1).astype(np.float32)


def test_bin_masses_sum_to_one_for_one_channel():
  rng = np.random.default_rng(1)
  net_out = _random_net_out(rng, 64, 1, 3)
  x = jnp.asarray(LEVELS, jnp.float32)[:, None, None]  # (256, 1, 1)
  probs = np.exp(np.float64(log_prob(x, net_out, 3)))  # (256, 64)
  np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=2e-5)
  # Wide mixtures (no bin above 5 %) and sharp ones (one bin above 50 %).
  assert probs.max(axis=0).min() < 0.05 and probs.max() > 0.5


def test_rgb_marginals_are_sums_of_the_joint_and_sum_to_one():
  """For RGB: log p(r, g) (marginal_log_probs' second entry) equals the
  log of the joint summed over all 256 blues, at random (r, g); p(r, g)
  sums to one over all 256^2 pairs and p(r) over all 256 reds. Together:
  the joint over the 256^3 colours sums to one (the full sum: the slow
  test below)."""
  rng = np.random.default_rng(2)
  k = 3
  net_out = jnp.asarray(_random_net_out(rng, 4, 3, k, log_scale=(-4, 1)))
  levels = jnp.asarray(LEVELS, jnp.float32)
  r, g = (a.reshape(-1) for a in jnp.meshgrid(levels, levels, indexing='ij'))
  pairs = jnp.stack([r, g, jnp.zeros_like(r)], axis=-1)[:, None]  # (65536,1,3)
  marginals = np.float64(marginal_log_probs(pairs, net_out, k))
  p_rg = np.exp(marginals[..., 1])  # (65536, 4)
  np.testing.assert_allclose(p_rg.sum(axis=0), 1.0, atol=1e-4)
  p_r = np.exp(marginals.reshape(256, 256, 4, 3)[:, 0, :, 0])  # g-free
  np.testing.assert_allclose(p_r.sum(axis=0), 1.0, atol=1e-5)
  picked = rng.choice(65536, 16, replace=False, p=p_rg[:, 0] / p_rg[:, 0].sum())
  x = jnp.broadcast_to(pairs[picked], (16, 256, 3)).at[..., 2].set(levels)
  joint = np.exp(np.float64(log_prob(x, net_out[0], k)))  # (16, 256)
  np.testing.assert_allclose(joint.sum(axis=1), p_rg[picked, 0], rtol=1e-4)


@pytest.mark.slow
def test_bin_masses_sum_to_one_for_rgb():
  """All 256^3 colours of one pixel, for a few random mixtures (16.7M
  evaluations each: ~10 s on 2 cores)."""
  rng = np.random.default_rng(2)
  net_out = jnp.asarray(_random_net_out(rng, 3, 3, 2, log_scale=(-4, 1)))
  levels = jnp.asarray(LEVELS, jnp.float32)
  g, b = jnp.meshgrid(levels, levels, indexing='ij')

  @jax.jit
  def total_mass(params):  # (P,) -> sum over every (r, g, b)
    def given_r(r):
      x = jnp.stack([jnp.full_like(g, r), g, b], axis=-1)
      return jnp.sum(jnp.exp(lm.log_prob(x, params, 2)))
    return jnp.sum(jax.lax.map(given_r, levels))

  totals = [float(total_mass(p)) for p in net_out]
  np.testing.assert_allclose(totals, 1.0, atol=1e-4)


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _brute_force_nll(x, net_out, k):
  """-log(sum_k pi_k prod_c [sigmoid((x_c + 1/255 - mu_kc) / s_kc) -
  sigmoid((x_c - 1/255 - mu_kc) / s_kc)]) of one pixel, float64 loops;
  the first and last levels' bins extend to -inf and +inf (eq. 2), the RGB
  means are coupled as mu_g + alpha r, mu_b + beta r + gamma g (sec. 2.2)."""
  x, net_out = np.float64(x), np.float64(net_out)
  channels = len(x)
  logits, rest = net_out[:k], net_out[k:].reshape(channels, -1)
  pi = np.exp(logits - logits.max())
  pi /= pi.sum()
  total = 0.0
  for comp in range(k):
    mass = 1.0
    for c in range(channels):
      mu = rest[c, comp]
      s = np.exp(max(rest[c, k + comp], -7.0))
      if c >= 1:  # alpha (row 0) for green; beta (1), gamma (2) for blue
        coeff = lambda row: np.tanh(rest[row, 2 * k + comp])
        mu += (coeff(0) * x[0] if c == 1
               else coeff(1) * x[0] + coeff(2) * x[1])
      upper = 1.0 if x[c] == 1.0 else _sigmoid((x[c] + 1 / 255 - mu) / s)
      lower = 0.0 if x[c] == -1.0 else _sigmoid((x[c] - 1 / 255 - mu) / s)
      assert upper - lower > 1e-5  # not openai's tiny-mass approximation
      mass *= upper - lower
    total += pi[comp] * mass
  return -math.log(total)


@pytest.mark.parametrize('channels', [1, 3])
def test_nll_matches_a_brute_force_numpy_loop(channels):
  rng = np.random.default_rng(3 + channels)
  k, n = 3, 12
  net_out = _random_net_out(rng, n, channels, k, log_scale=(-0.5, 0.5))
  x = rng.choice(LEVELS, (n, channels))
  x[0], x[1] = -1.0, 1.0  # the edge bins
  got = -np.asarray(log_prob(jnp.asarray(x, jnp.float32), net_out, k))
  want = [_brute_force_nll(x[i], net_out[i], k) for i in range(n)]
  np.testing.assert_allclose(got, want, rtol=2e-5)


# ----------------------------------------------------------- the sampler --


def test_sampling_a_degenerate_mixture_returns_its_mean():
  """One component wins every Gumbel-max (a logit 40 above the others,
  Gumbel noise in [-2.5, 11.6] for u in [1e-5, 1 - 1e-5]); its scale is
  the smallest, e^-7, so each channel lands within |logit u| e^-7 <=
  11.52 e^-7 plus half a bin (the rounding) of its coupled mean, and on
  the mean's level in >= 97 % of draws (|logistic| < 4.29)."""
  n, k = 4000, 3
  mu = np.array([-0.2, 0.6, 0.1])  # the winner's raw means (r, g, b)
  raw_coeff = np.array([0.8, -0.5, 1.2])  # its alpha, beta, gamma = tanh
  rest = np.zeros((3, 3 * k))  # per channel: K means, log-scales, coeffs
  rest[:, :k] = [0.9, 0.0, -0.9]  # the losers' means, far from mu
  rest[:, 1] = mu
  rest[:, k:2 * k] = [1.0, -20.0, 1.0]  # -20: clamped to -7
  rest[:, 2 * k + 1] = raw_coeff
  out = np.concatenate([[0.0, 40.0, -3.0], rest.reshape(-1)])
  x = np.asarray(sample(jnp.asarray(np.broadcast_to(out, (n, out.size)),
                                       jnp.float32),
                           jax.random.key(4), 3, k), np.float64)
  assert x.shape == (n, 3) and _on_grid(x)
  a, b, c = np.tanh(raw_coeff)
  want = np.stack([np.full(n, mu[0]), mu[1] + a * x[:, 0],
                   mu[2] + b * x[:, 0] + c * x[:, 1]], axis=-1)
  bound = 11.52 * math.exp(-7) + 1 / 255 + 1e-6
  assert np.max(np.abs(x - want)) <= bound
  # Red's mean -0.2 is a level's centre: most draws land exactly on it.
  assert np.mean(np.abs(x[:, 0] + 0.2) < 1e-6) > 0.95
  # One channel, one component: the plain logistic.
  one = sample(jnp.full((n, 3), jnp.asarray([0.0, 0.3, -20.0])),
                  jax.random.key(5), 1, 1)
  assert np.max(np.abs(np.asarray(one) - 0.3)) <= bound


def test_sample_frequencies_match_the_likelihood():
  """Draws of a grey 2-component mixture fall in each of the 256 levels as
  often as exp(log_prob) says (within 5 standard errors); for RGB the
  sampled E[r], E[g], E[r g] match the exact ones summed over p(r, g)."""
  n = 40_000
  net_out = jnp.asarray([[0.3, -0.4, -0.5, 0.4, -2.0, -1.5]])  # K = 2
  draws = np.asarray(sample(jnp.broadcast_to(net_out, (n, 6)),
                               jax.random.key(6), 1, 2))[:, 0]
  counts = np.bincount(np.round((draws + 1) * 127.5).astype(int),
                       minlength=256) / n
  p = np.exp(np.float64(log_prob(
      jnp.asarray(LEVELS, jnp.float32)[:, None], net_out, 2)))
  assert abs(p.sum() - 1) < 1e-5 and p.max() > 0.02
  np.testing.assert_array_less(np.abs(counts - p),
                               5 * np.sqrt(p * (1 - p) / n) + 2e-4)

  rgb = jnp.asarray(_random_net_out(np.random.default_rng(7), 1, 3, 2,
                                    log_scale=(-2.5, -1.0)))
  xs = np.asarray(sample(jnp.broadcast_to(rgb, (n, rgb.shape[1])),
                            jax.random.key(8), 3, 2), np.float64)
  r, g = np.meshgrid(LEVELS, LEVELS, indexing='ij')
  x = jnp.asarray(np.stack([r, g, np.zeros_like(r)], -1), jnp.float32)
  p_rg = np.exp(np.float64(marginal_log_probs(x, rgb[0], 2)[..., 1]))
  assert abs(p_rg.sum() - 1) < 1e-4
  for f in (lambda r, g: r, lambda r, g: g, lambda r, g: r * g):
    exact = np.sum(p_rg * f(r, g))
    sampled = f(xs[:, 0], xs[:, 1])
    assert abs(sampled.mean() - exact) < 5 * sampled.std() / math.sqrt(n)


def test_learning_rate_decays_every_step():
  config = pixelcnn_config()  # lr 1e-3, 2 warm-up steps, decay 0.99
  fn = decayed_learning_rate(config.optim, 0.99)
  for step in (0, 1, 2, 7, 100):
    np.testing.assert_allclose(
        float(fn(jnp.asarray(step))),
        1e-3 * min(1.0, step / 2) * 0.99 ** step, rtol=1e-5)


# ------------------------------------------------------------- the loop --


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """4 steps straight (with sample grids), and 2 then 2 more resumed."""
  root = tmp_path_factory.mktemp('pixelcnn')
  config = pixelcnn_config(**{'sample_grid.every_steps': 2})
  mesh = one_device()
  full = jax.device_get(run_train(config, str(root / 'a'), mesh))
  half = jax.device_get(run_train(pixelcnn_config(num_train_steps=2),
                                  str(root / 'b'), mesh))
  resumed = jax.device_get(run_train(pixelcnn_config(), str(root / 'b'),
                                     mesh))
  return config, root, full, half, resumed


def test_resume_two_plus_two_is_bitwise_four_straight(trained):
  _, root, full, half, resumed = trained
  assert int(full.step) == int(resumed.step) == 4 and int(half.step) == 2
  jax.tree.map(np.testing.assert_array_equal, resumed, full)  # every leaf
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(half.params), jax.tree.leaves(full.params))]
  assert all(changed)  # every parameter trained
  assert sorted(p.name for p in (root / 'a' / 'samples').iterdir()) == [
      'ema_step_00000002.png', 'ema_step_00000004.png']


def test_eval_writes_the_exact_bits_per_dim(trained):
  """Eval mode's bits/dim equals -sum log p / (64 ln 2) of the 300 test
  digits recomputed here on one device in one batch."""
  config, root, *_ = trained
  workdir = str(root / 'b')
  metrics = run_eval(config, workdir, one_device())
  written = json.loads((root / 'b' / 'eval' / 'step_00000004' /
                        'metrics.json').read_text())
  assert written['total_bpd'] == metrics['total_bpd']
  exp = experiment.build(config, one_device(), mode='eval')
  params, _ = load_sample_params(exp, workdir)
  batches = [jax.device_get(b) for b in exp.eval_iterator('test')]
  x = np.concatenate([b['images'][b['mask'] > 0] for b in batches])
  assert len(x) == 300 and _on_grid(x)
  net_out = jax.jit(lambda p, v: exp.method.network.apply(
      {'params': p}, v, train=False))(params, x)
  nats = -np.sum(np.float64(log_prob(x, net_out, 2)), axis=(1, 2))
  np.testing.assert_allclose(metrics['total_bpd'],
                             np.mean(nats / (64 * math.log(2))), rtol=1e-5)
  assert 0.5 < metrics['total_bpd'] < 12  # 8: uniform over 256 levels


def test_sample_mode_draws_8_bit_images(trained):
  config, root, *_ = trained
  workdir = str(root / 'b')
  out = run_sample(config, workdir, one_device())
  images = np.load(f'{out}/samples.npz')['images']
  assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
  assert len(np.unique(images)) > 2  # not a constant image
  exp = experiment.build(config, one_device(), mode='sample')
  assert exp.method.network_calls() == 64
  params, _ = load_sample_params(exp, workdir)
  x = exp.jit_sample_fn()(params, exp.sample_noise(8, 1000),
                          exp.sample_rng(1000))
  assert x.shape == (8, 8, 8, 1) and _on_grid(x)
  np.testing.assert_array_equal(  # the loop's first batch: these images
      images[:8], np.round((np.asarray(x) + 1) * 127.5).astype(np.uint8))


# ---------------------------------------------------------------- config --


@pytest.mark.parametrize('name, shape, calls', [
    ('digits_pixelcnn', (8, 8, 1), 64), ('cifar10_pixelcnn', (32, 32, 3),
                                         1024)])
def test_pixelcnn_configs_build(name, shape, calls):
  config = importlib.import_module(f'configs.{name}').get_config()
  for mode in ('train', 'sample', 'eval'):
    exp = experiment.build(config, parallel.create_mesh(), mode=mode)
  assert exp.method.image_shape == shape
  assert exp.method.network_calls() == calls


@pytest.mark.parametrize('overrides, match', [
    ({'pixelcnn.nr_logistic_mix': 0}, r'config.pixelcnn.nr_logistic_mix=0'),
    ({'pixelcnn.nr_resnet': 0}, r'config.pixelcnn.nr_resnet=0'),
    ({'pixelcnn.num_resolutions': 5},
     r'config.data.image_size=8 is not divisible by 16.*num_resolutions=5'),
    ({'data.channels': 2}, r'config.data.channels=2.*use 1 or 3'),
    ({'model.num_classes': 10}, r'config.model.num_classes=10.*set it to 0'),
    ({'pixelcnn.dropout': 1.0}, r'config.pixelcnn.dropout=1.0'),
    ({'pixelcnn.lr_decay': 0.0}, r'config.pixelcnn.lr_decay=0.0'),
])
def test_bad_pixelcnn_values_fail_at_build_with_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiment.build(pixelcnn_config(**overrides))
