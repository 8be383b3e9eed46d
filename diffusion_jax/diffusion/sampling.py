"""Samplers by name (config.sample.sampler): one registry over both families.

  ddpm            ancestral sampling, DDPM Algorithm 2 (respaced when
                  0 < num_steps < T; improved DDPM sec. 4)       discrete
  ddim            DDIM, eq. 12 (eta 0: deterministic)            discrete
  euler, heun     the probability-flow ODE                        continuous
  euler_maruyama  the reverse SDE (vp, ve)                        continuous
  pc              predictor-corrector with Langevin steps (vp, ve) continuous
  edm             EDM's Heun sampler with churn (Algorithm 2)     every process
  dpm_solver_pp   DPM-Solver++ 2M / 3M (Lu et al. 2022)           every process
  dpm_solver_pp_sde  its SDE variant (2M)                         every process
  unipc           UniPC (Zhao et al. 2023)                        every process

The last four run in EDM's coordinates x~ = x_t / alpha_t over a grid of
noise levels sigma~ (sigma_grid.py), so they sample a model of any process,
the edm process included (whose time is sigma itself). Every sampler sees
the network through one `denoiser.DenoiseFn`; the choice is checked once
(`check`) before anything is compiled.
"""

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import edm, multistep, samplers, sde
from diffusion_jax.diffusion import sde_samplers, sigma_grid
from diffusion_jax.diffusion.denoiser import DenoiseFn


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """config.sample (and the diffusion keys samplers read), resolved once."""
  sampler: str = 'ddpm'
  num_steps: int = 0  # 0: every step of the discrete process
  ddim_eta: float = 0.0
  variance: str = 'beta'  # discrete: sigma_t^2 of p(x_{t-1} | x_t)
  clip_denoised: bool = True
  snr: float = 0.16  # pc
  corrector_steps: int = 1  # pc
  t_min: float = 0.0  # continuous: where sampling stops (0: the default)
  # The sigma samplers (edm, dpm_solver_pp, unipc): sigma_grid.make_grid.
  spacing: str = 'karras'
  rho: float = 7.0
  sigma_min: float = 0.0  # 0: the process's own
  sigma_max: float = 0.0
  solver_order: int = 2
  unipc_variant: str = 'bh2'
  churn: edm.Churn = edm.Churn()

  @classmethod
  def from_config(cls, config) -> 'SampleSettings':
    s, d = config.sample, config.diffusion
    continuous = d.process != 'ddpm' or s.sampler in SIGMA_SAMPLERS
    return cls(sampler=s.sampler,
               num_steps=(s.num_steps or d.num_timesteps) if continuous
               else s.num_steps,
               ddim_eta=s.ddim_eta, variance=d.sampler_variance,
               clip_denoised=d.clip_denoised, snr=s.snr,
               corrector_steps=s.corrector_steps, t_min=s.t_min,
               spacing=s.spacing, rho=s.rho, sigma_min=s.sigma_min,
               sigma_max=s.sigma_max, solver_order=s.solver_order,
               unipc_variant=s.unipc_variant,
               churn=edm.Churn(s_churn=s.s_churn, s_tmin=s.s_tmin,
                               s_tmax=s.s_tmax or float('inf'),
                               s_noise=s.s_noise))

  def grid(self, process) -> sigma_grid.SigmaGrid:
    """The noise levels a sigma sampler visits."""
    return sigma_grid.make_grid(process, self.num_steps,
                                spacing=self.spacing, rho=self.rho,
                                sigma_min=self.sigma_min,
                                sigma_max=self.sigma_max)


# The samplers that run over sigma_grid's noise levels, for every process.
SIGMA_SAMPLERS = ('edm', 'dpm_solver_pp', 'dpm_solver_pp_sde', 'unipc')


class Sampler(NamedTuple):
  # process -> whether the sampler applies to it
  applies: Callable
  # (denoise_fn, process, x_T, rng, settings, x0_at) -> images
  run: Callable


def sampling_process(process: sde.Process, t_min: float) -> sde.Process:
  """The process with the t at which sampling stops: t_min, or (0) 1e-3 for
  vp, whose late steps score_sde skips, else the training t_min."""
  t_min = t_min or (max(process.t_min, 1e-3) if process.kind == 'vp'
                    else process.t_min)
  return dataclasses.replace(process, t_min=t_min)


def _discrete(name):
  def run(denoise_fn, schedule, x_T, rng, s: SampleSettings, x0_at=()):
    return samplers.sample(denoise_fn, schedule, x_T, rng, sampler=name,
                           num_steps=s.num_steps, eta=s.ddim_eta,
                           variance=s.variance,
                           clip_denoised=s.clip_denoised, x0_at=x0_at)
  return Sampler(applies=lambda p: p.is_discrete, run=run)


def _on_unit_interval(process) -> bool:
  return not process.is_discrete and process.kind in sde.PROCESSES


def _continuous(name):
  def run(denoise_fn, process, x_T, rng, s: SampleSettings, x0_at=()):
    if x0_at:
      raise ValueError('progressive_timesteps need the ddpm process')
    out = sde_samplers.sample(
        denoise_fn, sampling_process(process, s.t_min), x_T, rng,
        sampler=name, num_steps=s.num_steps, snr=s.snr,
        corrector_steps=s.corrector_steps,
        denoise=process.kind != 'rectified_flow')
    return jnp.clip(out, -1.0, 1.0) if s.clip_denoised else out
  return Sampler(applies=_on_unit_interval, run=run)


def _sigma_sampler(name):
  """A sampler over s.grid(process)'s noise levels, for every process."""
  def run(denoise_fn, process, x_T, rng, s: SampleSettings, x0_at=()):
    if x0_at:
      raise ValueError('progressive_timesteps need the ddpm sampler')
    grid = s.grid(process)
    if name == 'edm':
      out = edm.edm_sample(denoise_fn, process, grid, x_T, rng, s.churn)
    elif name == 'unipc':
      out = multistep.unipc_sample(denoise_fn, process, grid, x_T, rng,
                                   order=s.solver_order,
                                   variant=s.unipc_variant)
    else:
      out = multistep.dpm_solver_pp_sample(
          denoise_fn, process, grid, x_T, rng, order=s.solver_order,
          sde=name == 'dpm_solver_pp_sde')
    return jnp.clip(out, -1.0, 1.0) if s.clip_denoised else out
  return Sampler(applies=lambda p: True, run=run)


def network_calls(process, s: SampleSettings) -> int:
  """How many times the sampler of `s` calls the network per image
  (classifier-free guidance doubles each call's batch, not the count)."""
  if s.sampler == 'edm':
    return edm.network_calls(s.grid(process))
  if s.sampler in SIGMA_SAMPLERS:
    return s.grid(process).num_steps
  if s.sampler in ('ddpm', 'ddim'):
    return len(samplers.spaced_timesteps(process.num_timesteps, s.num_steps))
  per_step = {'euler': 1, 'heun': 2, 'euler_maruyama': 1,
              'pc': 1 + s.corrector_steps}[s.sampler]
  calls = per_step * s.num_steps
  if s.sampler == 'heun' and process.t_min == 0:
    calls -= 1  # the last step is Euler (sde_samplers.ode_sample)
  denoise = process.kind != 'rectified_flow' or process.t_min > 0
  return calls + int(denoise)


SAMPLERS = {
    'ddpm': _discrete('ddpm'),
    'ddim': _discrete('ddim'),
    **{name: _continuous(name) for name in sde_samplers.SAMPLERS},
    **{name: _sigma_sampler(name) for name in SIGMA_SAMPLERS},
}


def names_for(process) -> tuple[str, ...]:
  return tuple(n for n, s in SAMPLERS.items() if s.applies(process))


def check(process, prediction: str, s: SampleSettings) -> None:
  """The sampler exists, fits the process and prediction; its settings are
  valid. Raises ValueError naming the config key."""
  if s.sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {s.sampler!r}: set '
                     f'config.sample.sampler to one of {tuple(SAMPLERS)}')
  if not SAMPLERS[s.sampler].applies(process):
    kind = 'ddpm' if process.is_discrete else process.kind
    raise ValueError(
        f'config.sample.sampler={s.sampler!r} does not apply to the '
        f'process {kind!r}: use one of {names_for(process)}')
  if s.sampler in SIGMA_SAMPLERS:
    if s.num_steps < 1:
      raise ValueError(f'config.sample.num_steps={s.num_steps}: the '
                       f'{s.sampler} sampler needs >= 1 noise level')
    if process.is_discrete and s.num_steps > process.num_timesteps:
      raise ValueError(
          f'config.sample.num_steps={s.num_steps} is more than the '
          f'{process.num_timesteps} noise levels of the ddpm schedule: '
          f'use at most {process.num_timesteps}')
    s.churn.check()
    if s.sampler != 'edm':
      multistep.check_settings(s.sampler, s.solver_order, s.unipc_variant)
    s.grid(process)  # checks sigma_min/max and the spacing
  elif process.is_discrete:
    samplers.check_variance(s.variance)
    if s.num_steps < 0:
      raise ValueError('config.sample.num_steps must be >= 0 (0: all steps)')
    if s.num_steps > process.num_timesteps:
      raise ValueError(
          f'config.sample.num_steps={s.num_steps} is more than the '
          f'{process.num_timesteps} steps of the ddpm schedule '
          '(config.diffusion.num_timesteps): use at most that, or 0 for '
          'every step')
  else:
    sde_samplers.check_sample_args(sampling_process(process, s.t_min),
                                   prediction, s.sampler, s.num_steps)


def run(denoise_fn: DenoiseFn, process, x_T: jax.Array, rng: jax.Array,
        s: SampleSettings, x0_at=()) -> jax.Array:
  """Images from x_T with the sampler of `s` (x0_at: see samplers.sample)."""
  return SAMPLERS[s.sampler].run(denoise_fn, process, x_T, rng, s, x0_at)
