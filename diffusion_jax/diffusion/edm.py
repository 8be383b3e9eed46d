"""EDM (Karras et al. 2022): its process, its training noise levels and its
stochastic Heun sampler.

The process is x = x0 + sigma n with the time *being* sigma (EDM's
"sigma(t) = t, s(t) = 1", Table 1), so t runs over [sigma_min, sigma_max]
(0.002 and 80), not [0, 1]. Training draws ln(sigma) ~ N(P_mean, P_std^2)
(-1.2, 1.2; sec. 5), the network sees c_noise = ln(sigma) / 4, and the
preconditioning is the 'edm' prediction of denoiser.py.

`edm_sample` is Algorithm 2 of the paper over a sigma_grid.SigmaGrid, so it
samples a model of any process (the discrete DDPM schedule, VP, VE,
rectified flow, EDM) through the denoiser, in x~ = x_t / alpha_t.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import sigma_grid
from diffusion_jax.diffusion.sigma_grid import SigmaGrid


@dataclasses.dataclass(frozen=True)
class EDMProcess:
  """x_sigma = x0 + sigma eps, t = sigma in [sigma_min, sigma_max].

  Frozen and hashable like sde.Process; alpha_sigma / derivatives /
  model_time are what losses, the denoiser and the samplers call.
  """
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  p_mean: float = -1.2
  p_std: float = 1.2

  kind = 'edm'
  is_discrete = False

  def __post_init__(self):
    for name in ('sigma_min', 'sigma_max', 'p_mean', 'p_std'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'config.diffusion.edm_{name}={value!r} must be a '
                         'finite number')
      object.__setattr__(self, name, float(value))
    if not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(
          'the EDM process needs 0 < config.diffusion.edm_sigma_min < '
          f'edm_sigma_max, got {self.sigma_min} and {self.sigma_max}')
    if not self.p_std > 0:
      raise ValueError(f'config.diffusion.edm_p_std={self.p_std} must be > 0')

  @property
  def t_min(self) -> float:
    return self.sigma_min

  @property
  def prior_std(self) -> float:
    return self.sigma_max

  def alpha_sigma(self, t):
    t = jnp.asarray(t, jnp.float32)
    return jnp.ones_like(t), t

  def derivatives(self, t):
    t = jnp.asarray(t, jnp.float32)
    return jnp.zeros_like(t), jnp.ones_like(t)

  def model_time(self, t):
    """c_noise = ln(sigma) / 4 (EDM Table 1)."""
    return 0.25 * jnp.log(jnp.asarray(t, jnp.float32))

  def sample_time(self, rng: jax.Array, n: int) -> jax.Array:
    """Training sigmas: ln(sigma) ~ N(P_mean, P_std^2) (EDM sec. 5), not
    clipped to [sigma_min, sigma_max], as the paper's training."""
    return jnp.exp(self.p_mean + self.p_std
                   * jax.random.normal(rng, (n,), jnp.float32))


def process_from_config(diffusion_config) -> EDMProcess:
  d = diffusion_config
  return EDMProcess(sigma_min=d.edm_sigma_min, sigma_max=d.edm_sigma_max,
                    p_mean=d.edm_p_mean, p_std=d.edm_p_std)


@dataclasses.dataclass(frozen=True)
class Churn:
  """EDM's stochasticity (Algorithm 2): at sigma_i in [s_tmin, s_tmax] noise
  is added to raise it to sigma_i (1 + gamma), gamma = min(s_churn / N,
  sqrt(2) - 1), with noise scaled by s_noise. s_churn = 0: the
  deterministic Heun sampler (Algorithm 1)."""
  s_churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = float('inf')
  s_noise: float = 1.0

  def check(self) -> None:
    if not self.s_churn >= 0:
      raise ValueError(f'config.sample.s_churn={self.s_churn} must be >= 0 '
                       '(0: deterministic)')
    if not 0 <= self.s_tmin <= self.s_tmax:
      raise ValueError('need 0 <= config.sample.s_tmin <= s_tmax, got '
                       f'{self.s_tmin} and {self.s_tmax}')
    if not self.s_noise > 0:
      raise ValueError(f'config.sample.s_noise={self.s_noise} must be > 0 '
                       '(EDM: 1.0 to 1.007)')

  def gammas(self, sigmas: np.ndarray) -> np.ndarray:
    n = len(sigmas)
    gamma = min(self.s_churn / n, math.sqrt(2.0) - 1.0)
    inside = (sigmas >= self.s_tmin) & (sigmas <= self.s_tmax)
    return np.where(inside, gamma, 0.0)


def network_calls(grid: SigmaGrid) -> int:
  """Heun: two calls per step, one for the last step to sigma = 0."""
  return 2 * grid.num_steps - 1


def edm_sample(denoise_fn, process, grid: SigmaGrid, z: jax.Array,
               rng: jax.Array, churn: Churn = Churn()) -> jax.Array:
  """EDM Algorithm 2 (Algorithm 1 without churn) from x~_0 = sigma_0 z.

  Per step i: sigma^_i = sigma_i (1 + gamma_i) (snapped to the process's
  timesteps where discrete), x^ = x_i + sqrt(sigma^^2 - sigma_i^2) S_noise
  w_i; d = (x^ - D(x^; sigma^)) / sigma^; x_{i+1} = x^ + (sigma_{i+1} -
  sigma^) d, then Heun's correction with d' at sigma_{i+1} unless it is 0
  (the last step is Euler: 2N - 1 network calls). Returns x~_N = D's
  estimate of the data, in the data's own scale. w_i comes from
  fold_in(rng, i).
  """
  churn.check()
  sigmas = grid.sigmas[:-1]
  hats = sigmas * (1.0 + churn.gammas(sigmas))
  churned = hats > sigmas
  hat_times = np.array(grid.times)
  hat_alphas = np.array(grid.alphas)
  if churned.any():
    t, snapped = sigma_grid.t_of_sigma(process, hats[churned])
    hats[churned] = np.maximum(snapped, sigmas[churned])
    hat_times[churned] = t
    hat_alphas[churned] = sigma_grid.alphas_at(process, t)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  times = jnp.asarray(grid.times)
  steps = dict(i=jnp.arange(grid.num_steps), sigma=f32(sigmas),
               hat=f32(hats), hat_t=jnp.asarray(hat_times),
               hat_alpha=f32(hat_alphas), next=f32(grid.sigmas[1:]),
               next_t=jnp.concatenate([times[1:], times[-1:]]),
               next_alpha=f32(np.append(grid.alphas[1:], 1.0)))

  def euler(x, s):
    noise = jax.random.normal(jax.random.fold_in(rng, s['i']), x.shape,
                              x.dtype)
    x_hat = x + (jnp.sqrt(jnp.maximum(s['hat'] ** 2 - s['sigma'] ** 2, 0.0))
                 * churn.s_noise * noise)
    d = (x_hat - sigma_grid.denoise_at(denoise_fn, x_hat, s['hat_t'],
                                       s['hat_alpha'])) / s['hat']
    return x_hat, d, x_hat + (s['next'] - s['hat']) * d

  def heun(x, s):
    x_hat, d, x_next = euler(x, s)
    d_next = (x_next - sigma_grid.denoise_at(
        denoise_fn, x_next, s['next_t'], s['next_alpha'])) / s['next']
    return x_hat + (s['next'] - s['hat']) * 0.5 * (d + d_next), None

  x = f32(grid.sigmas[0]) * z
  head = jax.tree.map(lambda a: a[:-1], steps)
  last = jax.tree.map(lambda a: a[-1], steps)
  x, _ = jax.lax.scan(heun, x, head)
  return euler(x, last)[2]
