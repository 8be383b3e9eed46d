"""Schedules, forward process, posterior, loss and sampler against
independent numpy/closed-form math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules

T = 1000


@pytest.fixture(scope='module')
def schedule():
  return schedules.Schedule.from_betas(schedules.linear_betas(T, 1e-4, 0.02))


def test_linear_betas_match_paper():
  betas = schedules.linear_betas(T, 1e-4, 0.02)
  assert betas.shape == (T,)
  np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02])
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1))


def test_cosine_betas_follow_abar_formula():
  betas = schedules.cosine_betas(T)
  f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  abar = np.cumprod(1 - betas)
  t = np.arange(1, T + 1)
  # Exact until the clipping at 0.999 bites in the last steps.
  np.testing.assert_allclose(abar[:-5], (f(t) / f(0))[:-5], rtol=1e-9)
  assert betas.max() == pytest.approx(0.999)


def test_unknown_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match='config.diffusion.beta_schedule'):
    schedules.get_betas('quadratic', 10)


def test_derived_quantities_match_numpy(schedule):
  betas = np.linspace(1e-4, 0.02, T)
  abar = np.cumprod(1 - betas)
  np.testing.assert_allclose(schedule.alphas_cumprod, abar, rtol=1e-6)
  np.testing.assert_allclose(schedule.alphas_cumprod_prev[1:], abar[:-1],
                             rtol=1e-6)
  assert schedule.alphas_cumprod_prev[0] == 1.0
  # The paper: abar_T is ~4e-5, so x_T is almost pure noise.
  assert 1e-5 < abar[-1] < 1e-4


def test_forward_process_moments(schedule):
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, size=(1, 4, 4, 1)).astype(np.float32)
  t = np.array([0, 250, 999])
  x0b = np.repeat(x0, 3, axis=0)
  noise = jax.random.normal(jax.random.key(1), (20000, 3, 4, 4, 1))
  xt = jax.vmap(lambda n: denoiser.q_sample(schedule, x0b, t, n))(noise)
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t].reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(xt.mean(0), np.sqrt(abar) * x0b, atol=0.03)
  np.testing.assert_allclose(xt.var(0), np.broadcast_to(1 - abar, x0b.shape),
                             rtol=0.05, atol=1e-6)
  mean, var = schedules.q_mean_variance(schedule, x0b, t)
  np.testing.assert_allclose(mean, np.sqrt(abar) * x0b, rtol=1e-5)
  np.testing.assert_allclose(var[:, 0, 0, 0], (1 - abar).ravel(), rtol=1e-5)


def test_posterior_matches_bayes_rule(schedule):
  """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): combine precisions."""
  betas = np.linspace(1e-4, 0.02, T)
  alphas, abar = 1 - betas, np.cumprod(1 - betas)
  t = np.array([1, 10, 500, 999])
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (4, 2, 2, 3))
  xt = rng.normal(size=(4, 2, 2, 3))
  a, ab_prev, b = alphas[t], abar[t - 1], betas[t]
  precision = a / b + 1 / (1 - ab_prev)
  var = 1 / precision
  r = lambda v: v.reshape(-1, 1, 1, 1)
  mean = r(var) * (r(np.sqrt(a) / b) * xt + r(np.sqrt(ab_prev) / (1 - ab_prev)) * x0)
  got_mean, got_var, got_logvar = schedules.q_posterior(
      schedule, jnp.float32(x0), jnp.float32(xt), t)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_var[:, 0, 0, 0], var, rtol=1e-4)
  np.testing.assert_allclose(got_logvar[:, 0, 0, 0], np.log(var), rtol=1e-4)


def test_x0_from_eps_inverts_forward(schedule):
  x0 = jax.random.uniform(jax.random.key(0), (5, 3, 3, 1), minval=-1)
  eps = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 10, 100, 500, 999])
  xt = denoiser.q_sample(schedule, x0, t, eps)
  np.testing.assert_allclose(
      denoiser.to_x0_eps(schedule, 'eps', xt, t, eps)[0], x0, atol=2e-3)


def gaussian_eps_denoiser(schedule, mu, s2):
  """E[eps | x_t] for data x0 ~ N(mu, s2 I): the optimal eps-predictor."""
  def model_fn(x_t, t):
    ab = schedules.at(schedule.alphas_cumprod, t, x_t)
    return jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * mu) / (ab * s2 + 1 - ab)
  return model_fn


def gaussian_denoiser(schedule, mu, s2):
  """gaussian_eps_denoiser as the samplers take it: a denoiser.DenoiseFn."""
  return denoiser.make_denoiser(gaussian_eps_denoiser(schedule, mu, s2),
                                schedule, 'eps')


def test_loss_is_zero_for_an_oracle_and_matches_closed_form(schedule):
  x0 = jax.random.uniform(jax.random.key(0), (256, 4, 4, 1), minval=-1)

  def oracle(x_t, t):  # knows x0, so recovers eps exactly
    return ((x_t - schedules.at(schedule.sqrt_alphas_cumprod, t, x_t) * x0)
            / schedules.at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t))

  loss = losses.simple_loss(oracle, schedule, x0, jax.random.key(2))
  assert float(loss) < 1e-4
  # With the Bayes-optimal denoiser on Gaussian data, the expected loss is
  # E_t[Var(eps | x_t)] = E_t[abar s2 / (abar s2 + 1 - abar)].
  mu, s2 = 0.3, 0.25
  xg = mu + np.sqrt(s2) * jax.random.normal(jax.random.key(3), (4096, 4, 4, 1))
  loss = losses.simple_loss(gaussian_eps_denoiser(schedule, mu, s2),
                            schedule, xg, jax.random.key(4))
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
  expected = np.mean(abar * s2 / (abar * s2 + 1 - abar))
  assert float(loss) == pytest.approx(expected, rel=0.05)
  # A model that predicts 0 pays E[eps^2] = 1.
  zero = losses.simple_loss(lambda x, t: jnp.zeros_like(x), schedule, xg,
                            jax.random.key(4))
  assert float(zero) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize('variance', ['beta', 'beta_tilde'])
def test_ancestral_sampler_with_analytic_denoiser(schedule, variance):
  """For Gaussian data the unclipped sampler is linear-Gaussian: its output
  mean/variance follow an exact numpy recursion, which must end near the data
  distribution N(mu, s2)."""
  mu, s2 = 0.3, 0.25
  betas = np.linspace(1e-4, 0.02, T)
  alphas, abar = 1 - betas, np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  beta_tilde = betas * (1 - abar_prev) / (1 - abar)
  sigma2 = (np.append(beta_tilde[1], betas[1:]) if variance == 'beta'
            else np.append(beta_tilde[1], beta_tilde[1:]))
  m, v = 0.0, 1.0
  for t in range(T - 1, -1, -1):
    # eps_hat = k (x - sqrt(ab) mu); x_{t-1} = (x - b/sqrt(1-ab) eps_hat)/sqrt(a)
    k = np.sqrt(1 - abar[t]) / (abar[t] * s2 + 1 - abar[t])
    c = betas[t] / np.sqrt(1 - abar[t])
    A = (1 - c * k) / np.sqrt(alphas[t])
    B = c * k * np.sqrt(abar[t]) * mu / np.sqrt(alphas[t])
    m, v = A * m + B, A * A * v + (sigma2[t] if t > 0 else 0.0)
  assert m == pytest.approx(mu, abs=0.01) and v == pytest.approx(s2, rel=0.05)

  x_T = jax.random.normal(jax.random.key(0), (2048, 4, 4, 1))
  sample = jax.jit(lambda x, r: samplers.ddpm_sample(
      gaussian_denoiser(schedule, mu, s2), schedule, x, r,
      variance=variance, clip_denoised=False))
  out = np.asarray(sample(x_T, jax.random.key(1)))
  n = out.size
  assert abs(out.mean() - m) < 4 * np.sqrt(v / n)
  assert out.var() == pytest.approx(v, rel=4 * np.sqrt(2 / n))
  # Same x_T and rng: the same images.
  np.testing.assert_array_equal(out, sample(x_T, jax.random.key(1)))
  assert not np.allclose(out, sample(x_T, jax.random.key(2)))


def test_sampler_clips_x0_prediction(schedule):
  # A model predicting huge noise drives x0_hat far outside [-1, 1]; with
  # clipping the samples stay in range (the last step's mean is x0_hat).
  huge = denoiser.make_denoiser(lambda x, t: 100.0 * jnp.ones_like(x),
                                schedule, 'eps')
  out = samplers.ddpm_sample(huge, schedule, jnp.zeros((2, 2, 2, 1)),
                             jax.random.key(0))
  assert np.all(np.abs(np.asarray(out)) <= 1.0 + 1e-6)


def test_unknown_sampler_variance():
  small = schedules.Schedule.from_betas(schedules.linear_betas(3))
  with pytest.raises(ValueError, match='sampler_variance'):
    samplers.ddpm_sample(denoiser.make_denoiser(lambda x, t: x, small, 'eps'),
                         small, jnp.zeros((1, 2, 2, 1)), jax.random.key(0),
                         variance='learned')


def test_sampler_returns_x0_predictions_at_requested_steps(schedule):
  """x0_at must return exactly the x0_hat the loop computed at those steps:
  recompute them by replaying the same chain step by step."""
  small = schedules.Schedule.from_betas(schedules.linear_betas(6, 0.1, 0.3))
  denoise_fn = gaussian_denoiser(small, 0.2, 0.5)
  x_T = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  rng = jax.random.key(7)
  final, preds = samplers.ddpm_sample(denoise_fn, small, x_T, rng,
                                      x0_at=(5, 2, 0))
  np.testing.assert_array_equal(
      final, samplers.ddpm_sample(denoise_fn, small, x_T, rng))
  assert preds.shape == (3, 3, 2, 2, 1)
  x, replay = x_T, {}
  for t_index in range(5, -1, -1):
    t = jnp.full((3,), t_index)
    mean, log_var, x0_hat = samplers.p_mean_variance(denoise_fn, small, x, t)
    replay[t_index] = x0_hat
    z = jax.random.normal(jax.random.fold_in(rng, t_index), x.shape)
    x = mean + (t_index > 0) * jnp.exp(0.5 * log_var) * z
  for k, t_index in enumerate((5, 2, 0)):
    np.testing.assert_allclose(preds[k], replay[t_index], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(preds[2], final, atol=1e-6)  # last x0_hat is x_0
  with pytest.raises(ValueError, match='x0_at'):
    samplers.ddpm_sample(denoise_fn, small, x_T, rng, x0_at=(6,))
