"""Samplers of the continuous processes of sde.py, each one jitted lax loop.

All integrate backwards over the fixed grid t_i = linspace(1, t_min,
num_steps + 1), i = 0..num_steps, from x = prior_std * z (z standard normal,
passed in explicitly) to t_min. They see the network only through the
denoiser's (x0_hat, eps_hat) (denoiser.py), so any prediction target works
with any sampler. The noise of grid step i comes from keys folded from (rng, i), so a
fixed z and rng give the same samples on any device layout, and no sample
depends on the values of the others in its batch.

The output is x at t_min, which still holds noise of scale sigma(t_min)
(~3e-3 for VP, ~sigma_min = 0.01 for VE with the defaults; 0 for rectified
flow). denoise=True spends one more network call to return the denoised
E[x0 | x_{t_min}] = x0_hat instead (Tweedie's formula; score_sde's
noise_removal step for VE is exactly this).
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion.denoiser import DenoiseFn, bcast
from diffusion_jax.diffusion.sde import Process

SAMPLERS = ('euler', 'heun', 'euler_maruyama', 'pc')
ODE_SAMPLERS = ('euler', 'heun')


def time_grid(process: Process, num_steps: int) -> np.ndarray:
  """t_i = linspace(1, t_min, num_steps + 1): the times the samplers visit,
  from noise (t = 1) to t_min, float32."""
  _check_num_steps(num_steps)
  return np.linspace(1.0, process.t_min, num_steps + 1).astype(np.float32)


def _check_num_steps(num_steps: int) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}')


def check_sample_args(process: Process, prediction: str | None, sampler: str,
                      num_steps: int) -> None:
  """Every check of a (process, prediction, sampler, num_steps) choice, so
  callers can fail before training, loading or compiling anything (the
  samplers themselves, which see only a denoiser, pass prediction=None)."""
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}: choose one of {SAMPLERS}')
  if prediction is not None:
    denoiser.check_prediction(prediction)
  _check_num_steps(num_steps)
  if process.kind == 'rectified_flow' and sampler not in ODE_SAMPLERS:
    raise ValueError(
        f'sampler {sampler!r} integrates the reverse SDE, which rectified '
        'flow does not have (g(t)^2 = 2t/(1-t) diverges at t = 1): use '
        f'one of {ODE_SAMPLERS}')
  if process.kind == 'rectified_flow' and prediction == 'eps':
    raise ValueError(
        "rectified flow cannot be sampled from an 'eps' prediction: at "
        't = 1, x_t = eps says nothing about x0 and x0_hat = (x_t - t '
        "eps_hat) / (1 - t) divides by zero; train 'velocity', 'v' or 'x0'")


def _at_scalar_time(denoise_fn: DenoiseFn):
  """(x, scalar t) -> (x0_hat, eps_hat, t as (B,))."""
  def denoise(x, t):
    t_batch = jnp.full((x.shape[0],), t, jnp.float32)
    x0, eps, _ = denoise_fn(x, t_batch)
    return x0, eps, t_batch
  return denoise


def _finish(x, denoise_fn, process: Process, denoise: bool):
  """x at t_min, or x0_hat(x, t_min) with denoise (a no-op where
  sigma(t_min) = 0: rectified flow at t_min = 0 already ends on the data)."""
  if not denoise or (process.kind == 'rectified_flow' and process.t_min == 0):
    return x
  return denoise_fn(x, jnp.float32(process.t_min))[0].astype(x.dtype)


def ode_sample(denoise_fn: DenoiseFn, process: Process, z: jax.Array,
               rng: jax.Array | None = None, *, num_steps: int,
               method: str = 'euler', denoise: bool = False) -> jax.Array:
  """The probability-flow ODE dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat.

  This is score_sde's PF-ODE f - g^2 score / 2 (Song et al. 2021, eq. 13)
  written through the denoiser (docs/diffusion_math.md#probability-flow-ode);
  for rectified flow it is the predicted velocity eps_hat - x0_hat.
  Deterministic: rng is unused.

  method 'euler': one network call per step. 'heun': the trapezoid rule
  x_{i+1} = x_i + dt (u(x_i, t_i) + u(x_e, t_{i+1})) / 2 with x_e the Euler
  point, two calls per step, second-order accurate. When t_min = 0
  (rectified flow) the last step is Euler, as in Karras et al. 2022: its
  second evaluation would be at t = 0, where sigma = 0 and an x0 prediction
  cannot give eps_hat = (x - alpha x0_hat) / sigma. So Heun makes
  2 num_steps - 1 network calls there, 2 num_steps otherwise.
  """
  del rng
  if method not in ODE_SAMPLERS:
    raise ValueError(f'unknown ODE method {method!r}: choose one of '
                     f'{ODE_SAMPLERS}')
  check_sample_args(process, None, method, num_steps)
  denoise_fn = _at_scalar_time(denoise_fn)

  def velocity(x, t):
    x0, eps, t_batch = denoise_fn(x, t)
    d_alpha, d_sigma = process.derivatives(t_batch)
    return bcast(d_alpha, x) * x0 + bcast(d_sigma, x) * eps

  def step(x, ts):
    t, t_next = ts
    dt = (t_next - t).astype(x.dtype)
    u = velocity(x, t)
    x_euler = x + dt * u
    if method == 'euler':
      return x_euler, None
    heun = lambda: x + dt * 0.5 * (u + velocity(x_euler, t_next))
    if process.t_min > 0:
      return heun(), None
    return jax.lax.cond(t_next > 0, heun, lambda: x_euler), None

  grid = jnp.asarray(time_grid(process, num_steps))
  x = process.prior_std * z
  x, _ = jax.lax.scan(step, x, (grid[:-1], grid[1:]))
  return _finish(x, denoise_fn, process, denoise)


def _step_key(rng: jax.Array, i: jax.Array, j: int | jax.Array) -> jax.Array:
  """The key of draw j of grid step i: j = 0 the predictor's noise, j >= 1
  the corrector's (so pc_sample without corrector steps is
  euler_maruyama_sample, noise for noise)."""
  return jax.random.fold_in(jax.random.fold_in(rng, i), j)


def _predictor_step(denoise_fn, process: Process, num_steps: int, rng, x,
                    i, t, t_next):
  """One Euler-Maruyama step of the reverse SDE from t to t_next < t.

  Anderson 1982 / Song et al. 2021 eq. 6: dx = [f - g^2 grad log p_t] dt
  + g dw-bar, run with dt = t_next - t < 0:
    x <- x + [f - g^2 score](x, t) dt + g(t) sqrt(-dt) w,
  without the noise at the last step (i = num_steps - 1): its mean is
  returned, as score_sde's samplers with noise_removal.
  """
  dt = (t_next - t).astype(x.dtype)
  _, eps, t_batch = denoise_fn(x, t)
  f, g = process.sde(x, t_batch)
  g = bcast(g, x)
  score = denoiser.score_from_eps(process, t_batch, eps)
  mean = x + (f - g * g * score) * dt
  w = jax.random.normal(_step_key(rng, i, 0), x.shape, x.dtype)
  return jnp.where(i < num_steps - 1, mean + g * jnp.sqrt(-dt) * w, mean)


def euler_maruyama_sample(denoise_fn: DenoiseFn, process: Process,
                          z: jax.Array, rng: jax.Array | None = None, *,
                          num_steps: int,
                          denoise: bool = False) -> jax.Array:
  """Euler-Maruyama on the reverse SDE (VP and VE only).

  x_{i+1} = x_i + [f - g^2 score](x_i, t_i) dt + g(t_i) sqrt(|dt|) w_i,
  dt = t_{i+1} - t_i < 0, score = -eps_hat / sigma, w_i ~ N(0, I) from
  fold_in(fold_in(rng, i), 0). The last step adds no noise and returns its
  mean, as score_sde's samplers with noise_removal.
  """
  check_sample_args(process, None, 'euler_maruyama', num_steps)
  if rng is None:
    raise ValueError('euler_maruyama_sample needs an rng')
  return _reverse_sde_sample(_at_scalar_time(denoise_fn), process,
                             num_steps, rng, z, denoise)


def _reverse_sde_sample(denoise_fn, process: Process, num_steps: int, rng,
                        z, denoise: bool, corrector=None):
  """Euler-Maruyama predictor steps over the time grid from the prior,
  each preceded by `corrector(x, i, t, t_next) -> x` when given (pc)."""
  def step(x, inputs):
    i, t, t_next = inputs
    if corrector is not None:
      x = corrector(x, i, t, t_next)
    return _predictor_step(denoise_fn, process, num_steps, rng, x, i, t,
                           t_next), None

  grid = jnp.asarray(time_grid(process, num_steps))
  x = process.prior_std * z
  x, _ = jax.lax.scan(step, x, (jnp.arange(num_steps), grid[:-1], grid[1:]))
  return _finish(x, denoise_fn, process, denoise)


def pc_sample(denoise_fn: DenoiseFn, process: Process, z: jax.Array,
              rng: jax.Array | None = None, *, num_steps: int,
              snr: float = 0.16, corrector_steps: int = 1,
              denoise: bool = False) -> jax.Array:
  """Predictor-corrector sampling (Song et al. 2021, Algorithms 2-3; VP, VE).

  At each t_i, first `corrector_steps` Langevin steps at t_i,
    x <- x + e score + sqrt(2 e) w,  e = 2 alpha_i (snr ||w|| / ||score||)^2,
  then the predictor: the Euler-Maruyama step of euler_maruyama_sample to
  t_{i+1} (score_sde's 'euler_maruyama' predictor; its 'reverse_diffusion'
  predictor differs at O(dt^2)). alpha_i is 1 for VE and, for VP, the
  discrete alpha of the step, alpha(t_i)^2 / alpha(t_{i+1})^2 = 1 - beta_i
  + O(dt^2) (score_sde's 1 - beta_i; this form stays in (0, 1] at any
  number of steps, where 1 - beta(t) dt turns negative below 20 steps).

  Deviation from score_sde: the norms ||w|| and ||score|| are taken per
  sample, not over the batch, so a sample depends on its own noise only
  (docs/diffusion_math.md#predictor-corrector: when this matters, and the
  corrector's own bias of Var / (1 - snr^2)).

  Noise: corrector step j of grid step i uses fold_in(fold_in(rng, i), j + 1),
  the predictor fold_in(fold_in(rng, i), 0), so with corrector_steps = 0 this
  is euler_maruyama_sample exactly. The last predictor step adds no noise
  (its mean is returned).
  """
  check_sample_args(process, None, 'pc', num_steps)
  if rng is None:
    raise ValueError('pc_sample needs an rng')
  if corrector_steps < 0:
    raise ValueError(f'corrector_steps must be >= 0, got {corrector_steps}')
  if not snr > 0:
    raise ValueError(f'snr must be > 0, got {snr}')
  denoise_fn = _at_scalar_time(denoise_fn)

  def per_sample_norm(a):
    return jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=-1))

  def correct(x, i, t, t_next):
    alpha_i = (process.alpha_sigma(t)[0] / process.alpha_sigma(t_next)[0]) ** 2

    def langevin(j, x):
      _, eps, t_batch = denoise_fn(x, t)
      score = denoiser.score_from_eps(process, t_batch, eps)
      w = jax.random.normal(_step_key(rng, i, j + 1), x.shape, x.dtype)
      score_norm = per_sample_norm(score)
      ratio = snr * per_sample_norm(w) / jnp.where(score_norm > 0,
                                                   score_norm, 1.0)
      # A zero score (only if eps_hat = 0 exactly) gets no step at all.
      e = jnp.where(score_norm > 0, 2.0 * alpha_i * ratio ** 2, 0.0)
      e = bcast(e, x)
      return x + e * score + jnp.sqrt(2.0 * e) * w

    return jax.lax.fori_loop(0, corrector_steps, langevin, x)

  return _reverse_sde_sample(denoise_fn, process, num_steps, rng, z, denoise,
                             corrector=correct)


def sample(denoise_fn: DenoiseFn, process: Process, z: jax.Array, rng: jax.Array | None, *, sampler: str,
           num_steps: int, snr: float = 0.16, corrector_steps: int = 1,
           denoise: bool = False) -> jax.Array:
  """The sampler named `sampler` (one of SAMPLERS): 'euler' and 'heun'
  integrate the probability-flow ODE (every process), 'euler_maruyama' and
  'pc' the reverse SDE (VP and VE). z: standard normal noise of the output
  shape; denoise_fn(x, t) takes the continuous t of shape (B,)."""
  check_sample_args(process, None, sampler, num_steps)
  if sampler in ODE_SAMPLERS:
    return ode_sample(denoise_fn, process, z, rng,
                      num_steps=num_steps, method=sampler, denoise=denoise)
  if sampler == 'euler_maruyama':
    return euler_maruyama_sample(denoise_fn, process, z, rng,
                                 num_steps=num_steps, denoise=denoise)
  return pc_sample(denoise_fn, process, z, rng, num_steps=num_steps,
                   snr=snr, corrector_steps=corrector_steps, denoise=denoise)
