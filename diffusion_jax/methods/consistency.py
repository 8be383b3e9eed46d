"""Consistency models (Song et al. 2023; Song & Dhariwal 2023) as methods.

A consistency function maps every point x_sigma = x0 + sigma z of one
probability-flow ODE trajectory of the EDM process to the trajectory's end
at sigma_min, so one network call draws a sample (Song et al. 2023, sec. 3
and Algorithm 1). It is EDM's preconditioning shifted so that the boundary
condition f(x, sigma_min) = x holds exactly, for any network (Song et al.
2023, sec. 3.1 and Appendix C):

  f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise)
  c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
  c_out  = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2)
  c_in   = 1 / sqrt(sigma^2 + sigma_data^2),  c_noise = ln(sigma) / 4

F is the U-Net DiffusionMethod builds and c_noise the edm process's
model_time. Training makes f agree between neighbouring noise levels
sigma_i < sigma_{i+1} of a Karras grid (EDM eq. 5, ascending as the papers
index it), the online network at the noisier point against a target at the
less noisy one:

  consistency_training (iCT, Song & Dhariwal 2023): from data alone, the
    pair shares x0 and z (x0 + sigma_{i+1} z, x0 + sigma_i z), the target
    is the stop-gradient of the current parameters (no EMA teacher, sec.
    3.2), the pseudo-Huber metric (sec. 3.3), i from a discretised
    log-normal (sec. 3.5) and N doubling over the run (sec. 3.4);
  consistency_distillation (CD, Song et al. 2023, Algorithm 2;
    consistency_distillation.py): the pair is one Heun step of a trained
    diffusion teacher's ODE, the target an EMA of the student.

Sampling (Algorithm 1): x = sigma_0 z, x <- f(x, sigma_0), then for each
further level tau: x <- f(x + sqrt(tau^2 - sigma_min^2) z', tau). The
levels are config.consistency.sample_sigmas (() = one step from
sigma_max). Samples come from the classic EMA of the parameters.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from diffusion_jax.diffusion import denoiser
from diffusion_jax.methods.diffusion import DiffusionMethod

METRICS = ('pseudo_huber', 'l2')
# iCT sec. 3.3: c = 0.00054 sqrt(d) for data of dimension d (0.03 on
# CIFAR-10's 3072).
HUBER_C_PER_SQRT_DIM = 0.00054


class ConsistencyError(ValueError):
  """A consistency-model setting that cannot work; the message names the
  key and the fix."""


# ------------------------------------------------------------------ math --


def consistency_coefficients(sigma, sigma_min: float,
                             sigma_data: float = denoiser.SIGMA_DATA):
  """(c_skip, c_out, c_in) at sigma (Song et al. 2023, Appendix C): c_skip
  = 1 and c_out = 0 at sigma_min, so f(x, sigma_min) = x exactly."""
  d2 = sigma_data * sigma_data
  shifted = sigma - sigma_min
  root = jnp.sqrt(jnp.square(sigma) + d2)
  return (d2 / (jnp.square(shifted) + d2), sigma_data * shifted / root,
          1.0 / root)


def karras_levels(num_levels, size: int, sigma_min: float, sigma_max: float,
                  rho: float) -> jax.Array:
  """sigma_i = (s_min^(1/rho) + i / (N-1) (s_max^(1/rho) - s_min^(1/rho)))
  ^rho for i = 0..size-1, ascending (EDM eq. 5 read from the data end, the
  papers' indexing). N = num_levels may be traced (iCT's curriculum);
  levels i >= N repeat sigma_max and are never drawn."""
  frac = jnp.minimum(jnp.arange(size, dtype=jnp.float32)
                     / (jnp.asarray(num_levels, jnp.float32) - 1.0), 1.0)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (lo + frac * (hi - lo)) ** rho


def curriculum_period(total_steps: int, s0: int, s1: int) -> int:
  """K' = floor(K / (log2 floor(s1 / s0) + 1)) (iCT sec. 3.4): the steps
  between doublings, so N reaches s1 + 1 for the last K' steps. At least 1
  (a run shorter than log2(s1/s0) + 1 steps doubles every step)."""
  return max(int(total_steps / (math.log2(s1 // s0) + 1)), 1)


def curriculum_levels(step, total_steps: int, s0: int, s1: int) -> jax.Array:
  """N(k) = min(s0 2^floor(k / K'), s1) + 1 (iCT sec. 3.4): the number of
  noise levels at training step k (int32; k may be traced)."""
  doublings = jnp.asarray(step, jnp.int32) // curriculum_period(
      total_steps, s0, s1)
  # Capped where s0 2^e >= s1 already (the min below takes s1): no overflow.
  doublings = jnp.minimum(doublings, max(math.ceil(math.log2(s1 / s0)), 0))
  return jnp.minimum(s0 * jnp.left_shift(1, doublings), s1) + 1


def lognormal_index_probs(sigmas: jax.Array, num_levels, p_mean: float,
                          p_std: float) -> jax.Array:
  """p(i) for i = 0..len(sigmas)-2: the mass a log-normal N(P_mean, P_std^2)
  in ln(sigma) puts on [sigma_i, sigma_{i+1}], normalised over the N - 1
  pairs of the grid (iCT sec. 3.5):

    p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std))
           - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)),

  zero for i >= N - 1 (levels beyond the current curriculum's)."""
  cdf = erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
  mass = cdf[1:] - cdf[:-1]
  valid = jnp.arange(mass.shape[0]) < num_levels - 1
  mass = jnp.where(valid, mass, 0.0)
  return mass / jnp.sum(mass)


def pseudo_huber(a: jax.Array, b: jax.Array, c: float) -> jax.Array:
  """d(a, b) = sqrt(||a - b||^2 + c^2) - c per example (iCT sec. 3.3):
  ~||a - b||^2 / (2c) for small distances, ~||a - b|| for large ones.
  Written as ||a - b||^2 / (sqrt(||a - b||^2 + c^2) + c), the same value
  without float32's cancellation where ||a - b|| << c."""
  sq = squared_distance(a, b)
  return sq / (jnp.sqrt(sq + c * c) + c)


def squared_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """||a - b||^2 per example (Song et al. 2023's l2 metric)."""
  return jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)


def metric_fn(metric: str, c: float):
  """(a, b) -> d(a, b) per example for config.consistency.metric."""
  if metric == 'pseudo_huber':
    return lambda a, b: pseudo_huber(a, b, c)
  if metric == 'l2':
    return squared_distance
  raise ConsistencyError(f'config.consistency.metric={metric!r}: use one of '
                         f'{METRICS}')


def multistep_sample(consistency_fn, noise: jax.Array, rng: jax.Array,
                     sigmas: tuple[float, ...], sigma_min: float,
                     clip: bool = True) -> jax.Array:
  """Song et al. 2023, Algorithm 1: x = f(sigma_0 z, sigma_0), then per
  further level tau_k: x = f(x + sqrt(tau_k^2 - sigma_min^2) z_k, tau_k),
  z_k from fold_in(rng, k). `consistency_fn(x, sigma (B,))` -> f; with clip
  every estimate of the data is clipped to [-1, 1] (as the papers' code)."""
  def f(x, sigma):
    out = consistency_fn(x, jnp.full((x.shape[0],), sigma, jnp.float32))
    return jnp.clip(out, -1.0, 1.0) if clip else out

  x = f(sigmas[0] * noise, sigmas[0])
  for k, tau in enumerate(sigmas[1:], start=1):
    z = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
    x = f(x + math.sqrt(tau * tau - sigma_min * sigma_min) * z, tau)
  return x


# -------------------------------------------------------------- settings --


@dataclasses.dataclass(frozen=True)
class ConsistencySettings:
  """config.consistency with the edm process's range and defaults resolved
  (config_checks has checked the values)."""
  sigma_min: float
  sigma_max: float
  rho: float
  metric: str
  huber_c: float  # resolved: iCT's 0.00054 sqrt(d) where the key is 0
  sample_sigmas: tuple[float, ...]  # resolved: (sigma_max,) where ()
  clip: bool
  # iCT
  s0: int = 10
  s1: int = 1280
  p_mean: float = -1.1
  p_std: float = 2.0
  total_steps: int = 1
  # CD
  num_levels: int = 18
  target_ema: float = 0.95
  init_from_teacher: bool = True

  @classmethod
  def from_config(cls, config, image_shape) -> 'ConsistencySettings':
    c, d = config.consistency, config.diffusion
    dim = math.prod(image_shape)
    return cls(
        sigma_min=float(d.edm_sigma_min), sigma_max=float(d.edm_sigma_max),
        rho=float(c.rho), metric=c.metric,
        huber_c=float(c.huber_c or HUBER_C_PER_SQRT_DIM * math.sqrt(dim)),
        sample_sigmas=tuple(float(s) for s in c.sample_sigmas)
        or (float(d.edm_sigma_max),),
        clip=bool(d.clip_denoised), s0=int(c.curriculum_s0),
        s1=int(c.curriculum_s1), p_mean=float(c.p_mean),
        p_std=float(c.p_std), total_steps=int(config.num_train_steps),
        num_levels=int(c.num_levels), target_ema=float(c.target_ema),
        init_from_teacher=bool(c.init_from_teacher))


def check_method_config(config) -> None:
  """What a consistency method needs beyond config_checks' values (which
  check config.consistency itself): the edm process (its sigma is the
  consistency function's time), an unconditional network, no DDPM
  progressive figure."""
  name = config.method
  if config.diffusion.process != 'edm':
    raise ConsistencyError(
        f'config.method={name!r} runs on the edm process: set '
        "config.diffusion.process='edm' (with time_sampling='log_normal' "
        f"and sample.sampler='edm'), not {config.diffusion.process!r}")
  if config.model.num_classes:
    raise ConsistencyError(
        f'config.method={name!r} is unconditional here: set '
        'config.model.num_classes=0')
  if config.sample.progressive_timesteps:
    raise ConsistencyError(
        'config.sample.progressive_timesteps needs the ddpm sampler; a '
        'consistency model samples with config.consistency.sample_sigmas: '
        'set it to ()')


# ---------------------------------------------------------------- methods --


class ConsistencyMethod(DiffusionMethod):
  """What both consistency methods share: f, its metric and sampling."""

  name = 'consistency'
  settings: ConsistencySettings  # set by from_config
  distance: Callable[[jax.Array, jax.Array], jax.Array]  # d(a, b) (B,)

  @classmethod
  def from_config(cls, config, **kwargs) -> 'ConsistencyMethod':
    check_method_config(config)  # before the diffusion checks: clearer
    method = super().from_config(config, **kwargs)
    method.settings = ConsistencySettings.from_config(config,
                                                      method.image_shape)
    method.distance = metric_fn(method.settings.metric,
                                method.settings.huber_c)
    return method

  def consistency_fn(self, params, *, train: bool = False, dropout_rng=None):
    """(x, sigma (B,)) -> f(x, sigma), Appendix C's parameterisation."""
    network_fn = self.network_fn(params, train=train, dropout_rng=dropout_rng)

    def f(x, sigma):
      c_skip, c_out, c_in = (denoiser.bcast(c, x) for c in
                             consistency_coefficients(
                                 sigma, self.settings.sigma_min))
      return c_skip * x + c_out * network_fn(c_in * x, sigma)
    return f

  def sample(self, params, noise, rng):
    s = self.settings
    return multistep_sample(self.consistency_fn(params), noise, rng,
                            s.sample_sigmas, s.sigma_min, s.clip)

  def network_calls(self) -> int:
    return len(self.settings.sample_sigmas)

  def sample_progressive(self, params, noise, rng, x0_at):
    raise ConsistencyError('config.sample.progressive_timesteps needs the '
                           'ddpm sampler: set it to ()')

  def log_likelihood(self, params, images, rng):
    del params, images, rng
    return None  # no likelihood for a consistency model

  def _sampling(self) -> str:
    n = len(self.settings.sample_sigmas)
    return f'{n}-step sampling at sigmas {self.settings.sample_sigmas}'


class ConsistencyTraining(ConsistencyMethod):
  """iCT: consistency training without a teacher (Song & Dhariwal 2023)."""

  name = 'consistency_training'

  def describe(self) -> str:
    s = self.settings
    return (f'consistency training (iCT): N {s.s0 + 1}->{s.s1 + 1} levels, '
            f'{s.metric} metric, {self._sampling()}')

  def train_step(self, state, batch):
    # draw() needs the step for N(k); the base step hands the batch only to
    # draw, so the step travels with it.
    return super().train_step(state, {'images': batch, 'step': state.step})

  def draw(self, batch, rng, aux_state):
    del aux_state
    s = self.settings
    images = batch['images']
    n = images.shape[0]
    index_rng, noise_rng = jax.random.split(rng)
    num_levels = curriculum_levels(batch['step'], s.total_steps, s.s0, s.s1)
    sigmas = karras_levels(num_levels, s.s1 + 1, s.sigma_min, s.sigma_max,
                           s.rho)
    probs = lognormal_index_probs(sigmas, num_levels, s.p_mean, s.p_std)
    i = jax.random.categorical(index_rng, jnp.log(probs), shape=(n,))
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    return dict(x0=images, noise=jax.random.normal(noise_rng, images.shape,
                                                   images.dtype),
                sigma=sigma, sigma_next=sigma_next,
                # lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) (iCT sec. 3.1)
                weights=1.0 / (sigma_next - sigma))

  def loss(self, params, xs, rng):
    # One dropout rng for both calls: the same masks in the online network
    # and its target, so the pair differs only by the noise level (iCT
    # sec. 3.1: synchronised dropout rngs stabilise consistency training).
    # The target is the current parameters under stop_gradient: no EMA
    # teacher (iCT sec. 3.2: only then does CT's objective approach the
    # consistency model's as N -> infinity).
    f = self.consistency_fn(params, train=True, dropout_rng=rng)
    x0, z = xs['x0'], xs['noise']
    online = f(x0 + denoiser.bcast(xs['sigma_next'], z) * z, xs['sigma_next'])
    target = jax.lax.stop_gradient(
        f(x0 + denoiser.bcast(xs['sigma'], z) * z, xs['sigma']))
    values = xs['weights'] * self.distance(online, target)
    return jnp.mean(values), values
