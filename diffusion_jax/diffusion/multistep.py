"""Multistep exponential integrators: DPM-Solver++ and UniPC over a SigmaGrid.

Both solve the probability-flow ODE in EDM's coordinates (sigma_grid.py),
x~ = x_t / alpha_t at sigma~ = sigma_t / alpha_t = exp(-lambda), with the
data prediction D = x0_hat. There the ODE is dx~/dlambda = D - x~, whose
exact solution from lambda_s to lambda_t = lambda_s + h is

  x~_t = e^-h x~_s + int_0^h e^-(h - u) D(lambda_s + u) du

(the data-prediction form of the exact solution in DPM-Solver++, Lu et al.
2022, divided by alpha_t: its sigma_t / sigma_s x_s becomes e^-h x~_s).
Both samplers replace D under the integral by a polynomial through the data
predictions of the last steps, so every update is a fixed linear
combination of x~ and those predictions. The weights depend only on the
grid: they are computed here once in float64 numpy (a table per step, lower
orders at the first and last steps included) and the sampler is one
lax.scan that carries x~ and the last predictions, one network call a step.

  DPM-Solver++(1) = DDIM: x~_t = r x~_s + (1 - r) D_0, r = e^-h.
  DPM-Solver++(2M) (the paper's Algorithm 2): D_0 + D_1 / 2 in place of
      D_0, D_1 = (D_0 - D_-1) / r_0, r_0 = h_prev / h (diffusers' default
      solver_type 'midpoint').
  DPM-Solver++(3M): the third-order multistep update of the authors' code
      and diffusers: phi_2 and phi_3 weights on the first and second divided
      differences. Its second difference D_2 ~ h^2 D'' / 2 gets h phi_3(h),
      half the Taylor weight, so it tends to second order (error ratio per
      halving of h measured 5.8, 4.6, 4.2 on Gaussian data) with a smaller
      error than 2M; kept as written there so that it matches diffusers.
  SDE-DPM-Solver++ (sde=True; the paper's SDE variant, diffusers'
      'sde-dpmsolver++'): the integrals with 2 e^-2(h - u) in place of
      e^-(h - u): x~_t = r^2 x~_s + (1 - r^2)(D_0 + D_1 / 2)
      + sigma~_t sqrt(1 - r^2) w for 2M. For order 3 the D_2 weight here is
      the counterpart of the ODE's h phi_3(h), 1/2 + (1 - r^2 - 2h) / (4h^2)
      (k-diffusion's dpmpp_3m_sde at eta = 1); diffusers 0.42 has -1/2
      there, an O(1) weight on an O(h^2) term with which its output
      variance on Gaussian data converges only at first order (ours: about
      second), so order 3 with sde=True does not match diffusers.
  UniPC (Zhao et al. 2023): the predictor UniP-p followed, once D at the
      new point is known, by the corrector UniC-p, which reuses that
      evaluation: no extra network call, one order more (sec. 3; the
      weights rho solve R_p(h) rho = g_p(h) / B(h), with B(h) = h, 'bh1',
      or e^h - 1, 'bh2', the default of the authors' code and diffusers).

Lower orders where the history is short: step i uses order <= i + 1 (the
warm-up), and with lower_order_final as diffusers does: DPM-Solver++ lowers
the second-to-last step to order <= 2 when the grid has fewer than 15 steps,
UniPC uses order <= N - i at step i. The last step, to sigma = 0, is always
first order, i.e. the data prediction itself (diffusers' default
final_sigmas_type='zero', where its higher-order weights would be inf/NaN);
UniPC applies no corrector after it.

x~_0 = sigmas[0] z, i.e. x_T = sigma_T z rather than DDPM's x_T = z (a factor
sqrt(1 - abar_T), 1 - 2e-5 for the linear schedule at T = 999).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import sigma_grid
from diffusion_jax.diffusion.sigma_grid import SigmaGrid

SAMPLERS = ('dpm_solver_pp', 'unipc')
ORDERS = (1, 2, 3)
UNIPC_VARIANTS = ('bh1', 'bh2')
# diffusers' lower_order_final for DPM-Solver++ only acts on grids of fewer
# steps (DPMSolverMultistepScheduler.step: it stabilises few-step sampling).
_DPM_LOWER_ORDER_FINAL_STEPS = 15


def network_calls(grid: SigmaGrid, sampler: str) -> int:
  """One network call per grid step for both samplers (UniC reuses the
  predictor's evaluation, and the step to sigma = 0 is the last call)."""
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown multistep sampler {sampler!r}: set '
                     f'config.sample.sampler to one of {SAMPLERS}')
  return grid.num_steps


def check_settings(sampler: str, order: int, variant: str = 'bh2') -> None:
  """config.sample's solver_order (and unipc_variant), before any grid."""
  if order not in ORDERS:
    raise ValueError(f'config.sample.solver_order={order!r} must be one of '
                     f'{ORDERS} for sampler {sampler!r}')
  if sampler == 'unipc' and variant not in UNIPC_VARIANTS:
    raise ValueError(f'unknown UniPC variant {variant!r}: set '
                     f'config.sample.unipc_variant to one of {UNIPC_VARIANTS}')


def _check(grid: SigmaGrid, order: int) -> np.ndarray:
  """lambda = -log sigma~ of the grid's N + 1 levels (inf at sigma = 0),
  after checking the grid and the order before anything is traced."""
  if order not in ORDERS:
    raise ValueError(f'config.sample.solver_order={order!r} must be one of '
                     f'{ORDERS}')
  sigmas = np.asarray(grid.sigmas, np.float64)
  n = len(grid.times)
  if (sigmas.ndim != 1 or n < 1 or len(sigmas) != n + 1
      or len(grid.alphas) != n):
    raise ValueError('sigma grid: need N >= 1 steps, N + 1 sigmas and N '
                     f'times and alphas, got {len(sigmas)}, {n} and '
                     f'{len(grid.alphas)}; build it with sigma_grid.make_grid '
                     'from config.sample.num_steps')
  if (sigmas[-1] != 0 or not np.all(np.isfinite(sigmas))
      or np.any(sigmas[:-1] <= 0) or np.any(np.diff(sigmas) >= 0)):
    raise ValueError('sigma grid: the noise levels must decrease strictly '
                     'from noise to data and end at 0 (check '
                     'config.sample.num_steps, spacing, sigma_min and '
                     f'sigma_max), got {sigmas}')
  with np.errstate(divide='ignore'):
    return -np.log(sigmas)


def _dpm_order(i: int, n: int, order: int, lower_order_final: bool) -> int:
  """Order of step i of n: warm-up, diffusers' lower_order_final, and a
  first-order step to sigma = 0."""
  if i == n - 1:
    return 1
  if (lower_order_final and n < _DPM_LOWER_ORDER_FINAL_STEPS
      and i == n - 2):
    order = min(order, 2)
  return min(order, i + 1)


def _dpm_step(lam: np.ndarray, i: int, p: int, sde: bool):
  """(weight of x~, weights of D_i, D_i-1, D_i-2, noise weight) of a
  DPM-Solver++ step from lambda_i to lambda_i+1 of order p."""
  weights = np.zeros(3)
  if not np.isfinite(lam[i + 1]):  # to sigma = 0: x~ = D_i
    weights[0] = 1.0
    return 0.0, weights, 0.0
  h = lam[i + 1] - lam[i]
  r = math.exp(-h)
  # c_k = h^-k int_0^h e^-(h-u) u^k / k! du (= phi_k+1 weights; c_2 of the
  # authors' 3M), for the SDE with 2 e^-2(h-u) in place of e^-(h-u).
  if sde:
    x_weight = r * r
    c0 = -math.expm1(-2.0 * h)
    c1 = 1.0 - c0 / (2.0 * h)
    c2 = (c0 - 2.0 * h) / (4.0 * h * h) + 0.5
    noise = math.exp(-lam[i + 1]) * math.sqrt(c0)
  else:
    x_weight = r
    c0 = -math.expm1(-h)
    c1 = 1.0 - c0 / h
    c2 = 0.5 - (h - c0) / (h * h)
    noise = 0.0
  # Divided differences over the previous points, as vectors over D_i-k.
  d0 = np.array([1.0, 0.0, 0.0])
  if p == 1:
    weights = c0 * d0
  elif p == 2:
    # Algorithm 2 (midpoint): D_0 + (D_0 - D_-1) / (2 r_0).
    r0 = (lam[i] - lam[i - 1]) / h
    weights = c0 * (d0 + np.array([1.0, -1.0, 0.0]) / (2.0 * r0))
  else:
    r0 = (lam[i] - lam[i - 1]) / h
    r1 = (lam[i - 1] - lam[i - 2]) / h
    d1_0 = np.array([1.0, -1.0, 0.0]) / r0
    d1_1 = np.array([0.0, 1.0, -1.0]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    weights = c0 * d0 + c1 * d1 + c2 * d2
  return x_weight, weights, noise


def _unipc_rhos(hh: float, rks: np.ndarray, b_h: float,
                corrector: bool) -> np.ndarray:
  """UniPC's rho (the paper's a_p, sec. 3): R_p rho = g_p / B(h), row k of
  R_p being rks^(k-1) and g_k = k! hh phi_k+1(hh) with the exponential
  integrator's phi functions, hh = -h for the data prediction: the order
  conditions that cancel the Taylor terms up to h^p. Order 1 (corrector)
  and 2 (predictor) use rho = 1/2, as the authors' code and diffusers do."""
  p = len(rks)
  if (corrector and p == 1) or (not corrector and p == 2):
    return np.array([0.5])
  if not corrector and p == 1:
    return np.zeros(0)
  phi = math.expm1(hh) / hh - 1.0  # hh phi_2(hh), then hh phi_3(hh), ...
  factorial = 1
  rows, g = [], []
  for k in range(1, p + 1):
    rows.append(rks ** (k - 1))
    g.append(phi * factorial / b_h)
    factorial *= k + 1
    phi = phi / hh - 1.0 / factorial
  rows, g = np.stack(rows), np.array(g)
  if corrector:
    return np.linalg.solve(rows, g)
  return np.linalg.solve(rows[:-1, :-1], g[:-1])


def _unipc_update(lam: np.ndarray, s: int, t: int, p: int, variant: str,
                  corrector: bool):
  """(weight of x~_s, weights of D_s, D_s-1, ..., and of D_t for UniC) of
  the UniP-p / UniC-p update from level s to level t (x~-space form of
  diffusers' multistep_uni_{p,c}_bh_update)."""
  h = lam[t] - lam[s]
  hh = -h
  r = math.exp(hh)
  b_h = hh if variant == 'bh1' else math.expm1(hh)
  rks = np.array([(lam[s - k] - lam[s]) / h for k in range(1, p)] + [1.0])
  rhos = _unipc_rhos(hh, rks, b_h, corrector)
  # x~_t = r x~_s + (1 - r) D_s - B(h) sum_k rho_k (D_s-k - D_s) / r_k, and
  # UniC adds rho_p (D_t - D_s) with r_p = 1.
  history = np.zeros(p)  # over D_s, D_s-1, ..., D_s-p+1
  history[0] = 1.0 - r
  for k in range(1, p):
    history[k] -= b_h * rhos[k - 1] / rks[k - 1]
    history[0] += b_h * rhos[k - 1] / rks[k - 1]
  new = 0.0
  if corrector:
    new = -b_h * rhos[-1]
    history[0] += b_h * rhos[-1]
  return r, history, new


def _unipc_tables(lam, n, order, variant, lower_order_final):
  """Per-step weights: corrector (on x~_i-1^c, D_i, D_i-1, ...), then
  predictor (on x~_i^c, D_i, D_i-1, ...); K = order + 1 predictions."""
  k = order + 1
  corr = dict(x=np.ones(n), last=np.zeros(n), d=np.zeros((n, k)))
  pred = dict(x=np.zeros(n), d=np.zeros((n, k)))
  orders = [min(order, i + 1, n - i if lower_order_final else order)
            for i in range(n)]
  orders[-1] = 1
  for i in range(n):
    if i > 0:  # UniC-p at sigma_i with the order of the step that got here
      last, history, new = _unipc_update(lam, i - 1, i, orders[i - 1],
                                         variant, corrector=True)
      corr['x'][i] = 0.0
      corr['last'][i] = last
      corr['d'][i, 0] = new
      corr['d'][i, 1:len(history) + 1] = history
    if not np.isfinite(lam[i + 1]):
      pred['d'][i, 0] = 1.0
    else:
      x_weight, history, _ = _unipc_update(lam, i, i + 1, orders[i], variant,
                                           corrector=False)
      pred['x'][i] = x_weight
      pred['d'][i, :len(history)] = history
  return corr, pred


def _combine(weights: jax.Array, history: jax.Array) -> jax.Array:
  """sum_k weights[k] history[k], history (K, ...) newest first."""
  out = weights[0] * history[0]
  for k in range(1, history.shape[0]):
    out = out + weights[k] * history[k]
  return out


def _scan(denoise_fn, grid: SigmaGrid, z: jax.Array, rng: jax.Array,
          pred: dict, corr: dict | None, noise: np.ndarray | None):
  """Runs the weight tables: at step i, D_i = D(x~_i), the corrector (if
  any) x~_i^c = a x~_i + b x~_i-1^c + sum_k c_k D_i-k, then x~_i+1 =
  a' x~_i^c + sum_k c'_k D_i-k (+ sigma w_i, w_i from fold_in(rng, i))."""
  dtype = z.dtype
  cast = lambda a: jnp.asarray(a, dtype)
  num_history = pred['d'].shape[1]
  steps = dict(i=jnp.arange(grid.num_steps), t=jnp.asarray(grid.times),
               alpha=cast(grid.alphas), px=cast(pred['x']),
               pd=cast(pred['d']))
  if corr is not None:
    steps.update(cx=cast(corr['x']), cl=cast(corr['last']),
                 cd=cast(corr['d']))
  if noise is not None:
    steps['noise'] = cast(noise)

  def step(carry, s):
    x, last, history = carry
    d = sigma_grid.denoise_at(denoise_fn, x, s['t'], s['alpha'])
    history = jnp.concatenate([d[None].astype(dtype), history[:-1]])
    if corr is not None:
      x = s['cx'] * x + s['cl'] * last + _combine(s['cd'], history)
    x_next = s['px'] * x + _combine(s['pd'], history)
    if noise is not None:
      w = jax.random.normal(jax.random.fold_in(rng, s['i']), x.shape, dtype)
      x_next = x_next + s['noise'] * w
    return (x_next, x, history), None

  x = cast(grid.sigmas[0]) * z
  history = jnp.zeros((num_history,) + z.shape, dtype)
  (x, _, _), _ = jax.lax.scan(step, (x, x, history), steps)
  return x


def dpm_solver_pp_sample(denoise_fn, process, grid: SigmaGrid, z: jax.Array,
                         rng: jax.Array, *, order: int = 2, sde: bool = False,
                         lower_order_final: bool = True) -> jax.Array:
  """DPM-Solver++(order M) from x~_0 = sigmas[0] z to the data at sigma = 0.

  Matches diffusers' DPMSolverMultistepScheduler(algorithm_type=
  'dpmsolver++' or, with sde=True, 'sde-dpmsolver++' (orders 1 and 2: see
  the module docstring for SDE order 3); solver_order=order;
  solver_type='midpoint'; final_sigmas_type='zero') over the same grid
  (sigma_grid.grid_at_times of its timesteps). Any batch shape; pure and
  jit-able with the grid static.

  Args:
    denoise_fn: denoiser.DenoiseFn of the model, (x_t, t) -> Denoised.
    process: the model's process (unused: the grid holds t and alpha_t; kept
      for the samplers' common signature).
    grid: sigma_grid.SigmaGrid, strictly decreasing and ending at 0.
    z: standard normal noise, e.g. (B, H, W, C).
    rng: the SDE's noise, w_i = normal(fold_in(rng, i)); unused by the ODE.
    order: 1 (DDIM), 2 (2M) or 3 (3M).
    sde: SDE-DPM-Solver++ instead of the ODE solver.
    lower_order_final: diffusers' option (see the module docstring).

  Returns:
    The sample x~_N = x0, in the data's scale.
  """
  lam = _check(grid, order)
  n = grid.num_steps
  x_weights, d_weights, noise = np.zeros(n), np.zeros((n, order)), np.zeros(n)
  for i in range(n):
    p = _dpm_order(i, n, order, lower_order_final)
    x_weights[i], weights, noise[i] = _dpm_step(lam, i, p, sde)
    d_weights[i] = weights[:order]
  del process
  return _scan(denoise_fn, grid, z, rng, dict(x=x_weights, d=d_weights),
               None, noise if sde else None)


def unipc_sample(denoise_fn, process, grid: SigmaGrid, z: jax.Array,
                 rng: jax.Array, *, order: int = 2, variant: str = 'bh2',
                 lower_order_final: bool = True) -> jax.Array:
  """UniPC-p (UniP-p predictor, UniC-p corrector, data prediction) from
  x~_0 = sigmas[0] z to the data at sigma = 0.

  Matches diffusers' UniPCMultistepScheduler(solver_order=order,
  solver_type=variant, predict_x0=True, disable_corrector=[],
  final_sigmas_type='zero') over the same grid: the corrector runs at every
  step after the first and not after the last. Deterministic (rng unused).

  Args:
    denoise_fn: denoiser.DenoiseFn of the model.
    process: the model's process (unused, as in dpm_solver_pp_sample).
    grid: sigma_grid.SigmaGrid, strictly decreasing and ending at 0.
    z: standard normal noise, e.g. (B, H, W, C).
    rng: unused; kept for the samplers' common signature.
    order: the predictor's order p in {1, 2, 3} (the corrector's is p + 1).
    variant: B(h) = h ('bh1') or e^h - 1 ('bh2').
    lower_order_final: order <= N - i at step i, as diffusers.

  Returns:
    The sample x~_N = x0, in the data's scale.
  """
  lam = _check(grid, order)
  if variant not in UNIPC_VARIANTS:
    raise ValueError(f'unknown UniPC variant {variant!r}: set '
                     f'config.sample.unipc_variant to one of {UNIPC_VARIANTS}')
  del process, rng
  corr, pred = _unipc_tables(lam, grid.num_steps, order, variant,
                             lower_order_final)
  return _scan(denoise_fn, grid, z, None, pred, corr, None)
