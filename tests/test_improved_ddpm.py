"""Improved DDPM (Nichol & Dhariwal 2021): learned-range variance, the
hybrid and vlb objectives, importance sampling of t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import likelihood
from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules
from tests.test_diffusion_math import gaussian_eps_denoiser

MU, S2 = 0.3, 0.25


@pytest.fixture(scope='module')
def schedule():
  return schedules.Schedule.from_betas(schedules.cosine_betas(1000))


def optimal_learned_model(schedule, mu, s2):
  """For data N(mu, s2 I) the reverse step p(x_{t-1} | x_t) is exactly
  Gaussian: mean c1 E[x0|x_t] + c2 x_t, variance beta~_t + c1^2 Var(x0|x_t).
  Returns the denoiser of the 2C-channel network (eps, v) that outputs that
  variance through the learned-range interpolation, computed in float64
  numpy."""
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  betas = np.asarray(schedule.betas, np.float64)
  abar_prev = np.append(1.0, abar[:-1])
  c1 = betas * np.sqrt(abar_prev) / (1 - abar)
  var_x0 = s2 * (1 - abar) / (abar * s2 + 1 - abar)
  true_var = betas * (1 - abar_prev) / (1 - abar) + c1 ** 2 * var_x0
  lo = np.asarray(schedule.posterior_log_variance_clipped, np.float64)
  frac = (np.log(true_var) - lo) / (np.log(betas) - lo)
  v = jnp.asarray(2 * frac - 1, jnp.float32)
  eps_fn = gaussian_eps_denoiser(schedule, mu, s2)
  network_fn = lambda x, t: jnp.concatenate(
      [eps_fn(x, t), jnp.broadcast_to(schedules.at(v, t, x), x.shape)], -1)
  return denoiser.make_denoiser(network_fn, schedule, 'eps')


def test_learned_variance_interpolates_between_beta_tilde_and_beta(schedule):
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
  t = jnp.array([1, 10, 500, 999])
  eps_fn = lambda x, t: 0.1 * x
  eps = denoiser.make_denoiser(eps_fn, schedule, 'eps')
  with_v = lambda value: denoiser.make_denoiser(lambda x, t: jnp.concatenate(
      [eps_fn(x, t), jnp.full_like(x, value)], -1), schedule, 'eps')
  for value, fixed in ((1.0, 'beta'), (-1.0, 'beta_tilde')):
    mean, log_var, _ = samplers.p_mean_variance(
        with_v(value), schedule, x, t, variance='learned', clip_denoised=False)
    mean_f, log_var_f, _ = samplers.p_mean_variance(
        eps, schedule, x, t, variance=fixed, clip_denoised=False)
    np.testing.assert_allclose(mean, mean_f, rtol=1e-6)
    np.testing.assert_allclose(log_var, np.broadcast_to(log_var_f, x.shape),
                               rtol=1e-5)
  # Halfway: the geometric mean of the two variances.
  _, log_var, _ = samplers.p_mean_variance(
      with_v(0.0), schedule, x, t, variance='learned', clip_denoised=False)
  betas = np.asarray(schedule.betas)[np.asarray(t)]
  lo = np.asarray(schedule.posterior_log_variance_clipped)[np.asarray(t)]
  np.testing.assert_allclose(log_var[:, 0, 0, 0], (np.log(betas) + lo) / 2,
                             rtol=1e-5)
  with pytest.raises(ValueError, match='learned'):
    samplers.p_mean_variance(eps, schedule, x, t, variance='learned')


def test_learned_optimal_variance_samples_exactly_with_few_steps(schedule):
  """With 10 respaced steps the fixed variances miss the data variance, the
  learned (here: the true reverse) variance hits it within sampling error."""
  ts = samplers.spaced_timesteps(1000, 10)
  spaced, _ = samplers.respace(schedule, ts)
  x_T = jax.random.normal(jax.random.key(0), (8192, 2, 1, 1))
  run = lambda model, variance: np.asarray(jax.jit(
      lambda x: samplers.ddpm_sample(model, spaced, x, jax.random.key(1),
                                     variance=variance, clip_denoised=False)
  )(x_T))
  learned = run(optimal_learned_model(spaced, MU, S2), 'learned')
  se_var = S2 * np.sqrt(2 / learned.size)
  assert abs(learned.mean() - MU) < 4 * np.sqrt(S2 / learned.size)
  assert abs(learned.var() - S2) < 4 * se_var
  for fixed in ('beta', 'beta_tilde'):
    off = run(denoiser.make_denoiser(gaussian_eps_denoiser(spaced, MU, S2),
                                     spaced, 'eps'), fixed)
    assert abs(off.var() - S2) > 10 * se_var


def _learned_output(schedule, x0, t, noise, v_value):
  """A fixed 2C output: a noisy eps guess and a constant v."""
  eps_guess = noise + 0.3 * jnp.sin(3.0 * x0)
  return eps_guess, jnp.concatenate(
      [eps_guess, jnp.full_like(x0, v_value)], -1)


@pytest.mark.parametrize('v_value,fixed', [(1.0, 'beta'), (-1.0, 'beta_tilde')])
def test_hybrid_and_vlb_losses_equal_mse_plus_the_bound_term(schedule, v_value,
                                                             fixed):
  k = jax.random.split(jax.random.key(0), 2)
  x0 = jnp.round(jax.random.uniform(k[0], (6, 4, 4, 1), minval=-1) * 127.5
                 ) / 127.5
  noise = jax.random.normal(k[1], x0.shape)
  t = jnp.array([0, 1, 5, 100, 600, 999])
  eps_guess, out = _learned_output(schedule, x0, t, noise, v_value)
  model_fn = lambda x, t_: out
  x_t = denoiser.q_sample(schedule, x0, t, noise)
  term, _ = likelihood.vlb_term_bpd(
      denoiser.make_denoiser(lambda x, t_: eps_guess, schedule, 'eps'),
      schedule, x0, x_t, t, variance=fixed, clip_denoised=False)
  mse = jnp.mean(jnp.square(noise - eps_guess).reshape(6, -1), axis=1)
  hybrid = losses.per_example_loss('hybrid', 'eps')(model_fn, schedule, x0, t,
                                                    noise)
  vlb = losses.per_example_loss('vlb', 'eps')(model_fn, schedule, x0, t,
                                              noise)
  # 'beta' differs from the learned v = 1 only at t = 0 (the DDPM code's
  # sigma_1^2 = beta~_2 there): compare t > 0 for it.
  keep = slice(1, None) if fixed == 'beta' else slice(None)
  np.testing.assert_allclose(hybrid[keep], (mse + 1.0 * term)[keep], rtol=1e-5)
  np.testing.assert_allclose(vlb[keep], (1000 * term)[keep], rtol=1e-5)


def test_hybrid_stops_the_gradient_of_the_bound_at_the_mean(schedule):
  k = jax.random.split(jax.random.key(1), 2)
  x0 = jax.random.uniform(k[0], (4, 2, 2, 1), minval=-1)
  noise = jax.random.normal(k[1], x0.shape)
  t = jnp.array([0, 3, 300, 900])
  _, out = _learned_output(schedule, x0, t, noise, 0.2)

  def loss(name, out):
    return jnp.mean(losses.per_example_loss(name, 'eps')(
        lambda *_: out, schedule, x0, t, noise))

  grad = jax.grad(lambda o: loss('hybrid', o))(out)
  mse_grad = jax.grad(lambda o: jnp.mean(jnp.square(noise - o[..., :1])))(out)
  np.testing.assert_allclose(grad[..., :1], mse_grad[..., :1], rtol=1e-5,
                             atol=1e-9)
  assert float(jnp.abs(grad[..., 1:]).min()) > 0  # the bound trains v
  vlb_grad = jax.grad(lambda o: loss('vlb', o))(out)
  assert float(jnp.abs(vlb_grad[..., :1]).max()) > 0  # vlb trains the mean


class ReferenceResampler:
  """improved DDPM's loss-second-moment resampler, one example at a time."""

  def __init__(self, num_t, history=10, uniform_prob=1e-3):
    self.values = np.zeros((num_t, history))
    self.counts = np.zeros(num_t, int)
    self.history, self.uniform_prob = history, uniform_prob

  def probs(self):
    if not (self.counts == self.history).all():
      return np.full(len(self.counts), 1 / len(self.counts))
    w = np.sqrt(np.mean(self.values ** 2, axis=-1))
    w = w / w.sum() * (1 - self.uniform_prob)
    return w + self.uniform_prob / len(w)

  def update(self, ts, values):
    for t, value in zip(ts, values):
      if self.counts[t] == self.history:
        self.values[t, :-1] = self.values[t, 1:]
        self.values[t, -1] = value
      else:
        self.values[t, self.counts[t]] = value
        self.counts[t] += 1


def test_importance_sampler_matches_the_reference_and_is_unbiased():
  num_t = 5
  sampler = losses.ImportanceSampler(num_t, history=3)
  ref = ReferenceResampler(num_t, history=3)
  state = sampler.init()
  rng = np.random.default_rng(0)
  update = jax.jit(sampler.update)
  for i in range(8):
    np.testing.assert_allclose(sampler.probs(state), ref.probs(), rtol=1e-5)
    ts = rng.integers(0, num_t, 6)  # repeats within a batch included
    values = rng.exponential(size=6) * (1 + ts)
    state = update(state, jnp.asarray(ts, jnp.int32), jnp.float32(values))
    ref.update(ts, values)
    if i == 0:
      assert not (ref.counts == 3).all()
  assert (ref.counts == 3).all()  # warm: non-uniform by now
  np.testing.assert_allclose(state.values, ref.values, rtol=1e-6)
  probs = np.asarray(sampler.probs(state))
  np.testing.assert_allclose(probs, ref.probs(), rtol=1e-5)
  assert probs[-1] > 2 * probs[0]  # larger losses at larger t drawn more
  # Unbiased: E_{t~p}[w_t L_t] = mean_t L_t for any per-t loss L.
  per_t = rng.normal(size=num_t)
  weights = np.asarray(sampler.weights(jnp.asarray(probs), jnp.arange(num_t)))
  assert np.sum(probs * weights * per_t) == pytest.approx(per_t.mean(),
                                                          rel=1e-5)
  # The draw follows p.
  t, _ = losses.draw_t_and_noise(None, jnp.zeros((20000, 1)),
                                 jax.random.key(0), jnp.asarray(probs))
  np.testing.assert_allclose(np.bincount(np.asarray(t), minlength=num_t)
                             / 20000, probs, atol=0.015)


@pytest.mark.parametrize('overrides,match', [
    ({'diffusion.loss': 'hybrid'}, 'learned'),
    ({'diffusion.sampler_variance': 'learned'}, 'learned'),
    ({'diffusion.time_sampling': 'importance'}, 'importance'),
    ({'diffusion.time_sampling': 'logit_normal'}, 'continuous'),
    ({'diffusion.prediction': 'velocity'}, 'continuous'),
])
def test_config_mismatches_fail_early(overrides, match):
  from tests.util import tiny_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=match):
    losses.check_config(tiny_config(**overrides).diffusion)
