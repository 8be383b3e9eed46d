"""Diffusion training losses: pure functions of (network, process, data).

config.diffusion.prediction says what the network predicts (eps, x0, v,
velocity; denoiser.py), config.diffusion.loss how it is trained:
  mse     || target - f(x_t, t) ||^2, L_simple (Ho et al. 2020 eq. 14) for
          eps; any process. The prediction sets the weighting over t:
          eps-MSE is x0-MSE times alpha^2 / sigma^2.
  hybrid  L_simple + lambda L_vlb with a learned-range variance, lambda =
          0.001 (Nichol & Dhariwal 2021, sec. 3.1); ddpm and eps only.
  vlb     L_vlb alone (the bound, learned mean and variance; pair it with
          importance sampling of t).
A network trained with hybrid or vlb outputs 2C channels: eps, then the
variance interpolation in [-1, 1] (samplers.p_mean_variance).

Importance sampling of t (`ImportanceSampler`) keeps the last 10 losses of
every t in the train state and draws t with p_t ~ sqrt(E[L_t^2]) once every
t has 10 of them, weighting each example by 1 / (T p_t) so the objective
stays unbiased (improved DDPM, sec. 3.3).
"""

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import denoiser, likelihood, schedules, sde
from diffusion_jax.diffusion.denoiser import Denoised, NetworkFn

LOSSES = ('mse', 'hybrid', 'vlb')
# Losses whose network also outputs a variance (2C channels).
LEARNED_VARIANCE = ('hybrid', 'vlb')
# improved DDPM's lambda: L_hybrid = L_simple + 0.001 L_vlb.
HYBRID_VLB_WEIGHT = 1e-3
# The loss names before prediction and loss were two keys.
_OLD_LOSSES = {'eps_mse': 'eps', 'x0_mse': 'x0', 'v_mse': 'v',
               'velocity_mse': 'velocity'}


def learns_variance(loss_name: str) -> bool:
  return loss_name in LEARNED_VARIANCE


def _mean_per_example(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def draw_t_and_noise(schedule: schedules.Schedule, x0: jax.Array,
                     rng: jax.Array, probs: Optional[jax.Array] = None,
                     ) -> tuple[jax.Array, jax.Array]:
  """The per-example t and eps of one batch of the discrete process, drawn
  for the whole batch at once: gradient accumulation slices these instead of
  drawing per micro-batch, so splitting a batch does not change its
  randomness.

  t is uniform on {0..T-1}, or drawn from `probs` (shape (T,)) when given.
  """
  t_rng, noise_rng = jax.random.split(rng)
  if probs is None:
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
  else:
    t = jax.random.categorical(t_rng, jnp.log(probs), shape=(x0.shape[0],))
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  return t.astype(jnp.int32), noise


def mse_per_example(prediction: str, network_fn: NetworkFn, process,
                    x0: jax.Array, t: jax.Array,
                    noise: jax.Array) -> jax.Array:
  """|| target - f(x_t, t) ||^2 per example (mean over pixels), for any
  process and prediction (denoiser.target)."""
  x_t = denoiser.q_sample(process, x0, t, noise)
  want = denoiser.target(process, prediction, x0, noise, t)
  out = network_fn(denoiser.network_input(process, prediction, x_t, t), t)
  return _mean_per_example(jnp.square(want - out))


def mse_loss(network_fn: NetworkFn, process, prediction: str, x0: jax.Array,
             t: jax.Array, noise: jax.Array) -> jax.Array:
  """The batch mean of mse_per_example."""
  return jnp.mean(mse_per_example(prediction, network_fn, process, x0, t,
                                  noise))


def simple_loss(network_fn: NetworkFn, schedule: schedules.Schedule,
                x0: jax.Array, rng: jax.Array) -> jax.Array:
  """L_simple with its own draw of t and eps: DDPM Algorithm 1, lines 2-5."""
  t, noise = draw_t_and_noise(schedule, x0, rng)
  return mse_loss(network_fn, schedule, 'eps', x0, t, noise)


def vlb_per_example(network_fn: NetworkFn, schedule: schedules.Schedule,
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
  x_t = denoiser.q_sample(schedule, x0, t, noise)
  eps, var_values = denoiser.split_output(network_fn(x_t, t), x0.shape[-1])
  if var_values is None:
    raise ValueError('the hybrid / vlb losses need a network with 2C output '
                     'channels (eps and the variance interpolation)')
  mean_eps = jax.lax.stop_gradient(eps) if freeze_mean else eps
  x0_hat, _ = denoiser.to_x0_eps(schedule, 'eps', x_t, t, mean_eps)
  frozen = Denoised(x0_hat, mean_eps, var_values)
  term, _ = likelihood.vlb_term_bpd(lambda *_: frozen, schedule, x0, x_t, t,
                                    variance='learned', clip_denoised=False)
  loss = vlb_weight * term
  if mse_weight:
    loss += mse_weight * _mean_per_example(jnp.square(noise - eps))
  return loss


def _hybrid(network_fn, schedule, x0, t, noise):
  # improved DDPM: L_simple + 0.001 L_vlb, L_vlb = T E_t[L_t].
  return vlb_per_example(
      network_fn, schedule, x0, t, noise, mse_weight=1.0,
      vlb_weight=HYBRID_VLB_WEIGHT * schedule.num_timesteps, freeze_mean=True)


def _vlb(network_fn, schedule, x0, t, noise):
  # L_vlb = T E_t[L_t] (bits/dim): the mean over t of T L_t.
  return vlb_per_example(network_fn, schedule, x0, t, noise, mse_weight=0.0,
                         vlb_weight=float(schedule.num_timesteps),
                         freeze_mean=False)


def per_example_loss(loss_name: str, prediction: str):
  """(network_fn, process, x0, t, noise) -> (B,) losses."""
  if loss_name == 'hybrid':
    return _hybrid
  if loss_name == 'vlb':
    return _vlb
  return lambda network_fn, process, x0, t, noise: mse_per_example(
      prediction, network_fn, process, x0, t, noise)


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


def check_config(diffusion_config) -> None:
  """Fails early on a process / prediction / loss / time-sampling /
  variance mismatch."""
  d = diffusion_config
  name, sampling, prediction = d.loss, d.time_sampling, d.prediction
  if name in _OLD_LOSSES:
    raise ValueError(
        f'config.diffusion.loss={name!r} is now two keys: set '
        f'config.diffusion.prediction={_OLD_LOSSES[name]!r} and '
        "config.diffusion.loss='mse'")
  if name not in LOSSES:
    raise ValueError(f'unknown loss {name!r}: set config.diffusion.loss to '
                     f'one of {LOSSES}')
  discrete = d.process == 'ddpm'
  denoiser.check_prediction(prediction, discrete)
  if d.process == 'rectified_flow' and prediction == 'edm':
    raise ValueError(
        "config.diffusion.prediction='edm' scales by sigma / alpha, infinite "
        "at rectified flow's t = 1 (alpha = 0): predict 'velocity', 'v' or "
        "'x0' there, or use process 'edm' or 'vp' for the preconditioning")
  if learns_variance(name) and (not discrete or prediction != 'eps'):
    raise ValueError(
        f'config.diffusion.loss={name!r} trains a learned variance of the '
        "discrete process: it needs config.diffusion.process='ddpm' and "
        "config.diffusion.prediction='eps'")
  if d.process == 'edm':
    if sampling != 'log_normal':
      raise ValueError(
          f'config.diffusion.time_sampling={sampling!r}: the edm process '
          "draws its noise levels log-normally: set it to 'log_normal' "
          '(ln sigma ~ N(edm_p_mean, edm_p_std^2), EDM sec. 5)')
    return
  if not discrete:
    if sampling not in sde.TIME_SAMPLING:
      raise ValueError(
          f'config.diffusion.time_sampling={sampling!r}: continuous '
          f'processes draw t from one of {sde.TIME_SAMPLING}')
    return
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
