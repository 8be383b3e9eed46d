"""Every process in EDM's coordinates: x~ = x_t / alpha_t at noise level
sigma~ = sigma_t / alpha_t, and the sigma grids few-step samplers visit.

x_t = alpha_t x0 + sigma_t eps divided by alpha_t is x~ = x0 + sigma~ eps,
the variance-exploding form of Karras et al. 2022 (EDM, sec. 2 and Table 1:
"x(t) = s(t) x^(sigma)"). In it the probability-flow ODE of *every* process
is dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~ (EDM eq. 3 with s = 1) with
the denoiser D = x0_hat, so the EDM sampler, DPM-Solver++ and UniPC are
written once here for the discrete DDPM schedule, VP, VE, rectified flow and
the EDM process alike: a grid point is the triple (sigma~, t, alpha_t), the
network is called at x_t = alpha_t x~ and time t.

sigma~ = exp(-lambda) with lambda = log(alpha_t / sigma_t), DPM-Solver's
half-logSNR (Lu et al. 2022); for the DDPM schedule sqrt((1 - abar) / abar).

The discrete schedule only has the T noise levels of its timesteps: a sigma
is snapped to the nearest one in log space (EDM's round_sigma for its
iDDPM models), and equal neighbours are merged, so a grid may hold fewer
steps than asked; `network_calls` counts what it really does.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ('karras', 'time', 'logsnr')
# EDM's defaults (sec. 5, Table 1) where a process has no finite range of its
# own: rectified flow's sigma~ = t / (1 - t) runs from 0 to infinity.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


def discrete_sigmas(schedule) -> np.ndarray:
  """sigma~ at the T timesteps, increasing: sqrt((1 - abar) / abar)."""
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  return np.sqrt((1.0 - abar) / abar)


def sigma_of_t(process, t) -> np.ndarray:
  """sigma~(t) = sigma_t / alpha_t in float64 numpy (t: index or float)."""
  if process.is_discrete:
    return discrete_sigmas(process)[np.asarray(t, np.int64)]
  if process.kind == 'vp':
    # float64 from log alpha: float32's 1 - alpha^2 loses digits at small t.
    t = np.asarray(t, np.float64)
    log_alpha = (-0.25 * t ** 2 * (process.beta_max - process.beta_min)
                 - 0.5 * t * process.beta_min)
    return np.sqrt(np.expm1(-2.0 * log_alpha))
  if process.kind == 'rectified_flow':
    t = np.asarray(t, np.float64)
    return t / (1.0 - t)
  t = np.asarray(t, np.float64)
  if process.kind == 've':
    return process.sigma_min * (process.sigma_max / process.sigma_min) ** t
  if process.kind == 'edm':
    return t
  raise ValueError(f'no sigma mapping for the process {process.kind!r}')


def t_of_sigma(process, sigmas) -> tuple[np.ndarray, np.ndarray]:
  """(t, sigma~ actually reached) for sigma~ > 0: the process time whose
  noise level is sigma~ (closed-form inverses), the nearest timestep of the
  discrete schedule (and its sigma~)."""
  sigmas = np.asarray(sigmas, np.float64)
  if process.is_discrete:
    table = np.log(discrete_sigmas(process))
    index = np.abs(np.log(sigmas)[:, None] - table[None, :]).argmin(axis=1)
    return index.astype(np.int32), np.exp(table[index])
  kind = process.kind
  if kind == 'edm':
    t = sigmas
  elif kind == 've':
    t = (np.log(sigmas / process.sigma_min)
         / np.log(process.sigma_max / process.sigma_min))
  elif kind == 'rectified_flow':
    t = sigmas / (1.0 + sigmas)
  elif kind == 'vp':
    # alpha^2 = 1 / (1 + sigma~^2) and log alpha = -a t^2 - b t.
    a = 0.25 * (process.beta_max - process.beta_min)
    b = 0.5 * process.beta_min
    c = 0.5 * np.log1p(sigmas ** 2)
    t = (c / b if a == 0 else
         (-b + np.sqrt(b * b + 4 * a * c)) / (2 * a))
  else:
    raise ValueError(f'no sigma mapping for the process {kind!r}')
  return t.astype(np.float32), sigmas


def sigma_range(process, sigma_min: float = 0.0,
                sigma_max: float = 0.0) -> tuple[float, float]:
  """(sigma_min, sigma_max) a sampler spans: the given ones (0: the
  process's own, EDM's 0.002 and 80 for rectified flow), checked to lie in
  what the process reaches."""
  if process.is_discrete:
    table = discrete_sigmas(process)
    lo, hi = float(table[0]), float(table[-1])
  elif process.kind == 'edm':
    lo, hi = process.sigma_min, process.sigma_max
  elif process.kind == 'rectified_flow':
    lo, hi = EDM_SIGMA_MIN, EDM_SIGMA_MAX
  else:
    lo = float(sigma_of_t(process, max(process.t_min, 1e-5)))
    hi = float(sigma_of_t(process, 1.0))
  if process.is_discrete or process.kind != 'rectified_flow':
    if sigma_min and not lo * (1 - 1e-6) <= sigma_min:
      raise ValueError(f'config.sample.sigma_min={sigma_min} is below the '
                       f"process's smallest noise level {lo:.4g}: raise it "
                       'or set it to 0 (the process\'s own)')
    if sigma_max and not sigma_max <= hi * (1 + 1e-6):
      raise ValueError(f'config.sample.sigma_max={sigma_max} is above the '
                       f"process's largest noise level {hi:.4g}: lower it "
                       'or set it to 0 (the process\'s own)')
  lo, hi = sigma_min or lo, sigma_max or hi
  if not 0 < lo < hi:
    raise ValueError(f'need 0 < config.sample.sigma_min < sigma_max, got '
                     f'{lo} and {hi}')
  return float(lo), float(hi)


def spaced_sigmas(num_steps: int, sigma_min: float, sigma_max: float,
                  spacing: str = 'karras', rho: float = 7.0,
                  process=None) -> np.ndarray:
  """num_steps noise levels from sigma_max down to sigma_min (float64).

  'karras': (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
            EDM eq. 5 (rho = 7: short steps near the data);
  'logsnr': uniform in lambda = -log sigma~ (DPM-Solver's choice);
  'time':   uniform in the process's own t between the two levels (DDIM's
            and diffusers' 'linspace' spacing).
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if num_steps == 1:
    return np.array([sigma_max])
  i = np.arange(num_steps) / (num_steps - 1)
  if spacing == 'karras':
    if not rho > 0:
      raise ValueError(f'config.sample.rho must be > 0, got {rho}')
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i * (lo - hi)) ** rho
  if spacing == 'logsnr':
    return np.exp(np.log(sigma_max) + i * (np.log(sigma_min)
                                           - np.log(sigma_max)))
  if spacing == 'time':
    t_hi, _ = t_of_sigma(process, [sigma_max])
    t_lo, _ = t_of_sigma(process, [sigma_min])
    t = t_hi[0] + i * (float(t_lo[0]) - float(t_hi[0]))
    if process.is_discrete:
      t = np.round(t).astype(np.int64)
    return sigma_of_t(process, t)
  raise ValueError(f'unknown sigma spacing {spacing!r}: set '
                   f'config.sample.spacing to one of {SPACINGS}')


@dataclasses.dataclass(frozen=True)
class SigmaGrid:
  """Where a sampler evaluates the network, from noise to data.

  sigmas[i], i < N: the noise levels visited, strictly decreasing, then
  sigmas[N] = 0 (the data); times[i] and alphas[i]: the process time and
  alpha_t of sigmas[i], the network's input is alphas[i] * x~ at times[i].
  """
  sigmas: np.ndarray  # (N + 1,) float64
  times: np.ndarray  # (N,) int32 (discrete) or float32
  alphas: np.ndarray  # (N,) float64

  @property
  def num_steps(self) -> int:
    return len(self.times)


def alphas_at(process, times) -> np.ndarray:
  """alpha_t in float64 (1 / sqrt(1 + sigma~^2) for the VP family)."""
  if process.is_discrete:
    abar = np.asarray(process.alphas_cumprod, np.float64)
    return np.sqrt(abar[np.asarray(times, np.int64)])
  if process.kind in ('edm', 've'):
    return np.ones(np.shape(times))
  if process.kind == 'rectified_flow':
    return 1.0 - np.asarray(times, np.float64)
  return 1.0 / np.sqrt(1.0 + sigma_of_t(process, times) ** 2)


def grid_at_sigmas(process, sigmas) -> SigmaGrid:
  """The grid through the given decreasing sigma~ > 0 (then 0), snapped to
  the process's timesteps where it is discrete (equal neighbours merged)."""
  sigmas = np.asarray(sigmas, np.float64)
  if sigmas.ndim != 1 or sigmas.size == 0 or np.any(sigmas <= 0):
    raise ValueError('sigma grid: need a non-empty 1-D array of sigmas > 0')
  if np.any(np.diff(sigmas) >= 0):
    raise ValueError('sigma grid: noise levels must be strictly decreasing '
                     f'from noise to data, got {sigmas}')
  times, sigmas = t_of_sigma(process, sigmas)
  if process.is_discrete:
    keep = np.append(True, np.diff(times) != 0)
    times, sigmas = times[keep], sigmas[keep]
  return SigmaGrid(sigmas=np.append(sigmas, 0.0), times=times,
                   alphas=alphas_at(process, times))


def grid_at_times(process, times) -> SigmaGrid:
  """The grid through given process times (noise to data; e.g. diffusers'
  timesteps), each exactly, then sigma = 0."""
  times = np.asarray(times)
  sigmas = sigma_of_t(process, times)
  if np.any(np.diff(sigmas) >= 0):
    raise ValueError('sigma grid: times must go from noise to data')
  dtype = np.int32 if process.is_discrete else np.float32
  return SigmaGrid(sigmas=np.append(sigmas, 0.0), times=times.astype(dtype),
                   alphas=alphas_at(process, times))


def make_grid(process, num_steps: int, *, spacing: str = 'karras',
              rho: float = 7.0, sigma_min: float = 0.0,
              sigma_max: float = 0.0) -> SigmaGrid:
  """num_steps levels from sigma_max to sigma_min by `spacing`, then 0."""
  lo, hi = sigma_range(process, sigma_min, sigma_max)
  return grid_at_sigmas(process, spaced_sigmas(num_steps, lo, hi, spacing,
                                               rho, process))


def denoise_at(denoise_fn, x_tilde: jax.Array, t, alpha) -> jax.Array:
  """D(x~; sigma~) = x0_hat of the network at x_t = alpha x~, time t (a
  scalar of the grid, broadcast over the batch)."""
  dtype = jnp.int32 if jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer) \
      else jnp.float32
  t_batch = jnp.full((x_tilde.shape[0],), t, dtype)
  x_t = (alpha * x_tilde).astype(x_tilde.dtype)
  return denoise_fn(x_t, t_batch).x0
