"""Samplers by name (config.sample.sampler): one registry over both families.

  ddpm            ancestral sampling, DDPM Algorithm 2 (respaced when
                  0 < num_steps < T; improved DDPM sec. 4)       discrete
  ddim            DDIM, eq. 12 (eta 0: deterministic)            discrete
  euler, heun     the probability-flow ODE                        continuous
  euler_maruyama  the reverse SDE (vp, ve)                        continuous
  pc              predictor-corrector with Langevin steps (vp, ve) continuous

Every sampler sees the network through one `denoiser.DenoiseFn`; the choice
is checked once (`check`) before anything is compiled.
"""

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import samplers, sde, sde_samplers
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

  @classmethod
  def from_config(cls, config) -> 'SampleSettings':
    s, d = config.sample, config.diffusion
    continuous = d.process != 'ddpm'
    return cls(sampler=s.sampler,
               num_steps=(s.num_steps or d.num_timesteps) if continuous
               else s.num_steps,
               ddim_eta=s.ddim_eta, variance=d.sampler_variance,
               clip_denoised=d.clip_denoised, snr=s.snr,
               corrector_steps=s.corrector_steps, t_min=s.t_min)


class Sampler(NamedTuple):
  discrete: bool  # which family of processes it applies to
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
  return Sampler(discrete=True, run=run)


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
  return Sampler(discrete=False, run=run)


SAMPLERS = {
    'ddpm': _discrete('ddpm'),
    'ddim': _discrete('ddim'),
    **{name: _continuous(name) for name in sde_samplers.SAMPLERS},
}


def names_for(process) -> tuple[str, ...]:
  return tuple(n for n, s in SAMPLERS.items()
               if s.discrete == process.is_discrete)


def check(process, prediction: str, s: SampleSettings) -> None:
  """The sampler exists, fits the process and prediction; its settings are
  valid. Raises ValueError naming the config key."""
  if s.sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {s.sampler!r}: set '
                     f'config.sample.sampler to one of {tuple(SAMPLERS)}')
  if SAMPLERS[s.sampler].discrete != process.is_discrete:
    kind = 'ddpm' if process.is_discrete else process.kind
    raise ValueError(
        f'config.sample.sampler={s.sampler!r} does not apply to the '
        f'process {kind!r}: use one of {names_for(process)}')
  if process.is_discrete:
    samplers.check_variance(s.variance)
    if s.num_steps < 0:
      raise ValueError('config.sample.num_steps must be >= 0 (0: all steps)')
  else:
    sde_samplers.check_sample_args(sampling_process(process, s.t_min),
                                   prediction, s.sampler, s.num_steps)


def run(denoise_fn: DenoiseFn, process, x_T: jax.Array, rng: jax.Array,
        s: SampleSettings, x0_at=()) -> jax.Array:
  """Images from x_T with the sampler of `s` (x0_at: see samplers.sample)."""
  return SAMPLERS[s.sampler].run(denoise_fn, process, x_T, rng, s, x0_at)
