"""Noise schedules and the Gaussian diffusion process they define.

Notation follows Ho et al. 2020 (DDPM): beta_t, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s. Timesteps are 0-based indices: index i is the
paper's t = i + 1, so index 0 is the last denoising step and index T - 1 the
first. All derived quantities are computed once in float64 numpy and stored
as float32 arrays; formulas below take an integer index array `t` of shape
(B,) and broadcast the per-step coefficient over the image axes.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_timesteps: int, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """beta_t evenly spaced in [beta_start, beta_end] (DDPM section 4)."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008,
                 max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), betas clipped."""
  f = lambda u: np.cos((u / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(num_timesteps, dtype=np.float64)
  return np.minimum(1 - f(t + 1) / f(t), max_beta)


def get_betas(name: str, num_timesteps: int, **kwargs: Any) -> np.ndarray:
  if name == 'linear':
    return linear_betas(num_timesteps, kwargs['beta_start'], kwargs['beta_end'])
  if name == 'cosine':
    return cosine_betas(num_timesteps)
  raise ValueError(f"unknown beta schedule {name!r}: set "
                   "config.diffusion.beta_schedule to 'linear' or 'cosine'")


@flax.struct.dataclass
class Schedule:
  """Per-timestep coefficients of the forward process and its posterior."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array  # beta~_t, eq. 7
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array  # multiplies x0 in mu~_t, eq. 7
  posterior_mean_coef2: jax.Array  # multiplies x_t in mu~_t, eq. 7

  # The DDPM process on its grid of T integer timesteps (denoiser.py).
  is_discrete = True

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at indices t:
    x_t = alpha_t x0 + sigma_t eps is eq. 4."""
    return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]

  def derivatives(self, t):
    raise ValueError('the discrete DDPM process has no time derivative: '
                     "the 'velocity' prediction needs a continuous process")

  def model_time(self, t: jax.Array) -> jax.Array:
    """The network's time input: the 0-based index itself."""
    return t

  @classmethod
  def from_betas(cls, betas: np.ndarray) -> 'Schedule':
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
      raise ValueError('betas must be a 1-D array with values in (0, 1]')
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = (betas * (1.0 - alphas_cumprod_prev)
                          / (1.0 - alphas_cumprod))
    # beta~ is 0 at the first step; clip its log to beta~_1 as the DDPM code.
    posterior_log_variance_clipped = np.log(
        np.append(posterior_variance[1], posterior_variance[1:]))
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return cls(
        betas=f32(betas),
        alphas_cumprod=f32(alphas_cumprod),
        alphas_cumprod_prev=f32(alphas_cumprod_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / alphas_cumprod - 1)),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
        posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev)
                                 / (1.0 - alphas_cumprod)),
        posterior_mean_coef2=f32((1.0 - alphas_cumprod_prev) * np.sqrt(1 - betas)
                                 / (1.0 - alphas_cumprod)),
    )


def schedule_from_config(diffusion_config) -> Schedule:
  return Schedule.from_betas(get_betas(
      diffusion_config.beta_schedule, diffusion_config.num_timesteps,
      beta_start=diffusion_config.beta_start,
      beta_end=diffusion_config.beta_end))


def at(coef: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """coef[t] reshaped to broadcast against x of shape (B, ...)."""
  return coef[t].reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array):
  """Mean and variance of q(x_t | x0), eq. 4."""
  mean = at(schedule.sqrt_alphas_cumprod, t, x0) * x0
  # From the float64-derived sqrt: 1 - abar in float32 loses digits near 0.
  variance = at(jnp.square(schedule.sqrt_one_minus_alphas_cumprod), t, x0)
  return mean, variance


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array,
                t: jax.Array):
  """Mean, variance and log-variance of q(x_{t-1} | x_t, x0), eqs. 6-7."""
  mean = (at(schedule.posterior_mean_coef1, t, x_t) * x0
          + at(schedule.posterior_mean_coef2, t, x_t) * x_t)
  variance = at(schedule.posterior_variance, t, x_t)
  log_variance = at(schedule.posterior_log_variance_clipped, t, x_t)
  return mean, variance, log_variance
