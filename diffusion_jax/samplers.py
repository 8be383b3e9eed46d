"""Samplers: the reverse process as one jitted loop.

Each sampler takes the starting noise x_T explicitly, so a fixed x_T and rng
give the same images on any device layout.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules
from diffusion_jax.losses import ModelFn

VARIANCES = ('beta', 'beta_tilde')


def p_mean_variance(model_fn: ModelFn, schedule: schedules.Schedule,
                    x_t: jax.Array, t: jax.Array, *, variance: str = 'beta',
                    clip_denoised: bool = True):
  """Mean and log-variance of p_theta(x_{t-1} | x_t) and the x0 estimate.

  The mean is the posterior mean mu~(x0_hat, x_t) with x0_hat from the eps
  prediction; without clipping this equals Algorithm 2's
  (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t). With clipping
  x0_hat is kept in [-1, 1], as the DDPM code samples.
  sigma_t^2 is beta_t ('beta', 'fixedlarge'; its first entry is beta~_1 as
  in the DDPM code, since beta~_0 = 0) or beta~_t ('beta_tilde').
  """
  eps = model_fn(x_t, t)
  x0 = schedules.predict_x0_from_eps(schedule, x_t, t, eps)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, log_var_tilde = schedules.q_posterior(schedule, x0, x_t, t)
  if variance == 'beta':
    log_betas = jnp.log(schedule.betas).at[0].set(
        schedule.posterior_log_variance_clipped[0])
    log_var = schedules._at(log_betas, t, x_t)  # pylint: disable=protected-access
  elif variance == 'beta_tilde':
    log_var = log_var_tilde
  else:
    raise ValueError(f'unknown sampler variance {variance!r}: set '
                     f'config.diffusion.sampler_variance to one of {VARIANCES}')
  return mean, log_var, x0


def ddpm_sample(model_fn: ModelFn, schedule: schedules.Schedule,
                x_T: jax.Array, rng: jax.Array, *, variance: str = 'beta',
                clip_denoised: bool = True,
                x0_at: Sequence[int] = ()):
  """Ancestral sampling, DDPM Algorithm 2: t = T..1, no noise at the end.

  Returns x_0, or (x_0, x0_predictions) when `x0_at` lists 0-based timesteps:
  the predictions x0_hat(x_t) at those steps, shape (len(x0_at), *x_T.shape),
  in the order given (the paper's progressive-generation figure, sec. 4.3).
  """
  if variance not in VARIANCES:
    raise ValueError(f'unknown sampler variance {variance!r}: set '
                     f'config.diffusion.sampler_variance to one of {VARIANCES}')
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
    mean, log_var, x0_hat = p_mean_variance(model_fn, schedule, x, t,
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
