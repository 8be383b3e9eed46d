"""DPM-Solver++ and UniPC: against diffusers' schedulers on a shared model,
against the closed-form ODE solution on Gaussian data, and their counts.

For data N(mu, s2) the exact denoiser is linear, D(x~; sigma) = mu +
s2 / (s2 + sigma^2) (x~ - mu), and the probability-flow ODE in x~ is solved
in closed form: x~ - mu scales by sqrt((s2 + sigma'^2) / (s2 + sigma^2)).
The diffusers comparisons need torch and diffusers
(requirements-convert.txt) and skip without them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import multistep
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion import sde
from diffusion_jax.diffusion import sigma_grid
from diffusion_jax.diffusion.sigma_grid import SigmaGrid
from tests.test_diffusion_math import gaussian_denoiser

MU, S2 = 0.3, 0.25


@pytest.fixture(scope='module')
def schedule():
  return schedules.Schedule.from_betas(schedules.linear_betas(1000, 1e-4, 0.02))


def gaussian_process_denoiser(process):
  """The exact denoiser of N(MU, S2) data for any (alpha, sigma) process."""
  def denoise(x_t, t):
    alpha, sigma = process.alpha_sigma(t)
    alpha, sigma = denoiser.bcast(alpha, x_t), denoiser.bcast(sigma, x_t)
    sigma_tilde = sigma / alpha
    x0 = MU + S2 / (S2 + sigma_tilde ** 2) * (x_t / alpha - MU)
    return denoiser.Denoised(x0, (x_t - alpha * x0) / sigma)
  return denoise


def exact_ode_sample(grid, z):
  """The exact flow from sigma_0 to the grid's last sigma > 0, then D there
  (what the samplers' final first-order step to sigma = 0 computes)."""
  s0, s1 = grid.sigmas[0], grid.sigmas[-2]
  x = s0 * np.asarray(z, np.float64)
  x = MU + np.sqrt((S2 + s1 ** 2) / (S2 + s0 ** 2)) * (x - MU)
  return MU + S2 / (S2 + s1 ** 2) * (x - MU)


def recording(denoise_fn, log):
  """denoise_fn that appends (t, x_t) of every call to log at run time."""
  def denoise(x_t, t):
    jax.debug.callback(lambda x, s: log.append((int(s[0]), np.asarray(x))),
                       x_t, t)
    return denoise_fn(x_t, t)
  return denoise


SAMPLERS = {
    'dpm2': lambda *a, **k: multistep.dpm_solver_pp_sample(*a, order=2, **k),
    'dpm3': lambda *a, **k: multistep.dpm_solver_pp_sample(*a, order=3, **k),
    'unipc2': lambda *a, **k: multistep.unipc_sample(*a, order=2, **k),
}


# ---------------------------------------------------------------- diffusers


def run_diffusers(scheduler, schedule, grid, z, rng):
  """diffusers' loop with the eps-model of N(MU, S2) in torch, from our
  x_T = alpha_0 sigma~_0 z; the SDE's noise is ours, passed as
  variance_noise. Returns (final sample, the x_t given to the model)."""
  torch = pytest.importorskip('torch')
  abar = np.asarray(schedule.alphas_cumprod)  # the float32 values ours uses
  x = torch.from_numpy(np.asarray(grid.alphas[0] * grid.sigmas[0]
                                  * np.asarray(z), np.float32))
  sde_noise = scheduler.config.get('algorithm_type') == 'sde-dpmsolver++'
  inputs = []
  for i, t in enumerate(scheduler.timesteps):
    inputs.append(x.numpy().copy())
    ab = torch.tensor(abar[int(t)])
    eps = torch.sqrt(1 - ab) * (x - torch.sqrt(ab) * MU) / (ab * S2 + 1 - ab)
    kwargs = {}
    if sde_noise:
      kwargs['variance_noise'] = torch.from_numpy(np.asarray(
          jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)))
    x = scheduler.step(eps, t, x, **kwargs).prev_sample
  return x.numpy(), np.stack(inputs)


def compare(schedule, scheduler, sample_fn, num_steps, final=True):
  """Our sampler over diffusers' timesteps against diffusers: the model's
  input at every step and (unless final=False) the output, float32."""
  scheduler.set_timesteps(num_steps)
  grid = sigma_grid.grid_at_times(schedule, scheduler.timesteps.numpy())
  assert grid.num_steps == num_steps
  z = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
  rng = jax.random.key(7)
  want, want_inputs = run_diffusers(scheduler, schedule, grid, z, rng)
  log = []
  got = np.asarray(sample_fn(recording(gaussian_denoiser(schedule, MU, S2),
                                       log), schedule, grid, z, rng))
  got_inputs = np.stack([x for _, x in sorted(log, key=lambda e: -e[0])])
  np.testing.assert_allclose(got_inputs, want_inputs, rtol=1e-5, atol=2e-6)
  if final:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize('order,num_steps,use_sde', [
    (2, 10, False), (2, 25, False), (3, 10, False), (3, 25, False),
    (2, 10, True), (1, 10, True)])
def test_dpm_solver_pp_matches_diffusers(schedule, order, num_steps, use_sde):
  """Same trajectory as DPMSolverMultistepScheduler with its defaults
  (midpoint, lower_order_final, final_sigmas_type='zero'): 10 steps use
  its lower-order last steps, 25 do not."""
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  scheduler = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
      beta_schedule='linear', solver_order=order,
      algorithm_type='sde-dpmsolver++' if use_sde else 'dpmsolver++')
  compare(schedule, scheduler,
          lambda *a: multistep.dpm_solver_pp_sample(*a, order=order,
                                                    sde=use_sde), num_steps)


@pytest.mark.parametrize('order,variant,num_steps', [
    (2, 'bh2', 10), (2, 'bh2', 25), (3, 'bh2', 10), (1, 'bh2', 10),
    (2, 'bh1', 10)])
def test_unipc_matches_diffusers(schedule, order, variant, num_steps):
  """Same trajectory as UniPCMultistepScheduler (predict_x0, corrector at
  every step but after the last). With 'bh1' diffusers' last step to sigma
  = 0 is NaN (B(h) = -inf times 0), so only its trajectory is compared."""
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  scheduler = diffusers.UniPCMultistepScheduler(
      num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
      beta_schedule='linear', solver_order=order, solver_type=variant)
  compare(schedule, scheduler,
          lambda *a: multistep.unipc_sample(*a, order=order, variant=variant),
          num_steps, final=variant == 'bh2')


# ----------------------------------------------------- Gaussian data, order


@pytest.mark.parametrize('process_name', ['ddpm', 'rectified_flow'])
def test_converge_at_their_order(schedule, process_name):
  """Error against the closed form over 20, 40, 80 logSNR-uniform steps
  (coarser grids over the ~9.5 of logSNR are not yet asymptotic): 2M is
  second order; UniPC-2 (with UniC) third; 3M, as the authors' code and
  diffusers write it, lies between on this range (its second difference
  carries half the Taylor weight, so it tends to second order)."""
  if process_name == 'ddpm':
    process, denoise_fn = schedule, gaussian_denoiser(schedule, MU, S2)
  else:
    process = sde.Process('rectified_flow')
    denoise_fn = gaussian_process_denoiser(process)
  z = jnp.linspace(-3.0, 3.0, 16).reshape(4, 2, 2, 1)
  steps = (20, 40, 80)
  slopes = {}
  for name, sample_fn in SAMPLERS.items():
    errors = []  # max over z in [-3, 3]
    for n in steps:
      grid = sigma_grid.make_grid(process, n, spacing='logsnr')
      out = sample_fn(denoise_fn, process, grid, z, jax.random.key(0),
                      lower_order_final=False)
      errors.append(np.abs(np.asarray(out) - exact_ode_sample(grid, z)).max())
    assert all(a > b for a, b in zip(errors, errors[1:])), (name, errors)
    slopes[name] = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert slopes['dpm2'] >= 1.8, slopes
  assert slopes['unipc2'] >= 2.5, slopes
  assert slopes['dpm3'] > slopes['dpm2'] + 0.2, slopes


@pytest.mark.parametrize('name,kwargs', [
    ('dpm2', {}), ('dpm3', {}), ('unipc2', {}), ('dpm2', {'sde': True}),
    ('dpm3', {'sde': True}), ('unipc2', {'variant': 'bh1'})])
def test_samples_have_the_data_moments(name, kwargs):
  """40 steps on VP with the defaults: mean and variance of N(MU, S2)."""
  process = sde.Process('vp', t_min=1e-3)
  grid = sigma_grid.make_grid(process, 40, spacing='logsnr')
  z = jax.random.normal(jax.random.key(0), (512, 4, 4, 1))
  sample = jax.jit(lambda z, rng: SAMPLERS[name](
      gaussian_process_denoiser(process), process, grid, z, rng, **kwargs))
  out = np.asarray(sample(z, jax.random.key(1)))
  assert out.shape == z.shape and np.isfinite(out).all()
  assert abs(out.mean() - MU) < 4 * np.sqrt(S2 / out.size)
  assert abs(out.var() - S2) < 0.08 * S2
  if not kwargs.get('sde'):
    exact = exact_ode_sample(grid, z)
    assert np.abs(out - exact).max() < 0.02 * np.abs(exact - MU).max()


# ------------------------------------------------------- counts, bad input


@pytest.mark.parametrize('sampler', multistep.SAMPLERS)
def test_network_calls_are_counted_exactly(schedule, sampler):
  calls = []
  base = gaussian_denoiser(schedule, MU, S2)

  def counting(x_t, t):
    jax.debug.callback(lambda: calls.append(1))
    return base(x_t, t)

  sample_fn = (multistep.unipc_sample if sampler == 'unipc'
               else multistep.dpm_solver_pp_sample)
  for n in (1, 7):
    calls.clear()
    grid = sigma_grid.make_grid(schedule, n, spacing='time')
    jax.jit(lambda z: sample_fn(counting, schedule, grid, z,
                                jax.random.key(0), order=3))(
                                    jnp.zeros((2, 2, 2, 1))).block_until_ready()
    assert len(calls) == multistep.network_calls(grid, sampler) == n


def test_bad_input_fails_before_tracing(schedule):
  identity = denoiser.make_denoiser(lambda x, t: x, schedule, 'eps')
  z = jnp.zeros((1, 2, 2, 1))
  grid = sigma_grid.make_grid(schedule, 5)
  rising = SigmaGrid(sigmas=np.append(grid.sigmas[:-1][::-1], 0.0),
                     times=grid.times[::-1], alphas=grid.alphas[::-1])
  no_zero = SigmaGrid(sigmas=grid.sigmas[:-1], times=grid.times[:-1],
                      alphas=grid.alphas[:-1])
  for sample_fn in (multistep.dpm_solver_pp_sample, multistep.unipc_sample):
    for bad in (rising, no_zero):
      with pytest.raises(ValueError, match='config.sample.num_steps'):
        sample_fn(identity, schedule, bad, z, jax.random.key(0))
    for order in (0, 4, 2.5):
      with pytest.raises(ValueError, match='config.sample.solver_order'):
        sample_fn(identity, schedule, grid, z, jax.random.key(0), order=order)
  with pytest.raises(ValueError, match='config.sample.unipc_variant'):
    multistep.unipc_sample(identity, schedule, grid, z, jax.random.key(0),
                           variant='bh3')
  with pytest.raises(ValueError, match='config.sample.sampler'):
    multistep.network_calls(grid, 'dpm++')
