"""Diffusion training losses: pure functions of (model, data, rng)."""

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import schedules

# model_fn(x_t, t) -> prediction with the shape of x_t.
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def eps_mse_loss(model_fn: ModelFn, schedule: schedules.Schedule,
                 x0: jax.Array, rng: jax.Array) -> jax.Array:
  """L_simple (DDPM Algorithm 1, eq. 14), averaged over pixels and batch.

  t ~ U{0..T-1} (0-based), eps ~ N(0, I),
  loss = || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2.
  """
  t, noise = draw_t_and_noise(schedule, x0, rng)
  return eps_mse_given_noise(model_fn, schedule, x0, t, noise)


def draw_t_and_noise(schedule: schedules.Schedule, x0: jax.Array,
                     rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The per-example t and eps of one batch, drawn for the whole batch at
  once: gradient accumulation slices these instead of drawing per
  micro-batch, so splitting a batch does not change its randomness."""
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  return t, noise


def eps_mse_given_noise(model_fn: ModelFn, schedule: schedules.Schedule,
                        x0: jax.Array, t: jax.Array,
                        noise: jax.Array) -> jax.Array:
  """L_simple for given (t, eps); the mean over pixels and batch."""
  x_t = schedules.q_sample(schedule, x0, t, noise)
  eps_pred = model_fn(x_t, t)
  return jnp.mean(jnp.square(noise - eps_pred))


LOSSES = {'eps_mse': eps_mse_loss}
# The same losses given pre-drawn (t, noise) (see draw_t_and_noise).
LOSSES_GIVEN_NOISE = {'eps_mse': eps_mse_given_noise}


def get_loss_fn(name: str):
  if name not in LOSSES:
    raise ValueError(f'unknown loss {name!r}: set config.diffusion.loss to '
                     f'one of {sorted(LOSSES)}')
  return LOSSES[name]
