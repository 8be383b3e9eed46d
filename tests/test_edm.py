"""EDM (Karras et al. 2022): the preconditioning against closed forms, the
sigma mapping of every process, and the Heun sampler against the exact
probability-flow solution on Gaussian data (where the optimal denoiser is
analytic)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import experiment
from diffusion_jax.diffusion import denoiser, edm, losses, sampling
from diffusion_jax.diffusion import schedules, sde, sigma_grid
from tests.util import run_sample, run_train, tiny_config

MU, S = 0.3, 0.5
D = denoiser.SIGMA_DATA
PROCESSES = {
    'ddpm': schedules.Schedule.from_betas(schedules.linear_betas(1000)),
    'vp': sde.Process('vp'), 've': sde.Process('ve'),
    'rectified_flow': sde.Process('rectified_flow'),
    'edm': edm.EDMProcess(),
}


def _coef(process, t, x):
  a, s = process.alpha_sigma(t)
  return denoiser.bcast(a, x), denoiser.bcast(s, x)


def gaussian_network(process, prediction):
  """The optimal network for x0 ~ N(MU, S^2 I), predicting `prediction`
  from what the network sees (c_in x~ for 'edm')."""
  def network(inp, t):
    a, s = _coef(process, t, inp)
    x_t = inp if prediction != 'edm' else inp * jnp.sqrt(s * s + a * a * D * D)
    x0 = MU + a * S ** 2 * (x_t - a * MU) / (a * a * S ** 2 + s * s)
    return denoiser.target(process, prediction, x0, (x_t - a * x0) / s, t)
  return network


def exact_flow(grid, z):
  """The probability-flow ODE's exact end point from x~ = sigma_0 z on
  Gaussian data: x~(sigma) - MU scales as sqrt(S^2 + sigma^2)."""
  s0 = grid.sigmas[0]
  return MU + S / np.sqrt(S ** 2 + s0 ** 2) * (s0 * np.asarray(z) - MU)


def _times(process, n=6):
  if process.is_discrete:
    return jnp.array([0, 10, 100, 500, 900, 999])[:n]
  if process.kind == 'edm':
    return jnp.geomspace(0.002, 80.0, n).astype(jnp.float32)
  return jnp.linspace(0.01, 0.99, n).astype(jnp.float32)


def test_edm_coefficients_are_table_1():
  sigma = jnp.array([0.002, 0.5, 80.0])
  c_skip, c_out, c_in = denoiser.edm_coefficients(sigma)
  np.testing.assert_allclose(c_skip, D ** 2 / (sigma ** 2 + D ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_out, sigma * D / np.sqrt(sigma ** 2 + D ** 2),
                             rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma ** 2 + D ** 2),
                             rtol=1e-6)


@pytest.mark.parametrize('name', sorted(PROCESSES))
def test_edm_prediction_inverts_exactly_and_agrees_with_eps_x0_v(name):
  """target -> to_x0_eps recovers (x0, eps); the optimal network in every
  parameterisation gives the same denoiser (x0_hat, eps_hat)."""
  process = PROCESSES[name]
  k = jax.random.split(jax.random.key(0), 2)
  t = _times(process)
  x0 = MU + S * jax.random.normal(k[0], (t.shape[0], 3, 3, 1))
  eps = jax.random.normal(k[1], x0.shape)
  x_t = denoiser.q_sample(process, x0, t, eps)
  y = denoiser.target(process, 'edm', x0, eps, t)
  x0_back, eps_back = denoiser.to_x0_eps(process, 'edm', x_t, t, y)
  np.testing.assert_allclose(x0_back, x0, atol=2e-4, rtol=1e-4)
  reference = denoiser.make_denoiser(gaussian_network(process, 'x0'),
                                     process, 'x0')(x_t, t)
  for prediction in ('edm', 'v') + (('eps',) if name != 'rectified_flow'
                                    else ()):
    got = denoiser.make_denoiser(gaussian_network(process, prediction),
                                 process, prediction)(x_t, t)
    np.testing.assert_allclose(got.x0, reference.x0, atol=2e-3, rtol=1e-3)


def test_edm_inputs_and_targets_have_unit_variance():
  """EDM's design (sec. 5, Appendix B.6): with Var(x0) = sigma_data^2, the
  network's input c_in x~ and its target F have unit variance at every
  sigma (Monte Carlo over 200k draws)."""
  process = edm.EDMProcess()
  k = jax.random.split(jax.random.key(1), 2)
  for sigma in (0.01, 0.5, 3.0, 80.0):
    t = jnp.full((200_000,), sigma)
    x0 = D * jax.random.normal(k[0], (200_000, 1, 1, 1))
    eps = jax.random.normal(k[1], x0.shape)
    x_t = denoiser.q_sample(process, x0, t, eps)
    assert float(jnp.var(denoiser.network_input(process, 'edm', x_t, t))) \
        == pytest.approx(1.0, abs=0.02)
    assert float(jnp.var(denoiser.target(process, 'edm', x0, eps, t))) \
        == pytest.approx(1.0, abs=0.02)


def test_edm_loss_is_lambda_weighted_denoiser_error():
  """MSE on F equals EDM eq. 8: lambda(sigma) ||D - x0||^2, lambda =
  (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, for any network."""
  process = edm.EDMProcess()
  k = jax.random.split(jax.random.key(2), 3)
  x0 = jax.random.uniform(k[0], (5, 4, 4, 1), minval=-1)
  noise = jax.random.normal(k[1], x0.shape)
  t = jnp.array([0.01, 0.1, 1.0, 10.0, 80.0])
  network = lambda x, t: jnp.tanh(x) * 0.3 + denoiser.bcast(t, x) * 0.01
  got = losses.mse_per_example('edm', network, process, x0, t, noise)
  x_t = denoiser.q_sample(process, x0, t, noise)
  d = denoiser.make_denoiser(network, process, 'edm')(x_t, t).x0
  lam = (t ** 2 + D ** 2) / (t * D) ** 2
  want = lam * jnp.mean(jnp.square(d - x0).reshape(5, -1), axis=1)
  np.testing.assert_allclose(got, want, rtol=2e-4)


@pytest.mark.parametrize('name', sorted(PROCESSES))
def test_sigma_mapping_round_trips(name):
  process = PROCESSES[name]
  t = np.asarray(_times(process))
  sigmas = sigma_grid.sigma_of_t(process, t)
  a, s = process.alpha_sigma(jnp.asarray(t))
  np.testing.assert_allclose(sigmas, np.asarray(s) / np.asarray(a),
                             rtol=2e-3)
  back, reached = sigma_grid.t_of_sigma(process, sigmas)
  np.testing.assert_allclose(reached, sigmas, rtol=1e-9)
  if process.is_discrete:
    np.testing.assert_array_equal(back, t)
  else:
    np.testing.assert_allclose(back, t, rtol=1e-4, atol=1e-6)
  grid = sigma_grid.grid_at_sigmas(process, sigmas[::-1])
  np.testing.assert_allclose(grid.alphas, 1 / np.sqrt(1 + sigmas[::-1] ** 2)
                             if name in ('ddpm', 'vp') else
                             np.asarray(a)[::-1], rtol=2e-3)


def test_karras_grid_and_discrete_snapping():
  process = PROCESSES['edm']
  grid = sigma_grid.make_grid(process, 18)
  assert grid.num_steps == 18 and grid.sigmas[-1] == 0
  assert grid.sigmas[0] == pytest.approx(80.0)
  assert grid.sigmas[17] == pytest.approx(0.002)
  i = 5 / 17  # EDM eq. 5
  assert grid.sigmas[5] == pytest.approx(
      (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)
  ddpm = PROCESSES['ddpm']
  table = sigma_grid.discrete_sigmas(ddpm)
  grid = sigma_grid.make_grid(ddpm, 500)  # many levels share a timestep
  assert grid.num_steps < 500 and np.all(np.diff(grid.times) < 0)
  np.testing.assert_allclose(grid.sigmas[:-1], table[grid.times])
  with pytest.raises(ValueError, match='strictly decreasing'):
    sigma_grid.grid_at_sigmas(process, [1.0, 2.0])
  with pytest.raises(ValueError, match='sigma_max'):
    sigma_grid.make_grid(ddpm, 10, sigma_max=1000.0)


@pytest.mark.parametrize('name', sorted(PROCESSES))
def test_heun_converges_to_the_exact_flow_at_second_order(name):
  process = PROCESSES[name]
  prediction = 'x0' if name == 'rectified_flow' else 'eps'
  denoise_fn = denoiser.make_denoiser(gaussian_network(process, prediction),
                                      process, prediction)
  z = jax.random.normal(jax.random.key(0), (64, 2, 2, 1))
  errors = []
  for n in (8, 16, 32):
    grid = sigma_grid.make_grid(process, n)
    out = jax.jit(lambda z, g=grid: edm.edm_sample(
        denoise_fn, process, g, z, jax.random.key(1)))(z)
    errors.append(np.abs(np.asarray(out) - exact_flow(grid, z)).max())
  slopes = -np.diff(np.log2(errors))
  assert np.all(slopes > 1.8), (errors, slopes)
  assert errors[-1] < 0.05


def test_churn_keeps_the_data_distribution():
  """With S_churn > 0 the sampler is stochastic (EDM Algorithm 2) but still
  samples N(MU, S^2): mean and standard deviation of 20k draws (their
  standard errors: 0.0035 and 0.0025), at 80 levels with S_churn = 16."""
  process = PROCESSES['edm']
  denoise_fn = denoiser.make_denoiser(gaussian_network(process, 'edm'),
                                      process, 'edm')
  grid = sigma_grid.make_grid(process, 80)
  z = jax.random.normal(jax.random.key(3), (20_000, 1, 1, 1))
  churn = edm.Churn(s_churn=16, s_tmin=0.05, s_tmax=50, s_noise=1.0)
  run = jax.jit(lambda z, c: edm.edm_sample(denoise_fn, process, grid, z,
                                            jax.random.key(4), c),
                static_argnums=1)
  out = np.asarray(run(z, churn))
  assert out.mean() == pytest.approx(MU, abs=0.015)
  assert out.std() == pytest.approx(S, abs=0.0125)
  deterministic = np.asarray(run(z, edm.Churn()))
  assert np.abs(out - deterministic).mean() > 0.05


def test_network_calls_are_counted_exactly():
  calls = []
  process = PROCESSES['vp']
  inner = denoiser.make_denoiser(gaussian_network(process, 'eps'), process,
                                 'eps')

  def counting(x, t):
    calls.append(1)
    return inner(x, t)
  settings = sampling.SampleSettings(sampler='edm', num_steps=7)
  with jax.disable_jit():
    edm.edm_sample(counting, process, settings.grid(process),
                   jnp.zeros((2, 1, 1, 1)), jax.random.key(0))
  assert len(calls) == sampling.network_calls(process, settings) == 13


@pytest.mark.parametrize('overrides, match', [
    ({'diffusion.process': 'edm', 'diffusion.prediction': 'edm'},
     "time_sampling='uniform'.*log_normal"),
    ({'diffusion.process': 'edm', 'diffusion.time_sampling': 'log_normal',
      'sample.sampler': 'ddim'}, "'ddim' does not apply.*'edm'"),
    ({'diffusion.process': 'rectified_flow', 'diffusion.prediction': 'edm',
      'sample.sampler': 'euler'}, "'edm' scales by sigma / alpha"),
    ({'sample.sampler': 'ddim', 'sample.num_steps': 21},
     'num_steps=21 is more than the 20 steps'),
    ({'sample.sampler': 'edm', 'sample.num_steps': 21},
     'num_steps=21 is more than the 20 noise levels'),
    ({'sample.sampler': 'edm', 'sample.sigma_max': 1e4},
     'sigma_max=10000.0 is above'),
    ({'sample.sampler': 'edm', 'sample.s_tmin': 2.0, 'sample.s_tmax': 1.0},
     's_tmin=2.0 is above config.sample.s_tmax'),
    ({'sample.sampler': 'edm', 'sample.spacing': 'cosine'},
     "sample.spacing='cosine'"),
])
def test_bad_edm_settings_fail_before_compiling(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiment.build(tiny_config(**overrides))


def test_edm_trains_and_samples_any_process_with_the_edm_sampler(tmp_path):
  """The edm process and preconditioning train and sample through the
  loop; a ddpm run's checkpoint samples with the churned Heun sampler."""
  config = tiny_config(**{
      'diffusion.process': 'edm', 'diffusion.prediction': 'edm',
      'diffusion.time_sampling': 'log_normal', 'sample.sampler': 'edm',
      'sample.num_steps': 4})
  state = run_train(config, str(tmp_path))
  assert int(state.step) == 4
  for workdir, cfg in ((tmp_path, config), (tmp_path / 'ddpm', tiny_config(**{
      'sample.sampler': 'edm', 'sample.num_steps': 5,
      'sample.s_churn': 10.0}))):
    if cfg is not config:
      run_train(cfg, str(workdir))
    out = run_sample(cfg, str(workdir))
    images = np.load(os.path.join(out, 'samples.npz'))['images']
    assert images.shape[0] == 12 and np.isfinite(images).all()


@pytest.mark.parametrize('sampler', ['edm', 'dpm_solver_pp', 'unipc'])
def test_classifier_free_guidance_reaches_the_sigma_samplers(sampler):
  """The sigma samplers see the guided denoiser (issue 15 item 6): with a
  network whose output depends on the label, w = 2 changes the samples and
  w = 0 reproduces plain conditional sampling."""
  config = tiny_config(**{'model.num_classes': 3, 'sample.sampler': sampler,
                          'sample.num_steps': 3})
  method = experiment.build(config, mode='sample').method
  params = jax.jit(method.init_params)(jax.random.key(0))
  # Perturb every weight: the fresh U-Net's last layer is zero, so its
  # output would not depend on the label at all.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [
      p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  noise = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
  # Jitted (op by op, every op would compile on its own); a new trace per
  # guidance_scale, which is read while tracing.
  sample = lambda: jax.jit(lambda *a: method.sample(*a))(
      params, noise, jax.random.key(3))
  plain = sample()
  method.guidance_scale = 2.0
  guided = sample()
  assert np.abs(np.asarray(guided) - np.asarray(plain)).max() > 1e-3
  method.guidance_scale = 0.0
  np.testing.assert_array_equal(sample(), plain)
