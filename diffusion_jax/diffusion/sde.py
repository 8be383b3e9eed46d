"""Continuous-time diffusion: VP and VE SDEs and the rectified-flow path.

Every process here is a Gaussian path x_t = alpha(t) x0 + sigma(t) eps,
eps ~ N(0, I), t in [0, 1] (t = 0 data, t = 1 noise):

  vp (Song et al. 2021, DDPM's continuous limit): beta(t) = beta_min
      + t (beta_max - beta_min), alpha = exp(-int_0^t beta / 2),
      sigma = sqrt(1 - alpha^2); alpha^2 + sigma^2 = 1.
  ve (Song et al. 2021, NCSN's continuous limit): alpha = 1,
      sigma = sigma_min (sigma_max / sigma_min)^t.
  rectified_flow (Liu et al. 2022; Esser et al. 2024): alpha = 1 - t,
      sigma = t.

Writing all three in the same (alpha, sigma) form as the discrete DDPM
schedule lets one set of formulas serve every process: the training targets
and their exact inverses (denoiser.py), the SDE (derived from alpha and sigma
rather than coded per process) and the probability-flow ODE of
sde_samplers.py. The targets' scales differ: the velocity of VP grows like
1/sigma as t -> 0, and v of VE like sigma_max, so 'velocity' is the natural
target for rectified flow and 'eps' or 'v' for VP.

t arrays have shape (B,) (or are scalars) and coefficients broadcast over the
trailing image axes of x.
"""

import dataclasses
import math
import numbers
import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.denoiser import bcast

PROCESSES = ('vp', 've', 'rectified_flow')

# The smallest t trained and sampled when Process.t_min is not given. VP needs
# t_min > 0: sigma(0) = 0, and the score -eps/sigma and x0 -> eps divide by it.
# score_sde trains both VP and VE on t in [1e-5, 1] and samples VE down to
# 1e-5 but VP only down to 1e-3 (sigma ~ 0.01 there, where VP's sigma' ~
# 1/sigma makes the last steps stiff). To sample like that, pass the samplers
# dataclasses.replace(process, t_min=1e-3).
# Rectified flow is well defined at t = 0 and integrates all the way to the
# data.
DEFAULT_T_MIN = {'vp': 1e-5, 've': 1e-5, 'rectified_flow': 0.0}


def _time(t) -> jax.Array:
  return jnp.asarray(t, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Process:
  """One continuous Gaussian path x_t = alpha(t) x0 + sigma(t) eps.

  Frozen and hashable, so it can be closed over or passed as a static
  argument of jax.jit; its methods are pure jnp functions of t.

  Attributes:
    kind: 'vp', 've' or 'rectified_flow'.
    beta_min, beta_max: VP's linear beta(t) (score_sde: 0.1 and 20, the
      continuous limit of DDPM's 1e-4..0.02 over 1000 steps).
    sigma_min, sigma_max: VE's geometric noise levels (score_sde CIFAR-10:
      0.01 and 50; sigma_max should be about the largest distance between
      training images so the prior covers the data).
    t_min: the smallest t trained and sampled (samplers integrate from 1 down
      to t_min). None picks DEFAULT_T_MIN[kind]: 1e-5 for vp/ve, 0 for
      rectified_flow.
  """
  kind: str
  beta_min: float = 0.1
  beta_max: float = 20.0
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  t_min: float | None = None

  def __post_init__(self):
    if self.kind not in PROCESSES:
      raise ValueError(f'unknown diffusion process {self.kind!r}: choose one '
                       f'of {PROCESSES}')
    t_min = DEFAULT_T_MIN[self.kind] if self.t_min is None else self.t_min
    for name, value in (('beta_min', self.beta_min),
                        ('beta_max', self.beta_max),
                        ('sigma_min', self.sigma_min),
                        ('sigma_max', self.sigma_max), ('t_min', t_min)):
      if (not isinstance(value, numbers.Real) or isinstance(value, bool)
          or not math.isfinite(value)):
        raise ValueError(f'{name} must be a finite number, got {value!r}')
      # Plain floats keep the dataclass hashable and the formulas float32.
      object.__setattr__(self, name, float(value))
    if self.kind == 'vp' and not (0 <= self.beta_min <= self.beta_max
                                  and self.beta_max > 0):
      raise ValueError('the VP process needs 0 <= beta_min <= beta_max and '
                       f'beta_max > 0, got beta_min={self.beta_min}, '
                       f'beta_max={self.beta_max}')
    if self.kind == 've' and not 0 < self.sigma_min < self.sigma_max:
      raise ValueError('the VE process needs 0 < sigma_min < sigma_max, got '
                       f'sigma_min={self.sigma_min}, '
                       f'sigma_max={self.sigma_max}')
    if not 0 <= self.t_min < 1:
      raise ValueError(f't_min must lie in [0, 1), got {self.t_min}')
    if self.kind == 'vp' and self.t_min == 0:
      raise ValueError('the VP process needs t_min > 0 (e.g. 1e-5): sigma(0) '
                       '= 0 and the score -eps/sigma diverges there')

  is_discrete = False  # denoiser.py: t is a float in [0, 1]

  def model_time(self, t: jax.Array) -> jax.Array:
    """The network's time input (see the module function model_time)."""
    return model_time(t)

  def alpha_sigma(self, t) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)), each with the shape of t, float32."""
    t = _time(t)
    if self.kind == 'vp':
      log_alpha = (-0.25 * t ** 2 * (self.beta_max - self.beta_min)
                   - 0.5 * t * self.beta_min)
      # 1 - alpha^2 = -expm1(2 log alpha): no cancellation at small t, where
      # alpha^2 rounds to 1 in float32 (sigma(1e-5) ~ 3e-3).
      return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
    if self.kind == 've':
      log_ratio = math.log(self.sigma_max / self.sigma_min)
      return jnp.ones_like(t), self.sigma_min * jnp.exp(t * log_ratio)
    return 1.0 - t, t

  def derivatives(self, t) -> tuple[jax.Array, jax.Array]:
    """(alpha'(t), sigma'(t)) in closed form, each with the shape of t.

    VP's sigma' = alpha^2 beta / (2 sigma) is infinite at t = 0, one reason
    t_min > 0 there.
    """
    t = _time(t)
    if self.kind == 'vp':
      alpha, sigma = self.alpha_sigma(t)
      beta = self.beta_min + t * (self.beta_max - self.beta_min)
      return -0.5 * beta * alpha, 0.5 * beta * alpha ** 2 / sigma
    if self.kind == 've':
      log_ratio = math.log(self.sigma_max / self.sigma_min)
      return jnp.zeros_like(t), log_ratio * self.alpha_sigma(t)[1]
    return -jnp.ones_like(t), jnp.ones_like(t)

  def sde(self, x: jax.Array, t) -> tuple[jax.Array, jax.Array]:
    """The forward SDE dx = f(x, t) dt + g(t) dw whose marginals are the path.

    Derived from alpha and sigma rather than coded per process: f =
    (alpha'/alpha) x, g^2 = 2 sigma sigma' - 2 (alpha'/alpha) sigma^2
    (docs/diffusion_math.md#the-forward-sde-from-alpha-sigma), which are
    score_sde's VPSDE and VESDE.

    Returns:
      (f, g): the drift, shaped like x, and the diffusion g(t), shaped like t.

    Raises:
      ValueError: for rectified_flow, whose g^2 = 2t / (1 - t) diverges at
        t = 1 (alpha(1) = 0: no SDE of this form reaches pure noise).
    """
    if self.kind == 'rectified_flow':
      raise ValueError(
          'the rectified-flow path has no forward SDE on [0, 1] (its '
          'g(t)^2 = 2t/(1-t) diverges at t = 1): sample it with the '
          "probability-flow ODE, sampler 'euler' or 'heun'")
    t = _time(t)
    alpha, sigma = self.alpha_sigma(t)
    d_alpha, d_sigma = self.derivatives(t)
    k = d_alpha / alpha
    g2 = 2.0 * sigma * d_sigma - 2.0 * k * sigma ** 2
    return bcast(k, x) * x, jnp.sqrt(jnp.maximum(g2, 0.0))

  @property
  def prior_std(self) -> float:
    """Standard deviation of the prior N(0, prior_std^2 I) sampling starts
    from: x_1 is approximately N(0, I) for VP (alpha(1) ~ 7e-3 with the
    default betas) and exactly eps for rectified flow; VE's x_1 = x0 +
    sigma_max eps, whose spread sigma_max dominates the data's."""
    return self.sigma_max if self.kind == 've' else 1.0


def process_from_config(diffusion_config) -> Process:
  """The Process of config.diffusion (keys process, vp_beta_min, vp_beta_max,
  ve_sigma_min, ve_sigma_max, t_min; t_min 0 or None means the process's
  default, DEFAULT_T_MIN)."""
  kind = diffusion_config.process
  if kind not in PROCESSES:
    raise ValueError(
        f'unknown diffusion process {kind!r}: set config.diffusion.process '
        f"to one of {PROCESSES} ('ddpm', the discrete-time process, is "
        'handled by schedules.py and samplers.py, not by sde.py)')
  return Process(kind=kind,
                 beta_min=diffusion_config.vp_beta_min,
                 beta_max=diffusion_config.vp_beta_max,
                 sigma_min=diffusion_config.ve_sigma_min,
                 sigma_max=diffusion_config.ve_sigma_max,
                 # 0 (the config default) or None: the process's default.
                 t_min=diffusion_config.get('t_min', None) or None)


def model_time(t: jax.Array) -> jax.Array:
  """The float the network's time embedding receives for continuous t: 999 t.

  The DDPM U-Net's sinusoidal embedding (models/unet.py) has frequencies
  1 .. 1e-4 chosen for integer timesteps 0..999. Fed t in [0, 1] directly,
  even its fastest channel sin(t) turns through less than one radian over
  the whole range and the rest stay nearly constant, so the network could
  hardly tell noise levels apart. Scaling by 999 reuses the embedding as
  designed; score_sde feeds its DDPM models 999 t the same way.
  """
  return 999.0 * jnp.asarray(t, jnp.float32)


TIME_SAMPLING = ('uniform', 'logit_normal')


def sample_time(rng: jax.Array, n: int, *, method: str = 'uniform',
                t_min: float, t_max: float = 1.0, logit_mean: float = 0.0,
                logit_std: float = 1.0) -> jax.Array:
  """n training times in [t_min, t_max], float32 of shape (n,).

  'uniform': t ~ U[t_min, t_max] (score_sde). 'logit_normal': t =
  sigmoid(u), u ~ N(logit_mean, logit_std^2), rescaled into [t_min, t_max]
  (Esser et al. 2024, SD3): it spends the training on intermediate noise
  levels and less on the ends, where the optimal prediction is nearly
  trivial (near t = 0 x_t reveals x0, near t = 1 it reveals eps), so those
  times teach the network little.
  """
  if method not in TIME_SAMPLING:
    raise ValueError(f'unknown time sampling {method!r}: choose one of '
                     f'{TIME_SAMPLING}')
  if not 0 <= t_min <= t_max <= 1:
    raise ValueError(f'need 0 <= t_min <= t_max <= 1, got t_min={t_min}, '
                     f't_max={t_max}')
  if method == 'uniform':
    u = jax.random.uniform(rng, (n,), jnp.float32)
  else:
    if not logit_std > 0:
      raise ValueError(f'logit_std must be > 0, got {logit_std}')
    u = jax.nn.sigmoid(logit_mean
                       + logit_std * jax.random.normal(rng, (n,), jnp.float32))
  # Clipped: float32 rounding of t_min + span * u may step past t_max.
  return jnp.clip(t_min + (t_max - t_min) * u, t_min, t_max)
