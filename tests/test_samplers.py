"""DDIM, respacing and prediction-target conversions, against cases with a
known answer (Gaussian data, where the optimal denoiser is analytic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules
from tests.test_diffusion_math import gaussian_denoiser
from tests.test_diffusion_math import gaussian_eps_denoiser

MU, S2 = 0.3, 0.25


@pytest.fixture(scope='module')
def schedule():
  return schedules.Schedule.from_betas(schedules.linear_betas(1000, 1e-4, 0.02))


def test_spaced_timesteps():
  np.testing.assert_array_equal(samplers.spaced_timesteps(1000, 0),
                                np.arange(999, -1, -1))
  ts = samplers.spaced_timesteps(1000, 50)
  assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
  assert np.all(np.diff(ts) < 0)


def test_conversions_between_eps_x0_v_and_score_are_exact(schedule):
  k = jax.random.split(jax.random.key(0), 2)
  x0 = jax.random.uniform(k[0], (4, 3, 3, 1), minval=-1)
  eps = jax.random.normal(k[1], x0.shape)
  t = jnp.array([0, 10, 500, 999])
  x_t = denoiser.q_sample(schedule, x0, t, eps)
  abar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1)
  # v = a eps - b x0 (Salimans & Ho 2022), a = sqrt(abar), b = sqrt(1 - abar).
  v = denoiser.target(schedule, 'v', x0, eps, t)
  np.testing.assert_allclose(v, np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0,
                             atol=1e-5)
  x0_from_v, eps_from_v = denoiser.to_x0_eps(schedule, 'v', x_t, t, v)
  np.testing.assert_allclose(eps_from_v, eps, atol=1e-5)
  np.testing.assert_allclose(x0_from_v, x0, atol=1e-5)
  eps_from_x0 = denoiser.to_x0_eps(schedule, 'x0', x_t, t, x0)[1]
  np.testing.assert_allclose(eps_from_x0, eps,
                             atol=2e-3)  # 1/sqrt(1 - abar_0) ~ 100 amplifies
  # Score of q(x_t | x0) = N(a x0, b^2): -(x_t - a x0) / b^2 = -eps / b.
  np.testing.assert_allclose(
      denoiser.score_from_eps(schedule, t, eps),
      -(x_t - np.sqrt(abar) * x0) / (1 - abar), rtol=1e-3, atol=1e-3)


def test_ddim_eta0_is_deterministic_and_converges_to_the_data(schedule):
  """eta = 0 discretises the probability-flow ODE: the output variance
  approaches s^2 as the number of steps grows (the error is O(1/steps))."""
  denoise_fn = gaussian_denoiser(schedule, MU, S2)
  x_T = jax.random.normal(jax.random.key(0), (4096, 2, 2, 1))
  variance_errors = []
  for num_steps in (20, 100, 1000):
    ts = samplers.spaced_timesteps(1000, num_steps)
    sample = jax.jit(lambda x, r, ts=ts: samplers.ddim_sample(
        denoise_fn, schedule, x, r, timesteps=ts, eta=0.0, clip_denoised=False))
    out = np.asarray(sample(x_T, jax.random.key(1)))
    np.testing.assert_array_equal(out, sample(x_T, jax.random.key(2)))
    assert abs(out.mean() - MU) < 4 * np.sqrt(S2 / out.size)
    variance_errors.append(abs(out.var() - S2))
  assert variance_errors[0] > variance_errors[1] > variance_errors[2]
  assert variance_errors[2] < 0.05 * S2


def test_ddim_inversion_recovers_the_noise(schedule):
  denoise_fn = gaussian_denoiser(schedule, MU, S2)
  x_T = jax.random.normal(jax.random.key(0), (64, 2, 2, 1))
  errors = []
  for num_steps in (100, 1000):  # the inversion error shrinks with the step
    ts = samplers.spaced_timesteps(1000, num_steps)
    x0 = samplers.ddim_sample(denoise_fn, schedule, x_T, jax.random.key(1),
                              timesteps=ts, clip_denoised=False)
    back = samplers.ddim_invert(denoise_fn, schedule, x0, timesteps=ts)
    errors.append(float(np.abs(np.asarray(back) - x_T).max()))
  assert errors[1] < 0.05 and errors[1] < errors[0] / 5


def test_ddim_eta1_over_all_steps_is_ddpm_with_beta_tilde(schedule):
  denoise_fn = gaussian_denoiser(schedule, MU, S2)
  x_T = jax.random.normal(jax.random.key(0), (8, 2, 2, 1))
  rng = jax.random.key(3)
  ddim = samplers.ddim_sample(denoise_fn, schedule, x_T, rng, eta=1.0,
                              clip_denoised=False)
  ddpm = samplers.ddpm_sample(denoise_fn, schedule, x_T, rng,
                              variance='beta_tilde', clip_denoised=False)
  np.testing.assert_allclose(ddim, ddpm, atol=2e-3)


def test_ddim_rejects_unordered_timesteps(schedule):
  identity = denoiser.make_denoiser(lambda x, t: x, schedule, 'eps')
  with pytest.raises(ValueError, match='decreasing'):
    samplers.ddim_sample(identity, schedule, jnp.zeros((1, 2, 2, 1)),
                         jax.random.key(0), timesteps=[0, 10])


def test_respaced_ddpm_with_all_steps_equals_the_full_sampler(schedule):
  denoise_fn = gaussian_denoiser(schedule, MU, S2)
  x_T = jax.random.normal(jax.random.key(0), (16, 2, 2, 1))
  rng = jax.random.key(5)
  full = samplers.ddpm_sample(denoise_fn, schedule, x_T, rng,
                              variance='beta_tilde', clip_denoised=False)
  spaced, t_map = samplers.respace(schedule, np.arange(1000))
  np.testing.assert_array_equal(t_map, np.arange(1000))
  np.testing.assert_allclose(spaced.betas, schedule.betas, rtol=2e-3)
  again = samplers.ddpm_sample(lambda x, i: denoise_fn(x, t_map[i]), spaced,
                               x_T, rng, variance='beta_tilde',
                               clip_denoised=False)
  np.testing.assert_allclose(again, full, atol=2e-3)


def test_respaced_ddpm_keeps_abar_and_samples_the_data(schedule):
  ts = samplers.spaced_timesteps(1000, 100)
  spaced, t_map = samplers.respace(schedule, ts)
  np.testing.assert_allclose(spaced.alphas_cumprod,
                             np.asarray(schedule.alphas_cumprod)[np.sort(ts)],
                             rtol=1e-5)
  # With 100 of 1000 steps the fixed variances no longer match the true
  # reverse variance: beta~ (the lower bound) undershoots s^2, beta (the upper
  # bound) overshoots it (Nichol & Dhariwal 2021, sec. 3.1); means are exact.
  out = {v: np.asarray(samplers.sample(
      gaussian_denoiser(schedule, MU, S2), schedule,
      jax.random.normal(jax.random.key(0), (4096, 2, 2, 1)),
      jax.random.key(1), sampler='ddpm', num_steps=100, variance=v,
      clip_denoised=False)) for v in ('beta_tilde', 'beta')}
  for v in out.values():
    assert abs(v.mean() - MU) < 0.01
  assert 0.8 * S2 < out['beta_tilde'].var() < S2 < out['beta'].var() < 1.3 * S2


def test_sampler_choice_errors(schedule):
  x = jnp.zeros((1, 2, 2, 1))
  identity = denoiser.make_denoiser(lambda x, t: x, schedule, 'eps')
  with pytest.raises(ValueError, match='config.sample.sampler'):
    samplers.sample(identity, schedule, x, jax.random.key(0),
                    sampler='euler')
  with pytest.raises(ValueError, match='sampler=ddpm'):
    samplers.sample(identity, schedule, x, jax.random.key(0),
                    sampler='ddim', x0_at=(3,))


@pytest.mark.parametrize('overrides', [
    {'sample.sampler': 'ddim', 'sample.num_steps': 5},
    {'sample.sampler': 'ddpm', 'sample.num_steps': 5}])
def test_config_selects_the_sampler_in_the_trainer(overrides):
  from diffusion_jax import experiment, parallel  # pylint: disable=g-import-not-at-top
  from tests.util import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(**overrides)
  exp = experiment.build(config, parallel.create_mesh(), mode='sample')
  params = exp.method.init_params(jax.random.key(0))
  fn = exp.jit_sample_fn()
  x_T = exp.sample_noise(8, 1)
  out = np.asarray(fn(params, x_T, jax.random.key(0)))
  assert out.shape == (8, 8, 8, 1) and np.isfinite(out).all()
  again = np.asarray(fn(params, x_T, jax.random.key(1)))
  stochastic = (config.sample.sampler == 'ddpm' or config.sample.ddim_eta > 0)
  assert np.array_equal(out, again) != stochastic


@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_each_prediction_target_trains_and_samples_consistently(
    schedule, prediction):
  """An oracle knowing x0 has zero loss for its target; the analytic Gaussian
  denoiser expressed in that target samples exactly as in eps form."""
  x0 = jax.random.uniform(jax.random.key(0), (64, 2, 2, 1), minval=-1)

  def oracle(x_t, t):
    eps = denoiser.to_x0_eps(schedule, 'x0', x_t, t, x0)[1]
    return {'eps': eps, 'x0': x0,
            'v': denoiser.target(schedule, 'v', x0, eps, t),
            }[prediction]

  t, noise = losses.draw_t_and_noise(schedule, x0, jax.random.key(1))
  loss = jnp.mean(losses.per_example_loss('mse', prediction)(
      oracle, schedule, x0, t, noise))
  assert float(loss) < 1e-4
  # The analytic eps-denoiser, re-expressed as this target's prediction.
  eps_fn = gaussian_eps_denoiser(schedule, MU, S2)

  def target_fn(x_t, t):
    eps = eps_fn(x_t, t)
    x0_hat = denoiser.to_x0_eps(schedule, 'eps', x_t, t, eps)[0]
    return {'eps': eps, 'x0': x0_hat,
            'v': denoiser.target(schedule, 'v', x0_hat, eps, t),
            }[prediction]

  x_T = jax.random.normal(jax.random.key(2), (256, 2, 2, 1))
  ts = samplers.spaced_timesteps(1000, 50)
  want = samplers.ddim_sample(denoiser.make_denoiser(eps_fn, schedule, 'eps'),
                              schedule, x_T, jax.random.key(3), timesteps=ts,
                              clip_denoised=False)
  got = samplers.ddim_sample(
      denoiser.make_denoiser(target_fn, schedule, prediction), schedule, x_T,
      jax.random.key(3), timesteps=ts, clip_denoised=False)
  np.testing.assert_allclose(got, want, atol=2e-3)
