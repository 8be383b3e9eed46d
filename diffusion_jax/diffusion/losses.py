"""Diffusion training losses: pure functions of (model, data, rng).

Discrete-time objectives (config.diffusion.loss) over the DDPM process of
schedules.py:
  eps_mse, x0_mse, v_mse  L_simple with the network predicting eps, x0 or v
                          (Ho et al. 2020 eq. 14; Salimans & Ho 2022);
  hybrid                  L_simple + lambda L_vlb with a learned-range
                          variance, lambda = 0.001 (Nichol & Dhariwal 2021);
  vlb                     L_vlb alone (the bound, learned mean and variance;
                          pair it with importance sampling of t).
A network trained with hybrid or vlb outputs 2C channels: eps, then the
variance interpolation v in [-1, 1] (see samplers.p_mean_variance).

Importance sampling of t (`ImportanceSampler`) keeps the last 10 losses of
every t in the train state and draws t with p_t ~ sqrt(E[L_t^2]) once every
t has 10 of them, weighting each example by 1 / (T p_t) so the objective
stays unbiased (improved DDPM, sec. 3.3).
"""

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import likelihood
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion import sde
from diffusion_jax.diffusion.samplers import ModelFn, split_output

# config.diffusion.loss -> what the network predicts (its mean part).
PREDICTIONS = {'eps_mse': 'eps', 'x0_mse': 'x0', 'v_mse': 'v',
               'velocity_mse': 'velocity', 'hybrid': 'eps', 'vlb': 'eps'}
# The losses of the continuous-time processes (sde.py): a plain MSE on the
# target, t from sde.sample_time.
CONTINUOUS_LOSSES = ('eps_mse', 'x0_mse', 'v_mse', 'velocity_mse')
# Losses whose network also outputs a variance (2C channels).
LEARNED_VARIANCE = ('hybrid', 'vlb')
# improved DDPM's lambda: L_hybrid = L_simple + 0.001 L_vlb.
HYBRID_VLB_WEIGHT = 1e-3


def learns_variance(loss_name: str) -> bool:
  return loss_name in LEARNED_VARIANCE


def _mean_per_example(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def draw_t_and_noise(schedule: schedules.Schedule, x0: jax.Array,
                     rng: jax.Array, probs: Optional[jax.Array] = None,
                     ) -> tuple[jax.Array, jax.Array]:
  """The per-example t and eps of one batch, drawn for the whole batch at
  once: gradient accumulation slices these instead of drawing per
  micro-batch, so splitting a batch does not change its randomness.

  t is uniform on {0..T-1}, or drawn from `probs` (shape (T,)) when given.
  """
  t_rng, noise_rng = jax.random.split(rng)
  if probs is None:
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
  else:
    t = jax.random.categorical(t_rng, jnp.log(probs), shape=(x0.shape[0],))
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  return t.astype(jnp.int32), noise


def prediction_mse_per_example(prediction: str, model_fn: ModelFn,
                               schedule: schedules.Schedule, x0: jax.Array,
                               t: jax.Array, noise: jax.Array) -> jax.Array:
  """|| target - f(x_t, t) ||^2 per example (mean over pixels), with target
  eps, x0 or v = a eps - b x0. The weighting over t differs between
  targets: eps-MSE is x0-MSE times abar/(1 - abar)."""
  x_t = schedules.q_sample(schedule, x0, t, noise)
  target = {'eps': lambda: noise, 'x0': lambda: x0,
            'v': lambda: schedules.v_from_eps_x0(schedule, x_t, t, noise, x0),
            }[prediction]()
  return _mean_per_example(jnp.square(target - model_fn(x_t, t)))


def vlb_per_example(model_fn: ModelFn, schedule: schedules.Schedule,
                    x0: jax.Array, t: jax.Array, noise: jax.Array, *,
                    mse_weight: float, vlb_weight: float,
                    freeze_mean: bool) -> jax.Array:
  """mse_weight * L_simple + vlb_weight * L_t for a learned-variance model.

  L_t is the bound's term at t in bits/dim (likelihood.vlb_term_bpd: the KL
  to the true posterior for t > 0, the discretized decoder at t = 0), with
  the sampler's reverse process under the learned variance and no clipping
  (clipping has no useful gradient). With `freeze_mean` the mean part of the
  output is stop-gradient inside L_t, so the bound only trains the variance
  and L_simple alone trains the mean (the hybrid objective).
  """
  x_t = schedules.q_sample(schedule, x0, t, noise)
  out = model_fn(x_t, t)
  eps, var_values = split_output(out, x0.shape[-1])
  if var_values is None:
    raise ValueError('the hybrid / vlb losses need a network with 2C output '
                     'channels (eps and the variance interpolation)')
  frozen = jnp.concatenate(
      [jax.lax.stop_gradient(eps) if freeze_mean else eps, var_values], -1)
  term, _ = likelihood.vlb_term_bpd(lambda *_: frozen, schedule, x0, x_t, t,
                                    variance='learned', clip_denoised=False)
  loss = vlb_weight * term
  if mse_weight:
    loss += mse_weight * _mean_per_example(jnp.square(noise - eps))
  return loss


def _hybrid(model_fn, schedule, x0, t, noise):
  # improved DDPM: L_simple + 0.001 L_vlb, L_vlb = T E_t[L_t].
  return vlb_per_example(
      model_fn, schedule, x0, t, noise, mse_weight=1.0,
      vlb_weight=HYBRID_VLB_WEIGHT * schedule.num_timesteps, freeze_mean=True)


def _vlb(model_fn, schedule, x0, t, noise):
  # L_vlb = T E_t[L_t] (bits/dim): the mean over t of T L_t.
  return vlb_per_example(model_fn, schedule, x0, t, noise, mse_weight=0.0,
                         vlb_weight=float(schedule.num_timesteps),
                         freeze_mean=False)


# name -> (model_fn, schedule, x0, t, noise) -> (B,) per-example losses.
PER_EXAMPLE = {name: functools.partial(prediction_mse_per_example, prediction)
               for name, prediction in PREDICTIONS.items()
               if name not in LEARNED_VARIANCE + ('velocity_mse',)}
PER_EXAMPLE.update(hybrid=_hybrid, vlb=_vlb)


def _scalar(per_example_fn):
  def loss(model_fn, schedule, x0, t, noise):
    return jnp.mean(per_example_fn(model_fn, schedule, x0, t, noise))
  return loss


def _with_drawn_noise(given_noise):
  def loss(model_fn, schedule, x0, rng):
    t, noise = draw_t_and_noise(schedule, x0, rng)
    return given_noise(model_fn, schedule, x0, t, noise)
  return loss


# The batch-mean losses given pre-drawn (t, noise) (see draw_t_and_noise),
# and the same drawing their own t and noise from an rng.
LOSSES_GIVEN_NOISE = {name: _scalar(fn) for name, fn in PER_EXAMPLE.items()}
LOSSES = {name: _with_drawn_noise(fn) for name, fn in LOSSES_GIVEN_NOISE.items()}
eps_mse_given_noise = LOSSES_GIVEN_NOISE['eps_mse']
eps_mse_loss = LOSSES['eps_mse']  # L_simple, DDPM Algorithm 1.


def get_loss_fn(name: str):
  if name not in LOSSES:
    raise ValueError(f'unknown loss {name!r}: set config.diffusion.loss to '
                     f'one of {sorted(LOSSES)}')
  return LOSSES[name]


def eps_model(model_fn: ModelFn, schedule: schedules.Schedule,
              loss_name: str) -> ModelFn:
  """The network as an eps-predictor, whatever it was trained to predict:
  samplers and the likelihood are written in terms of eps. A learned
  variance (2C channels) passes through unchanged."""
  prediction = PREDICTIONS[loss_name]
  if prediction == 'eps':
    return model_fn
  if prediction == 'x0':
    return lambda x_t, t: schedules.eps_from_x0(schedule, x_t, t,
                                                model_fn(x_t, t))
  return lambda x_t, t: schedules.eps_from_v(schedule, x_t, t,
                                             model_fn(x_t, t))


@flax.struct.dataclass
class LossHistory:
  """The last `history` losses of every timestep (improved DDPM, sec. 3.3)."""
  values: jax.Array  # (T, history) float32
  counts: jax.Array  # (T,) int32, how many of the slots hold losses


@flax.struct.dataclass
class ImportanceSampler:
  """p_t proportional to sqrt(E[L_t^2]) over the last `history` losses of t,
  uniform until every t has a full history, mixed with a small uniform part
  so no t starves (improved DDPM's loss-second-moment resampler)."""
  num_timesteps: int = flax.struct.field(pytree_node=False)
  history: int = flax.struct.field(pytree_node=False, default=10)
  uniform_prob: float = flax.struct.field(pytree_node=False, default=1e-3)

  def init(self) -> LossHistory:
    return LossHistory(
        values=jnp.zeros((self.num_timesteps, self.history), jnp.float32),
        counts=jnp.zeros((self.num_timesteps,), jnp.int32))

  def probs(self, state: LossHistory) -> jax.Array:
    uniform = jnp.full((self.num_timesteps,), 1.0 / self.num_timesteps)
    weights = jnp.sqrt(jnp.mean(jnp.square(state.values), axis=1))
    weights = weights / jnp.maximum(jnp.sum(weights), 1e-30)
    weights = weights * (1 - self.uniform_prob) + self.uniform_prob * uniform
    warm = jnp.all(state.counts >= self.history)
    return jnp.where(warm, weights, uniform)

  def weights(self, probs: jax.Array, t: jax.Array) -> jax.Array:
    """1 / (T p_t): E_{t~p}[w_t L_t] = E_{t~uniform}[L_t]."""
    return 1.0 / (self.num_timesteps * probs[t])

  def update(self, state: LossHistory, t: jax.Array,
             losses: jax.Array) -> LossHistory:
    """Appends each example's loss to its t's history in batch order (the
    oldest drops out of a full history), as the reference implementation
    does one example at a time."""
    def add(state, tl):
      t_i, loss = tl
      row, count = state.values[t_i], state.counts[t_i]
      full = count >= self.history
      row = jnp.where(full, jnp.roll(row, -1).at[-1].set(loss),
                      row.at[jnp.minimum(count, self.history - 1)].set(loss))
      return LossHistory(state.values.at[t_i].set(row),
                         state.counts.at[t_i].set(
                             jnp.minimum(count + 1, self.history))), None

    state, _ = jax.lax.scan(add, state, (t, jax.lax.stop_gradient(losses)))
    return state


def continuous_per_example(prediction: str, model_fn: ModelFn,
                           process: sde.Process, x0: jax.Array, t: jax.Array,
                           noise: jax.Array) -> jax.Array:
  """|| target - f(x_t, t) ||^2 per example for a continuous process, t in
  [t_min, 1] (the network sees sde.model_time(t) through model_fn)."""
  x_t = sde.q_sample(process, x0, t, noise)
  target = sde.target(process, prediction, x0, noise, t)
  return _mean_per_example(jnp.square(target - model_fn(x_t, t)))


def per_example_loss(loss_name: str, continuous: bool):
  """(model_fn, schedule or process, x0, t, noise) -> (B,) losses."""
  if continuous:
    return functools.partial(continuous_per_example, PREDICTIONS[loss_name])
  return PER_EXAMPLE[loss_name]


def check_config(diffusion_config) -> None:
  """Fails early on a loss / process / time-sampling / variance mismatch."""
  d = diffusion_config
  name, sampling = d.loss, d.time_sampling
  if d.process != 'ddpm':
    if name not in CONTINUOUS_LOSSES:
      raise ValueError(
          f'config.diffusion.loss={name!r} is not available for the '
          f'continuous process {d.process!r}: use one of {CONTINUOUS_LOSSES} '
          "(hybrid / vlb need the discrete process='ddpm')")
    if sampling not in ('uniform', 'logit_normal'):
      raise ValueError(
          f'config.diffusion.time_sampling={sampling!r}: continuous '
          "processes draw t 'uniform' or 'logit_normal'")
    return
  if name == 'velocity_mse':
    raise ValueError("config.diffusion.loss='velocity_mse' needs a continuous "
                     "process (config.diffusion.process='rectified_flow', "
                     "'vp' or 've'); with 'ddpm' use eps_mse, x0_mse or v_mse")
  get_loss_fn(name)
  if sampling not in ('uniform', 'importance'):
    raise ValueError(
        f'unknown config.diffusion.time_sampling {sampling!r} for the '
        "discrete DDPM process: use 'uniform' or 'importance' "
        "('logit_normal' is for the continuous processes)")
  if sampling == 'importance' and not learns_variance(name):
    raise ValueError(
        "config.diffusion.time_sampling='importance' reweights the bound's "
        "terms: use it with config.diffusion.loss='vlb' (or 'hybrid')")
  learned = d.sampler_variance == 'learned'
  if learned != learns_variance(name):
    raise ValueError(
        f'config.diffusion.loss={name!r} with sampler_variance='
        f'{d.sampler_variance!r}: a network trained with hybrid / vlb outputs '
        "its variance, so set config.diffusion.sampler_variance='learned'; "
        "other losses need 'beta' or 'beta_tilde'")
