"""The VAE method against independent math, and through the loop.

The KL against its closed form in numpy and a Monte Carlo estimate; both
discretised decoders against scipy's CDFs, their 256 bin probabilities
summing to one and their mean against the brute-force sum; the importance-
weighted bound on a linear-Gaussian model whose log p(x), posterior and
ELBO are known in closed form (exact at every k with the true posterior,
falling towards log p(x) as k grows with a wrong one); the loss against the
negative ELBO written out in numpy; training resumed 2 + 2 equal to 4
straight; eval mode's bits/dim; samples; bad config values named.
"""

import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from diffusion_jax import experiment, parallel
from diffusion_jax.generate import load_sample_params
from diffusion_jax.methods import vae as vae_method
from tests.util import run_eval, run_sample, run_train, tiny_config

# One level (f = 1), a 8x8x2 latent: compiling the init and the train step
# dominates this file's time. kl_warmup_steps = 3 makes beta differ at
# every step of the resumed run (0, 1/3, 2/3, 1).
TINY = {'method': 'vae', 'vae.widths': (8,), 'vae.norm_groups': 4,
        'vae.latent_shape': (8, 8, 2), 'vae.eval_importance_samples': 4,
        'vae.kl_warmup_steps': 3, 'optim.learning_rate': 1e-3}

GRID = -1.0 + 2.0 * np.arange(256) / 255.0  # the 8-bit values on [-1, 1]


def vae_config(**overrides):
  return tiny_config(**{**TINY, **overrides})


def one_device():
  return parallel.create_mesh(jax.devices()[:1])


def _digit_like(n, seed=0, shape=(8, 8, 1)):
  """8-bit images on [-1, 1], half of the pixels at the edge bins."""
  rng = np.random.default_rng(seed)
  k = np.where(rng.random((n, *shape)) < 0.5, rng.choice([0, 255], (n, *shape)),
               rng.integers(0, 256, (n, *shape)))
  return (-1.0 + 2.0 * k / 255.0).astype(np.float32)


# ------------------------------------------------------------------ math --


def test_kl_matches_closed_form_and_monte_carlo():
  rng = np.random.default_rng(0)
  mean = rng.normal(0, 1, (3, 2, 2, 2)).astype(np.float32)
  logvar = rng.normal(0, 1, (3, 2, 2, 2)).astype(np.float32)
  got = np.asarray(vae_method.gaussian_kl(mean, logvar))
  # KL(N(m, s^2) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2 per dimension.
  m, s = mean.astype(np.float64), np.exp(0.5 * logvar.astype(np.float64))
  want = np.sum(-np.log(s) + 0.5 * (s ** 2 + m ** 2) - 0.5, axis=(1, 2, 3))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Monte Carlo E_q[log q(z) - log p(z)] over 200k draws, per example.
  z = m[None] + s[None] * rng.normal(0, 1, (200_000, *m.shape))
  log_ratio = np.sum(stats.norm.logpdf(z, m, s) - stats.norm.logpdf(z),
                     axis=(2, 3, 4))
  mc, se = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(len(log_ratio))
  assert np.all(np.abs(mc - got) < 4 * se), (mc, got, se)
  assert np.all(se < 0.02 * got)  # the check has teeth


def _bin_edges():
  """Lower and upper edge of every 8-bit bin, edge bins open."""
  lo, hi = GRID - 1 / 255, GRID + 1 / 255
  lo[0], hi[-1] = -np.inf, np.inf
  return lo, hi


def _bin_probability(decoder, lo, hi, loc, scale):
  """F(hi) - F(lo) in float64 with scipy's CDFs. A bin above the location
  is reflected (F(b) - F(a) = F(-a) - F(-b)): both CDFs are then small, so
  the upper tail keeps its relative precision."""
  cdf = special.expit if decoder == 'logistic' else special.ndtr
  a, b = (lo - loc) / scale, (hi - loc) / scale
  return np.where(a > 0, cdf(-a) - cdf(-b), cdf(b) - cdf(a))


@pytest.mark.parametrize('decoder', vae_method.DECODERS)
def test_decoder_bin_probabilities_match_scipy_and_sum_to_one(decoder):
  loc = np.array([-1.5, -1.0, -0.37, 0.0, 0.004, 0.9, 1.0, 2.0])
  log_scale = np.array([-12.0, -7.0, -4.0, -2.0, 0.0, 1.5])  # -12: floored
  x = GRID[:, None, None].astype(np.float32)
  log_p = np.asarray(vae_method.decoder_log_prob(
      decoder, x, loc[None, :, None].astype(np.float32),
      log_scale[None, None, :].astype(np.float32)), np.float64)
  assert log_p.shape == (256, 8, 6) and np.all(log_p <= 0)
  assert np.all(np.isfinite(log_p))
  # float64 CDF differences from scipy, the scale floored at e^-7. float32
  # rounding of the bin edges (~3e-8), times 1/s <= e^7, moves a bin's
  # probability by up to ~1e-5: the tolerance.
  s = np.exp(np.maximum(log_scale, vae_method.MIN_LOG_SCALE))[None, None, :]
  lo, hi = (e[:, None, None] for e in _bin_edges())
  want = _bin_probability(decoder, lo, hi, loc[None, :, None], s)
  np.testing.assert_allclose(np.exp(log_p), want, atol=2e-5)
  # Where scipy's probability is representable, the log agrees closely.
  big = want > 1e-30
  np.testing.assert_allclose(log_p[big], np.log(want[big]), rtol=1e-3,
                             atol=1e-4)
  np.testing.assert_allclose(np.exp(log_p).sum(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize('decoder', vae_method.DECODERS)
def test_discretized_mean_is_the_sum_over_the_bins(decoder):
  loc = np.linspace(-1.6, 1.6, 9, dtype=np.float32)[:, None]
  log_scale = np.array([[-7.0, -3.0, -1.0, 0.5, 2.0]], np.float32)
  got = np.asarray(vae_method.discretized_mean(decoder, loc, log_scale))
  probs = np.exp(np.asarray(vae_method.decoder_log_prob(
      decoder, GRID[:, None, None].astype(np.float32), loc[None],
      log_scale[None]), np.float64))
  want = np.sum(GRID[:, None, None] * probs, axis=0)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.all(np.abs(got) <= 1.0)


class LinearGaussian:
  """p(z) = N(0, I_2), p(x|z) = N(W z + b, sigma^2 I_3): p(x) = N(b,
  W W^T + sigma^2 I), the posterior N(Sigma W^T (x - b) / sigma^2, Sigma)
  with Sigma = (I + W^T W / sigma^2)^-1, and the ELBO of any Gaussian q in
  closed form."""
  b = np.array([0.2, -0.1, 0.5])
  sigma = 0.5

  def __init__(self, W):
    self.W = np.asarray(W, np.float64)
    self.cov = np.linalg.inv(np.eye(2) + self.W.T @ self.W / self.sigma ** 2)

  def posterior_mean(self, x):
    return (x - self.b) @ self.W @ self.cov / self.sigma ** 2

  def encoder(self, shift, var):
    """A jnp q(z|x) = N(posterior mean + shift, diag(var))."""
    gain = jnp.asarray(self.W @ self.cov / self.sigma ** 2, jnp.float32)
    logvar = jnp.asarray(np.log(var), jnp.float32)
    return lambda x: ((x - self.b) @ gain + shift,
                      jnp.broadcast_to(logvar, (x.shape[0], 2)))

  def log_px(self, x):
    return stats.multivariate_normal(
        self.b, self.W @ self.W.T + self.sigma ** 2 * np.eye(3)).logpdf(x)

  def elbo(self, x, mean, var):
    """E_q[log p(x|z)] - KL(q || p) for q = N(mean, diag(var))."""
    resid = x - mean @ self.W.T - self.b
    trace = np.sum(self.W ** 2 * var[None, :])  # tr(W diag(var) W^T)
    expected = (-1.5 * np.log(2 * np.pi * self.sigma ** 2)
                - (np.sum(resid ** 2, 1) + trace) / (2 * self.sigma ** 2))
    kl = 0.5 * np.sum(mean ** 2 + var - 1 - np.log(var), 1)
    return expected - kl

  def log_likelihood(self, x, z):
    """log p(x|z) in jnp, (B,)."""
    resid = x - z @ jnp.asarray(self.W.T, jnp.float32) - self.b
    return jnp.sum(-0.5 * jnp.square(resid / self.sigma)
                   - math.log(self.sigma) - 0.5 * math.log(2 * math.pi), 1)


def _iwae_nats(model, x, encode, k, seed=0):
  """importance_weighted_terms in nats (bits/dim times D ln 2, D = 3):
  total = -(the bound on log p(x)), elbo = -ELBO = recon + kl."""
  out = jax.jit(vae_method.importance_weighted_terms,
                static_argnums=(0, 1, 4))(
      encode, model.log_likelihood, jnp.asarray(x, jnp.float32),
      jax.random.key(seed), k)
  return {name.replace('_bpd', ''): np.asarray(v, np.float64) * 3 * math.log(2)
          for name, v in out.items()}


def test_importance_weighted_bound_is_exact_with_the_true_posterior():
  """Every weight is p(x) when q is the posterior (diagonal here: W's
  columns are orthogonal), so the bound is log p(x) at every k and equals
  the ELBO."""
  model = LinearGaussian([[1.2, 0.0], [0.0, 0.6], [0.0, 0.0]])
  x = np.random.default_rng(1).normal(0, 1.5, (64, 3))
  encode = model.encoder(0.0, np.diag(model.cov))
  terms = _iwae_nats(model, x, encode, 5)
  np.testing.assert_allclose(terms['total'], -model.log_px(x), atol=2e-4)
  np.testing.assert_allclose(terms['elbo'], -model.log_px(x), atol=2e-4)


def test_importance_weighted_bound_tightens_towards_log_px():
  """A wrong q (mean shifted, variance doubled, correlations ignored): the
  bound rises with k towards log p(x) (Burda et al. 2016 theorem 1), never
  below the ELBO of the same draws, whose mean is the closed-form ELBO."""
  model = LinearGaussian([[1.0, -0.5], [0.3, 0.8], [-0.7, 0.4]])
  x = np.random.default_rng(2).normal(0, 1.5, (256, 3))
  var = 2.0 * np.diag(model.cov)
  encode = model.encoder(0.4, var)
  nll = -model.log_px(x)
  gaps = []
  for k in (1, 3, 9, 64):
    terms = _iwae_nats(model, x, encode, k)
    assert np.all(terms['total'] <= terms['elbo'] + 1e-5)  # Jensen
    if k == 1:  # one weight: the bound is that draw's ELBO
      np.testing.assert_allclose(terms['total'], terms['elbo'], rtol=1e-6)
    np.testing.assert_allclose(terms['elbo'], terms['recon'] + terms['kl'],
                               atol=1e-4)
    gaps.append(np.mean(terms['total'] - nll))
    if k == 64:  # the mean of the same draws' ELBO: the closed form
      elbo = model.elbo(x, model.posterior_mean(x) + 0.4, var)
      np.testing.assert_allclose(np.mean(terms['elbo']), -np.mean(elbo),
                                 atol=0.05)
      np.testing.assert_allclose(np.mean(terms['kl']), np.mean(
          vae_method.gaussian_kl(*encode(x))), atol=0.05)
  gaps = np.array(gaps)
  # The wrong q costs ~1.2 nats at k = 1; the gap falls with k (by more
  # than its noise), and at k = 64 is ~0 (within the noise of 256 images).
  assert gaps[0] > 0.3, gaps
  assert np.all(np.diff(gaps) < 0), gaps
  assert -0.01 < gaps[-1] < 0.02 * gaps[0], gaps


def test_loss_is_the_negative_elbo_in_bits_per_dim():
  """negative_elbo_bpd against numpy: -sum log P(bin) (scipy's Gaussian
  CDF) + beta * KL, over D ln 2; beta from the warm-up schedule. The other
  options than the loop's: a flat latent, no GroupNorm, the Gaussian
  decoder."""
  config = vae_config(**{'vae.latent_shape': (6,), 'vae.norm_groups': 0,
                         'vae.decoder': 'gaussian'})
  method = experiment.build(config, one_device()).method
  params = jax.jit(method.init_params)(jax.random.key(0))
  # Random weights everywhere (the output conv starts at zero).
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(4)
  params = jax.tree.unflatten(tree, [
      p + rng.normal(0, 0.05, p.shape).astype(np.float32) for p in leaves])
  images = _digit_like(4)
  eps = np.random.default_rng(3).normal(0, 1, (4, 6)).astype(np.float32)
  loc, log_scale, mean, logvar = (np.asarray(a, np.float64) for a in
                                  jax.jit(method.model.apply)(
                                      {'params': params}, images, eps))
  assert mean.shape == (4, 6) and loc.shape == (4, 8, 8, 1)
  s = np.exp(np.maximum(log_scale, -7.0))
  k = np.rint((images + 1) * 127.5).astype(int)
  lo, hi = (e[k] for e in _bin_edges())
  recon = -np.sum(np.log(_bin_probability('gaussian', lo, hi, loc, s)),
                  axis=(1, 2, 3))
  kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=1)
  per_bit = 64 * np.log(2)
  for beta in (1.0, 0.25):
    np.testing.assert_allclose(
        jax.jit(method.negative_elbo_bpd)(params, images, eps, beta),
        (recon + beta * kl) / per_bit, rtol=1e-5)
  assert 1 < np.mean(recon) / per_bit < 50 and np.all(kl > 0.01)
  np.testing.assert_allclose(
      [method.kl_weight(jnp.asarray(t)) for t in range(5)],
      [0, 1 / 3, 2 / 3, 1, 1], rtol=1e-6)


# ------------------------------------------------------------- the loop --


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """4 steps straight, and 2 then 2 more resumed."""
  root = tmp_path_factory.mktemp('vae')
  config = vae_config()
  mesh = one_device()
  full = jax.device_get(run_train(config, str(root / 'a'), mesh))
  run_train(vae_config(num_train_steps=2), str(root / 'b'), mesh)
  resumed = jax.device_get(run_train(config, str(root / 'b'), mesh))
  return config, root, full, resumed


def test_resume_two_plus_two_is_bitwise_four_straight(trained):
  _, _, full, resumed = trained
  assert int(full.step) == int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, resumed, full)
  init = jax.device_get(experiment.build(trained[0], one_device())
                        .init_state())
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(full.params), jax.tree.leaves(init.params)))


def test_eval_writes_the_importance_weighted_bound(trained):
  config, root, *_ = trained
  workdir = str(root / 'b')
  metrics = run_eval(config, workdir, one_device())
  saved = json.loads((root / 'b' / 'eval' / 'step_00000004' /
                      'metrics.json').read_text())
  assert saved['total_bpd'] == metrics['total_bpd']
  assert metrics['num_images'] == 300
  for key in ('total_bpd', 'elbo_bpd', 'recon_bpd', 'kl_bpd', 'mse', 'psnr'):
    assert math.isfinite(metrics[key]), key
  # Jensen per image, so also on the mean; the terms add up; a near-
  # untrained decoder is worse than storing the bytes but not absurdly.
  assert metrics['total_bpd'] <= metrics['elbo_bpd']
  np.testing.assert_allclose(metrics['elbo_bpd'],
                             metrics['recon_bpd'] + metrics['kl_bpd'],
                             rtol=1e-5)
  assert 0 < metrics['kl_bpd'] and 1 < metrics['total_bpd'] < 20


def test_samples_are_images_in_range(trained):
  config, root, *_ = trained
  exp = experiment.build(config, one_device(), mode='sample')
  params, step = load_sample_params(exp, str(root / 'a'))
  assert step == 4
  noise = jax.random.normal(jax.random.key(5), exp.method.noise_shape(5))
  assert noise.shape == (5, 8, 8, 2)
  images = np.asarray(jax.jit(exp.method.sample)(params, noise, None))
  assert images.shape == (5, 8, 8, 1)
  assert np.all(np.isfinite(images)) and np.all(np.abs(images) <= 1.0)
  out = run_sample(config, str(root / 'a'))
  saved = np.load(f'{out}/samples.npz')
  arrays = [saved[name] for name in saved.files]
  assert any(a.shape == (12, 8, 8, 1) and a.dtype == np.uint8 for a in arrays)


# ---------------------------------------------------------------- config --


def test_digits_vae_config_builds_in_every_mode():
  config = importlib.import_module('configs.digits_vae').get_config()
  for mode in ('train', 'sample', 'eval'):
    exp = experiment.build(config, parallel.create_mesh(), mode=mode)
  assert exp.method.noise_shape(3) == (3, 4, 4, 4)
  assert exp.method.eval_importance_samples == 64


@pytest.mark.parametrize('overrides, match', [
    ({'vae.eval_importance_samples': 0},
     r'config.vae.eval_importance_samples=0 must be an integer >= 1'),
    ({'vae.decoder': 'bernoulli'}, r"config.vae.decoder='bernoulli': use one"),
    ({'vae.latent_shape': (4, 4, 2)},
     r'config.vae.latent_shape=\(4, 4, 2\).*set it to \(8, 8, 2\)'),
    ({'vae.widths': (8, 8, 8, 8, 8)},
     r'config.data.image_size=8 is not divisible by .* f=16'),
    ({'vae.latent_shape': (2, 2)}, r'config.vae.latent_shape=\(2, 2\) must'),
    ({'vae.norm_groups': 3}, r'config.vae.norm_groups=3 must divide'),
    ({'vae.kl_warmup_steps': -1}, r'config.vae.kl_warmup_steps=-1'),
    ({'model.num_classes': 10}, r'config.model.num_classes=10.*set it to 0'),
])
def test_bad_vae_values_fail_at_build_with_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiment.build(vae_config(**overrides))
