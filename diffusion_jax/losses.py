"""Diffusion training losses: pure functions of (model, data, rng)."""

import functools
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


def prediction_mse_given_noise(prediction: str, model_fn: ModelFn,
                               schedule: schedules.Schedule, x0: jax.Array,
                               t: jax.Array, noise: jax.Array) -> jax.Array:
  """|| target - f(x_t, t) ||^2 with target eps, x0 or v = a eps - b x0
  (Salimans & Ho 2022); the mean over pixels and batch. The weighting over t
  differs between targets: eps-MSE is x0-MSE times abar/(1 - abar)."""
  x_t = schedules.q_sample(schedule, x0, t, noise)
  target = {'eps': lambda: noise, 'x0': lambda: x0,
            'v': lambda: schedules.v_from_eps_x0(schedule, x_t, t, noise, x0),
            }[prediction]()
  return jnp.mean(jnp.square(target - model_fn(x_t, t)))


def _with_drawn_noise(given_noise):
  def loss(model_fn, schedule, x0, rng):
    t, noise = draw_t_and_noise(schedule, x0, rng)
    return given_noise(model_fn, schedule, x0, t, noise)
  return loss


# config.diffusion.loss -> what the network predicts.
PREDICTIONS = {'eps_mse': 'eps', 'x0_mse': 'x0', 'v_mse': 'v'}
# The losses given pre-drawn (t, noise) (see draw_t_and_noise).
LOSSES_GIVEN_NOISE = {'eps_mse': eps_mse_given_noise}
LOSSES_GIVEN_NOISE.update({
    name: functools.partial(prediction_mse_given_noise, prediction)
    for name, prediction in PREDICTIONS.items() if name != 'eps_mse'})
LOSSES = {'eps_mse': eps_mse_loss}
LOSSES.update({name: _with_drawn_noise(fn)
               for name, fn in LOSSES_GIVEN_NOISE.items() if name != 'eps_mse'})


def get_loss_fn(name: str):
  if name not in LOSSES:
    raise ValueError(f'unknown loss {name!r}: set config.diffusion.loss to '
                     f'one of {sorted(LOSSES)}')
  return LOSSES[name]


def eps_model(model_fn: ModelFn, schedule: schedules.Schedule,
              loss_name: str) -> ModelFn:
  """The network as an eps-predictor, whatever it was trained to predict:
  samplers and the likelihood are written in terms of eps."""
  prediction = PREDICTIONS[loss_name]
  if prediction == 'eps':
    return model_fn
  if prediction == 'x0':
    return lambda x_t, t: schedules.eps_from_x0(schedule, x_t, t,
                                                model_fn(x_t, t))
  return lambda x_t, t: schedules.eps_from_v(schedule, x_t, t,
                                             model_fn(x_t, t))
