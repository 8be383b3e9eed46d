"""Samplers of the discrete DDPM process, each one jitted lax loop.

Ancestral sampling (respaced or not) and the bits/dim terms share
`p_mean_variance` (improved DDPM's core); DDIM and its inversion take the
same `denoiser.Denoised` (x0_hat, eps_hat) at each step. Each sampler takes
the starting noise x_T explicitly, so a fixed x_T and rng give the same
images on any device layout.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.denoiser import DenoiseFn

# sigma_t^2 of p(x_{t-1} | x_t): fixed beta_t or beta~_t, or the network's
# learned interpolation between them (improved DDPM).
VARIANCES = ('beta', 'beta_tilde', 'learned')


def check_variance(variance: str) -> None:
  """The one check of config.diffusion.sampler_variance (callers run it
  early, before loading or compiling anything)."""
  if variance not in VARIANCES:
    raise ValueError(f'unknown sampler variance {variance!r}: set '
                     f'config.diffusion.sampler_variance to one of {VARIANCES}')


def p_mean_variance(denoise_fn: DenoiseFn, schedule: schedules.Schedule,
                    x_t: jax.Array, t: jax.Array, *, variance: str = 'beta',
                    clip_denoised: bool = True):
  """Mean and log-variance of p_theta(x_{t-1} | x_t) and the x0 estimate.

  The mean is the posterior mean mu~(x0_hat, x_t) with the denoiser's
  x0_hat; for an eps prediction and without clipping this equals Algorithm 2's
  (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t). With clipping
  x0_hat is kept in [-1, 1], as the DDPM code samples.
  sigma_t^2 is beta_t ('beta', 'fixedlarge'; its first entry is beta~_1 as
  in the DDPM code, since beta~_0 = 0) or beta~_t ('beta_tilde'), or learned
  ('learned', improved DDPM eq. 15): log sigma_t^2 = f log beta_t +
  (1 - f) log beta~_t with f = (v + 1) / 2 from the network's extra channels
  v in [-1, 1] (log beta~ clipped at the first step as above).
  """
  x0, _, var_values = denoise_fn(x_t, t)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, log_var_tilde = schedules.q_posterior(schedule, x0, x_t, t)
  if variance == 'beta':
    log_betas = jnp.log(schedule.betas).at[0].set(
        schedule.posterior_log_variance_clipped[0])
    log_var = schedules.at(log_betas, t, x_t)
  elif variance == 'learned':
    if var_values is None:
      raise ValueError("sampler_variance='learned' needs a network that "
                       'outputs a variance (config.diffusion.loss = hybrid '
                       'or vlb)')
    frac = (var_values + 1.0) / 2.0
    log_var = (frac * schedules.at(jnp.log(schedule.betas), t, x_t)
               + (1.0 - frac) * log_var_tilde)
  else:
    check_variance(variance)
    log_var = log_var_tilde
  return mean, log_var, x0


def ddpm_sample(denoise_fn: DenoiseFn, schedule: schedules.Schedule,
                x_T: jax.Array, rng: jax.Array, *, variance: str = 'beta',
                clip_denoised: bool = True,
                x0_at: Sequence[int] = ()):
  """Ancestral sampling, DDPM Algorithm 2: t = T..1, no noise at the end.

  Returns x_0, or (x_0, x0_predictions) when `x0_at` lists 0-based timesteps:
  the predictions x0_hat(x_t) at those steps, shape (len(x0_at), *x_T.shape),
  in the order given (the paper's progressive-generation figure, sec. 4.3).
  """
  check_variance(variance)
  num_t = schedule.num_timesteps
  x0_at = tuple(int(t) for t in x0_at)
  if any(not 0 <= t < num_t for t in x0_at):
    raise ValueError(f'x0_at timesteps {x0_at} must lie in [0, {num_t - 1}]')
  # Slot k of the buffer holds the prediction at x0_at[k]; other steps write
  # to a scratch slot, so the loop carries K+1 images, not T.
  slot_of_t = np.full(num_t, len(x0_at), np.int32)
  slot_of_t[list(x0_at)] = np.arange(len(x0_at))
  slot_of_t = jnp.asarray(slot_of_t)

  def step(carry, t_index):
    x, saved = carry
    t = jnp.full((x.shape[0],), t_index, dtype=jnp.int32)
    mean, log_var, x0_hat = p_mean_variance(denoise_fn, schedule, x, t,
                                            variance=variance,
                                            clip_denoised=clip_denoised)
    if x0_at:
      saved = saved.at[slot_of_t[t_index]].set(x0_hat)
    z = jax.random.normal(jax.random.fold_in(rng, t_index), x.shape, x.dtype)
    nonzero = (t_index > 0).astype(x.dtype)  # z = 0 at the last step
    return (mean + nonzero * jnp.exp(0.5 * log_var) * z, saved), None

  timesteps = jnp.arange(num_t - 1, -1, -1, dtype=jnp.int32)
  saved = jnp.zeros((len(x0_at) + 1, *x_T.shape), x_T.dtype) if x0_at else None
  (x0, saved), _ = jax.lax.scan(step, (x_T, saved), timesteps)
  return (x0, saved[:-1]) if x0_at else x0


def spaced_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """`num_steps` 0-based timesteps evenly spread over [0, T-1], descending
  (the respacing of Nichol & Dhariwal 2021, sec. 4; 0 or T: every step)."""
  if num_steps <= 0 or num_steps >= num_timesteps:
    return np.arange(num_timesteps - 1, -1, -1)
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  steps = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(int)
  return np.unique(steps)[::-1]


def respace(schedule: schedules.Schedule, timesteps: Sequence[int]):
  """A schedule over a subsequence of timesteps (improved DDPM, sec. 4):
  beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}} keeps abar at the kept steps.

  Returns (schedule', t_map): step i of schedule' is original step t_map[i],
  so a model trained on T steps is called with t_map[i].
  """
  kept = np.sort(np.asarray(timesteps, np.int64))
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[kept]
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  return schedules.Schedule.from_betas(betas), jnp.asarray(kept, jnp.int32)


def sample(denoise_fn: DenoiseFn, schedule: schedules.Schedule, x_T: jax.Array,
           rng: jax.Array, *, sampler: str = 'ddpm', num_steps: int = 0,
           variance: str = 'beta', clip_denoised: bool = True,
           eta: float = 0.0, x0_at: Sequence[int] = ()):
  """The sampler chosen by config.sample: 'ddpm' (ancestral, respaced to
  num_steps when 0 < num_steps < T) or 'ddim' (with eta)."""
  steps = spaced_timesteps(schedule.num_timesteps, num_steps)
  if sampler == 'ddim':
    if x0_at:
      raise ValueError('progressive_timesteps need sampler=ddpm')
    return ddim_sample(denoise_fn, schedule, x_T, rng, timesteps=steps, eta=eta,
                       clip_denoised=clip_denoised)
  if sampler != 'ddpm':
    raise ValueError(f"unknown sampler {sampler!r}: set config.sample.sampler "
                     "to 'ddpm' or 'ddim'")
  if len(steps) == schedule.num_timesteps:
    return ddpm_sample(denoise_fn, schedule, x_T, rng, variance=variance,
                       clip_denoised=clip_denoised, x0_at=x0_at)
  if x0_at:
    raise ValueError('progressive_timesteps need all timesteps '
                     '(config.sample.num_steps=0)')
  spaced, t_map = respace(schedule, steps)
  return ddpm_sample(lambda x, i: denoise_fn(x, t_map[i]), spaced, x_T, rng,
                     variance=variance, clip_denoised=clip_denoised)


def ddim_sample(denoise_fn: DenoiseFn, schedule: schedules.Schedule,
                x_T: jax.Array, rng: jax.Array, *,
                timesteps: Sequence[int] | None = None, eta: float = 0.0,
                clip_denoised: bool = True) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12) over descending 0-based `timesteps`.

  From t to the next s < t (s = -1 after the last, abar_{-1} = 1):
    x0_hat, eps_hat from the denoiser at (x_t, t),
    sigma  = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s),
    x_s    = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z.
  eta = 0 is deterministic (an ODE discretisation); eta = 1 over all T steps
  is DDPM ancestral sampling with sigma^2 = beta~. With clipping, eps_hat is
  recomputed from the clipped x0_hat so the two stay consistent. A learned
  variance is ignored (DDIM fixes sigma through eta).
  Noise for step t comes from fold_in(rng, t), as in ddpm_sample.
  """
  timesteps = np.asarray(spaced_timesteps(schedule.num_timesteps, 0)
                         if timesteps is None else timesteps, np.int32)
  if timesteps.ndim != 1 or np.any(np.diff(timesteps) >= 0):
    raise ValueError('DDIM timesteps must be strictly decreasing')
  next_t = np.append(timesteps[1:], -1).astype(np.int32)
  abar = schedule.alphas_cumprod

  def step(x, ts):
    t_index, s_index = ts
    t = jnp.full((x.shape[0],), t_index, dtype=jnp.int32)
    x0, eps, _ = denoise_fn(x, t)
    ab_t = abar[t_index]
    ab_s = jnp.where(s_index >= 0, abar[jnp.maximum(s_index, 0)], 1.0)
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1 - ab_t)
    sigma = eta * jnp.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    z = jax.random.normal(jax.random.fold_in(rng, t_index), x.shape, x.dtype)
    x_s = (jnp.sqrt(ab_s) * x0 + jnp.sqrt(jnp.maximum(1 - ab_s - sigma ** 2, 0))
           * eps + sigma * z)
    return x_s, None

  x0, _ = jax.lax.scan(step, x_T, (jnp.asarray(timesteps), jnp.asarray(next_t)))
  return x0


def ddim_invert(denoise_fn: DenoiseFn, schedule: schedules.Schedule,
                x0: jax.Array, *, timesteps: Sequence[int]) -> jax.Array:
  """The deterministic (eta = 0) DDIM map run forwards: x_0 -> x_T, the
  inverse of ddim_sample(eta=0, clip_denoised=False) up to discretisation."""
  ascending = np.asarray(timesteps, np.int32)[::-1]
  prev_t = np.append(-1, ascending[:-1]).astype(np.int32)
  abar = schedule.alphas_cumprod

  def step(x, ts):
    s_index, t_index = ts  # from s (lower noise) up to t
    ab_s = jnp.where(s_index >= 0, abar[jnp.maximum(s_index, 0)], 1.0)
    ab_t = abar[t_index]
    # The denoiser is evaluated at the current point (the standard DDIM
    # inversion); at s = -1 (x is the data) at t = 0, whose x0_hat is
    # recomputed from eps for abar_{-1} = 1.
    _, eps, _ = denoise_fn(x, jnp.full((x.shape[0],), jnp.maximum(s_index, 0),
                                       dtype=jnp.int32))
    x0 = (x - jnp.sqrt(1 - ab_s) * eps) / jnp.sqrt(ab_s)
    return jnp.sqrt(ab_t) * x0 + jnp.sqrt(1 - ab_t) * eps, None

  x_T, _ = jax.lax.scan(step, x0, (jnp.asarray(prev_t), jnp.asarray(ascending)))
  return x_T
