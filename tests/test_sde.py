"""Continuous-time processes (VP, VE, rectified flow) and their samplers,
against numpy closed forms and Gaussian data, where the optimal denoiser,
the marginals and the exact probability-flow map are all analytic."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import sde
from diffusion_jax.diffusion import sde_samplers

MU, S = 0.3, 0.5  # data x0 ~ N(MU, S^2 I)
BETA_MIN, BETA_MAX, SIGMA_MIN, SIGMA_MAX = 0.1, 20.0, 0.01, 50.0
# One prediction per process for the sampler tests (all four predictions go
# through the Heun sampler in test_every_prediction_gives_the_same_ode_path).
PREDICTION = {'vp': 'eps', 've': 'x0', 'rectified_flow': 'velocity'}


def np_alpha_sigma(kind, t):
  """Independent float64 closed forms (score_sde's marginal_prob)."""
  t = np.asarray(t, np.float64)
  if kind == 'vp':
    log_mean_coeff = -0.25 * t ** 2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN
    return np.exp(log_mean_coeff), np.sqrt(1.0 - np.exp(2.0 * log_mean_coeff))
  if kind == 've':
    return np.ones_like(t), SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
  return 1.0 - t, t


def np_derivatives(kind, t, h=1e-6):
  """Central finite differences of np_alpha_sigma."""
  (a1, s1), (a0, s0) = np_alpha_sigma(kind, t + h), np_alpha_sigma(kind, t - h)
  return (a1 - a0) / (2 * h), (s1 - s0) / (2 * h)


def np_target(kind, prediction, x0, eps, t):
  a, s = np_alpha_sigma(kind, t)
  da, ds = np_derivatives(kind, t)
  a, s, da, ds = (v.reshape(-1, *[1] * (x0.ndim - 1)) for v in (a, s, da, ds))
  st, d = s / a, denoiser.SIGMA_DATA  # EDM's F (Table 1), independently
  edm = (st * x0 - d * d * eps) / (d * np.sqrt(st * st + d * d))
  return {'eps': eps, 'x0': x0, 'v': a * eps - s * x0,
          'velocity': da * x0 + ds * eps, 'edm': edm}[prediction]


def gaussian_model(process, prediction):
  """The optimal network for x0 ~ N(MU, S^2 I): x0_hat = E[x0 | x_t] (the
  Gaussian posterior mean), eps_hat = (x_t - alpha x0_hat) / sigma, returned
  as `prediction` through denoiser.target."""
  def model_fn(inp, t):
    alpha, sigma = process.alpha_sigma(t)
    a = alpha.reshape(-1, *[1] * (inp.ndim - 1))
    s = sigma.reshape(a.shape)
    # An 'edm' network sees c_in x~ = x_t / sqrt(sigma^2 + alpha^2 sd^2).
    x_t = inp if prediction != 'edm' else inp * jnp.sqrt(
        s * s + a * a * denoiser.SIGMA_DATA ** 2)
    x0_hat = MU + a * S ** 2 * (x_t - a * MU) / (a * a * S ** 2 + s * s)
    eps_hat = (x_t - a * x0_hat) / s
    return denoiser.target(process, prediction, x0_hat, eps_hat, t)
  return model_fn


def exact_flow(process, z):
  """Where the exact probability-flow ODE takes x_1 = prior_std z at t_min.

  For Gaussian data every marginal is N(alpha mu, v(t)), v = alpha^2 S^2 +
  sigma^2, and the flow keeps w = (x - alpha mu) / sqrt(v) fixed.
  """
  a1, s1 = np_alpha_sigma(process.kind, 1.0)
  a0, s0 = np_alpha_sigma(process.kind, process.t_min)
  w = (process.prior_std * np.asarray(z, np.float64) - a1 * MU) / np.sqrt(
      a1 ** 2 * S ** 2 + s1 ** 2)
  return a0 * MU + np.sqrt(a0 ** 2 * S ** 2 + s0 ** 2) * w


def run(process, z, rng, **kwargs):
  prediction = kwargs.pop('prediction', PREDICTION[process.kind])
  denoise_fn = denoiser.make_denoiser(gaussian_model(process, prediction),
                                      process, prediction)
  fn = jax.jit(lambda z, rng: sde_samplers.sample(denoise_fn, process, z, rng,
                                                  **kwargs))
  return np.asarray(fn(z, rng))


@pytest.fixture(scope='module')
def z():
  # 128 samples of 256 dimensions: enough scalars for tight moments (4
  # standard errors of the variance are 3%), and enough dimensions for PC's
  # per-sample norms to concentrate.
  return jax.random.normal(jax.random.key(0), (128, 256))


# --- the processes -----------------------------------------------------------

@pytest.mark.parametrize('kind', sde.PROCESSES)
def test_alpha_sigma_and_derivatives_match_closed_forms(kind):
  process = sde.Process(kind)
  t = np.array([1e-5, 1e-3, 0.01, 0.2, 0.5, 0.9, 1.0])
  alpha, sigma = process.alpha_sigma(jnp.asarray(t, jnp.float32))
  assert alpha.shape == sigma.shape == t.shape
  want_alpha, want_sigma = np_alpha_sigma(kind, t)
  # rtol 1e-5 down to t = 1e-5, where VP's sigma ~ 3e-3 would lose ~6% to
  # cancellation in float32 1 - alpha^2 (hence expm1).
  np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-5, atol=1e-7)
  t_inner = t[2:-1]  # finite differences need room on both sides
  d_alpha, d_sigma = process.derivatives(jnp.asarray(t_inner, jnp.float32))
  want_da, want_ds = np_derivatives(kind, t_inner)
  np.testing.assert_allclose(d_alpha, want_da, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(d_sigma, want_ds, rtol=1e-4, atol=1e-6)


def test_sde_is_the_textbook_vp_and_ve_sde():
  x = jax.random.normal(jax.random.key(0), (5, 3, 2))
  t = np.array([1e-5, 0.1, 0.4, 0.7, 1.0])
  # VP (score_sde VPSDE): f = -beta(t) x / 2, g = sqrt(beta(t)).
  f, g = sde.Process('vp').sde(x, jnp.asarray(t, jnp.float32))
  beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
  assert g.shape == t.shape
  np.testing.assert_allclose(f, -0.5 * beta[:, None, None] * np.asarray(x),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g, np.sqrt(beta), rtol=1e-5)
  # VE (score_sde VESDE): f = 0, g = sigma(t) sqrt(2 log(sigma_max/sigma_min)).
  f, g = sde.Process('ve').sde(x, jnp.asarray(t, jnp.float32))
  np.testing.assert_array_equal(f, np.zeros(x.shape))
  sigma = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
  np.testing.assert_allclose(
      g, sigma * np.sqrt(2 * np.log(SIGMA_MAX / SIGMA_MIN)), rtol=1e-5)
  with pytest.raises(ValueError, match="'euler' or 'heun'"):
    sde.Process('rectified_flow').sde(x, jnp.asarray(t, jnp.float32))


def test_prior_std_and_t_min_defaults():
  assert sde.Process('vp').prior_std == 1.0
  assert sde.Process('rectified_flow').prior_std == 1.0
  assert sde.Process('ve', sigma_max=80.0).prior_std == 80.0
  assert sde.Process('vp').t_min == sde.Process('ve').t_min == 1e-5
  assert sde.Process('rectified_flow').t_min == 0.0
  assert sde.Process('rectified_flow', t_min=1e-3).t_min == 1e-3
  hash(sde.Process('vp'))  # usable as a static argument of jax.jit


@pytest.mark.parametrize('kwargs, match', [
    (dict(kind='ddpm'), 'unknown diffusion process'),
    (dict(kind='vp', beta_min=2.0, beta_max=1.0), 'beta_min <= beta_max'),
    (dict(kind='vp', beta_min=-0.1), 'beta_min <= beta_max'),
    (dict(kind='ve', sigma_min=0.0), 'sigma_min < sigma_max'),
    (dict(kind='ve', sigma_min=60.0), 'sigma_min < sigma_max'),
    (dict(kind='vp', t_min=0.0), 't_min > 0'),
    (dict(kind='rectified_flow', t_min=1.0), r't_min must lie in \[0, 1\)'),
    (dict(kind='ve', sigma_max=float('nan')), 'finite'),
])
def test_invalid_processes_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sde.Process(**kwargs)


def test_process_from_config():
  config = ml_collections.ConfigDict(dict(
      process='ve', vp_beta_min=0.2, vp_beta_max=10.0, ve_sigma_min=0.02,
      ve_sigma_max=80.0, t_min=1e-4))
  assert sde.process_from_config(config) == sde.Process(
      've', beta_min=0.2, beta_max=10.0, sigma_min=0.02, sigma_max=80.0,
      t_min=1e-4)
  config.process = 'rectified_flow'
  config.t_min = None  # the process's own default
  assert sde.process_from_config(config).t_min == 0.0
  config.process = 'ddpm'
  with pytest.raises(ValueError, match="config.diffusion.process.*'ddpm'"):
    sde.process_from_config(config)


def test_model_time():
  np.testing.assert_allclose(sde.model_time(jnp.array([0.0, 0.5, 1.0])),
                             [0.0, 499.5, 999.0])


def test_sample_time_uniform_and_logit_normal():
  n, t_min, t_max = 20000, 0.1, 0.9
  t = sde.sample_time(jax.random.key(0), n, t_min=t_min, t_max=t_max)
  assert t.shape == (n,) and t.dtype == jnp.float32
  t = np.asarray(t)
  assert t.min() >= t_min and t.max() <= t_max
  span = t_max - t_min
  assert abs(t.mean() - (t_min + t_max) / 2) < 4 * span / np.sqrt(12 * n)
  # Logit-normal: t = t_min + span * sigmoid(N(m, s^2)), so its quantile q
  # is t_min + span * sigmoid(m + s * Phi^-1(q)); the median at m = 0 is the
  # midpoint.
  q = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
  for mean, std in ((0.0, 1.0), (0.5, 0.6)):
    t = np.asarray(sde.sample_time(jax.random.key(1), n, method='logit_normal',
                                   t_min=t_min, t_max=t_max, logit_mean=mean,
                                   logit_std=std))
    assert t.min() >= t_min and t.max() <= t_max
    want = t_min + span * special.expit(mean + std * special.ndtri(q))
    np.testing.assert_allclose(np.quantile(t, q), want, atol=0.01)
  with pytest.raises(ValueError, match='logit_normal'):
    sde.sample_time(jax.random.key(0), 4, method='beta', t_min=0.0)


# --- prediction targets and the loss ----------------------------------------

@pytest.mark.parametrize('kind', sde.PROCESSES)
@pytest.mark.parametrize('prediction', denoiser.PREDICTIONS)
def test_targets_and_their_inverses_are_exact(kind, prediction):
  process = sde.Process(kind)
  k = jax.random.split(jax.random.key(0), 2)
  x0 = jax.random.uniform(k[0], (6, 3, 3, 2), minval=-1)
  eps = jax.random.normal(k[1], x0.shape)
  # The inverses are singular where alpha = 0 (rectified flow at t = 1) for
  # eps, and where sigma = 0 (rectified flow at t = 0) for x0.
  t_np = np.array([max(process.t_min, 1e-3), 0.01, 0.3, 0.6, 0.9, 0.999])
  t = jnp.asarray(t_np, jnp.float32)
  x_t = denoiser.q_sample(process, x0, t, eps)
  a, s = np_alpha_sigma(kind, t_np)
  np.testing.assert_allclose(
      x_t, a[:, None, None, None] * x0 + s[:, None, None, None] * eps,
      rtol=1e-5, atol=1e-5)
  y = denoiser.target(process, prediction, x0, eps, t)
  np.testing.assert_allclose(
      y, np_target(kind, prediction, np.float64(x0), np.float64(eps), t_np),
      rtol=1e-4, atol=1e-4)
  x0_hat, eps_hat = denoiser.to_x0_eps(process, prediction, x_t, t, y)
  # Exact up to float32 rounding of x_t (of size 1 + sigma), amplified by
  # the conditioning of the 2x2 system: 1/alpha when x0 comes from an eps
  # prediction, 1/sigma when eps comes from an x0 prediction.
  a_, s_ = a[:, None, None, None], s[:, None, None, None]
  x0_scale = (1 + s_) / a_ if prediction == 'eps' else 1 + s_
  # (edm gives x0 first, like x0: eps then carries the 1/sigma.)
  eps_scale = (1 + s_) / s_ if prediction in ('x0', 'edm') else 1.0
  assert np.all(np.abs(x0_hat - x0) <= 1e-5 * x0_scale)
  assert np.all(np.abs(eps_hat - eps) <= 1e-5 * eps_scale)
  np.testing.assert_allclose(a_ * x0_hat + s_ * eps_hat, x_t, rtol=1e-5,
                             atol=1e-5)
  # Score of q(x_t | x0) = N(alpha x0, sigma^2): -(x_t - alpha x0) / sigma^2.
  want_score = -(np.float64(x_t) - a[:, None, None, None] * np.float64(x0)
                 ) / s[:, None, None, None] ** 2
  np.testing.assert_allclose(denoiser.score_from_eps(process, t, eps),
                             want_score, rtol=1e-3, atol=1e-3)


def test_unknown_prediction():
  with pytest.raises(ValueError, match='unknown prediction'):
    denoiser.target(sde.Process('vp'), 'score', jnp.zeros(2), jnp.zeros(2),
                    jnp.ones(2))


@pytest.mark.parametrize('kind', sde.PROCESSES)
@pytest.mark.parametrize('prediction', denoiser.PREDICTIONS)
def test_loss_of_the_optimal_model_is_the_closed_form_minimum(kind,
                                                              prediction):
  """For x0 ~ N(MU, S^2) every target is y = c_x x0 + c_e eps, and given x_t
  (eps = (x_t - alpha x0) / sigma) its residual variance is
  (c_x - c_e alpha / sigma)^2 Var(x0 | x_t), Var(x0 | x_t) = S^2 sigma^2 /
  (alpha^2 S^2 + sigma^2): the least loss any model can reach."""
  process = sde.Process(kind)
  k = jax.random.split(jax.random.key(1), 3)
  x0 = MU + S * jax.random.normal(k[0], (8192, 2))
  noise = jax.random.normal(k[1], x0.shape)
  t = sde.sample_time(k[2], x0.shape[0], t_min=max(process.t_min, 1e-3))
  model_fn = gaussian_model(process, prediction)
  loss = float(losses.mse_loss(model_fn, process, prediction, x0, t, noise))
  t64 = np.float64(t)
  a, s = np_alpha_sigma(kind, t64)
  da, ds = np_derivatives(kind, t64)
  st, d = s / a, denoiser.SIGMA_DATA
  root = np.sqrt(st * st + d * d)
  c_x, c_e = {'eps': (0.0, 1.0), 'x0': (1.0, 0.0), 'v': (-s, a),
              'velocity': (da, ds), 'edm': (st / (d * root), -d / root)
              }[prediction]
  posterior_var = S ** 2 * s ** 2 / (a ** 2 * S ** 2 + s ** 2)
  # Per example, the residual is Gaussian with variance w, so its square
  # has mean w and variance 2 w^2: the mean over examples and the 2 data
  # dimensions is within 5 standard errors of mean(w).
  w = (c_x - c_e * a / s) ** 2 * posterior_var
  standard_error = np.sqrt(np.sum(2 * w ** 2) / x0.shape[1]) / w.size
  assert abs(loss - np.mean(w)) < 5 * standard_error
  # The loss is the plain mean square against the numpy target.
  # (An 'edm' network sees x_t / sqrt(sigma^2 + alpha^2 sigma_data^2).)
  half = lambda x, t: 0.5 * x
  seen = np.float64(denoiser.q_sample(process, x0, t, noise))
  if prediction == 'edm':
    seen /= np.sqrt(s * s + a * a * d * d)[:, None]
  want = np.mean((np_target(kind, prediction, np.float64(x0),
                            np.float64(noise), t64) - 0.5 * seen) ** 2)
  assert float(losses.mse_loss(half, process, prediction, x0, t, noise)
               ) == pytest.approx(want, rel=1e-3)
  # Any other model does worse.
  worse = lambda x, t: model_fn(x, t) + 0.1
  assert float(losses.mse_loss(worse, process, prediction, x0, t,
                               noise)) > loss


# --- the samplers, driven by the optimal model of Gaussian data ------------

SAMPLER_CASES = [  # (process, sampler, num_steps)
    ('vp', 'euler', 500), ('ve', 'euler', 1000), ('rectified_flow', 'euler', 500),
    ('vp', 'heun', 100), ('ve', 'heun', 100), ('rectified_flow', 'heun', 100),
    ('vp', 'euler_maruyama', 500), ('ve', 'euler_maruyama', 500),
    ('vp', 'pc', 100), ('ve', 'pc', 100),
]


@pytest.mark.parametrize('kind, sampler, num_steps', SAMPLER_CASES)
def test_samplers_draw_the_gaussian_data(z, kind, sampler, num_steps):
  """The known answer: samples of N(MU, S^2) (more exactly, of the t_min
  marginal N(alpha MU, alpha^2 S^2 + sigma^2)), to within 4 standard errors
  plus a discretisation allowance (Euler's O(1/steps), PC's Langevin bias:
  variance / (1 - snr^2) at its fixed point)."""
  process = sde.Process(kind)
  out = run(process, z, jax.random.key(1), sampler=sampler,
            num_steps=num_steps)
  assert out.shape == z.shape and np.isfinite(out).all()
  a, s = np_alpha_sigma(kind, process.t_min)
  want_mean, want_var = a * MU, a ** 2 * S ** 2 + s ** 2
  n = out.size
  mean_allowance, var_allowance = {
      'euler': (0.005, 0.05), 'heun': (0.002, 0.01),
      'euler_maruyama': (0.005, 0.02), 'pc': (0.005, 0.05)}[sampler]
  assert abs(out.mean() - want_mean) < (4 * np.sqrt(want_var / n)
                                        + mean_allowance)
  assert abs(out.var() / want_var - 1) < 4 * np.sqrt(2 / n) + var_allowance


@pytest.mark.parametrize('kind', sde.PROCESSES)
def test_heun_is_second_order_and_beats_euler(z, kind):
  """Against the exact probability-flow map, sample by sample: Heun's error
  falls ~4x per halving of the step (second order), Euler's ~2x, and at 50
  steps Heun is far closer."""
  process = sde.Process(kind)
  want = exact_flow(process, z)
  err = {(method, n): np.abs(run(process, z, None, sampler=method,
                                 num_steps=n) - want).max()
         for method in ('euler', 'heun') for n in (50, 100)}
  assert err['heun', 50] < err['euler', 50] / 4
  assert err['heun', 50] / err['heun', 100] > 3
  assert 1.5 < err['euler', 50] / err['euler', 100] < 2.5
  assert err['heun', 100] < 0.02  # max over 32768 values, tails included


@pytest.mark.parametrize('kind', sde.PROCESSES)
def test_every_prediction_gives_the_same_ode_path(z, kind):
  """The same optimal model expressed as eps, x0, v or velocity: through
  to_x0_eps the sampler sees the same (x0_hat, eps_hat) and so takes the same
  path (rectified flow rejects eps, see test_sampler_errors)."""
  process = sde.Process(kind)
  # (eps and edm are singular at rectified flow's t = 1, where alpha = 0.)
  predictions = [p for p in denoiser.PREDICTIONS
                 if not (kind == 'rectified_flow' and p in ('eps', 'edm'))]
  outs = [run(process, z[:8], None, sampler='heun', num_steps=50,
              prediction=p) for p in predictions]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], atol=2e-4)
  np.testing.assert_allclose(outs[0], exact_flow(process, z[:8]), atol=0.05)


def test_ode_samplers_are_deterministic_and_sde_samplers_follow_rng(z):
  process = sde.Process('vp')
  z = z[:8]
  for sampler in ('euler', 'heun'):
    np.testing.assert_array_equal(
        run(process, z, jax.random.key(1), sampler=sampler, num_steps=10),
        run(process, z, jax.random.key(2), sampler=sampler, num_steps=10))
  for sampler in ('euler_maruyama', 'pc'):
    first = run(process, z, jax.random.key(1), sampler=sampler, num_steps=10)
    np.testing.assert_array_equal(
        first, run(process, z, jax.random.key(1), sampler=sampler,
                   num_steps=10))
    assert not np.allclose(
        first, run(process, z, jax.random.key(2), sampler=sampler,
                   num_steps=10))


def test_pc_without_corrector_is_euler_maruyama_and_is_per_sample(z):
  process = sde.Process('ve')
  z, rng = z[:8], jax.random.key(3)
  em = run(process, z, rng, sampler='euler_maruyama', num_steps=10)
  np.testing.assert_array_equal(
      run(process, z, rng, sampler='pc', num_steps=10, corrector_steps=0), em)
  pc = run(process, z, rng, sampler='pc', num_steps=10, corrector_steps=2)
  assert not np.allclose(pc, em)
  # The corrector's step size is per sample: changing the other samples of
  # the batch leaves sample 0 as it was (score_sde's batch mean would not).
  others = z.at[1:].set(3.0 * z[1:])
  np.testing.assert_allclose(
      run(process, others, rng, sampler='pc', num_steps=10,
          corrector_steps=2)[0], pc[0], rtol=1e-6, atol=1e-6)


def test_denoise_returns_the_x0_prediction_at_t_min(z):
  process = sde.Process('ve')
  z = z[:8]
  x = run(process, z, None, sampler='heun', num_steps=20)
  denoised = run(process, z, None, sampler='heun', num_steps=20, denoise=True)
  t = jnp.full((8,), process.t_min)
  want = denoiser.to_x0_eps(process, 'x0', jnp.asarray(x), t,
                            gaussian_model(process, 'x0')(jnp.asarray(x), t))[0]
  np.testing.assert_allclose(denoised, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(denoised, x, atol=1e-4)
  # Rectified flow already ends on the data at t_min = 0: nothing to do.
  rf = sde.Process('rectified_flow')
  np.testing.assert_array_equal(
      run(rf, z, None, sampler='heun', num_steps=5, denoise=True),
      run(rf, z, None, sampler='heun', num_steps=5))


def test_time_grid():
  grid = sde_samplers.time_grid(sde.Process('vp'), 4)
  np.testing.assert_allclose(grid, np.linspace(1.0, 1e-5, 5), rtol=1e-6)
  assert sde_samplers.time_grid(sde.Process('rectified_flow'), 2)[-1] == 0.0


@pytest.mark.parametrize('kind, prediction, kwargs, match', [
    ('vp', 'eps', dict(sampler='ddim', num_steps=10), 'unknown sampler'),
    ('vp', 'eps', dict(sampler='euler', num_steps=0), 'num_steps'),
    ('vp', 'score', dict(sampler='euler', num_steps=10), 'unknown prediction'),
    ('rectified_flow', 'velocity', dict(sampler='euler_maruyama',
                                        num_steps=10), 'reverse SDE'),
    ('rectified_flow', 'velocity', dict(sampler='pc', num_steps=10),
     'reverse SDE'),
    ('rectified_flow', 'eps', dict(sampler='heun', num_steps=10),
     "'velocity', 'v' or 'x0'"),
])
def test_sampler_errors(kind, prediction, kwargs, match):
  process = sde.Process(kind)
  # The check callers run before anything is compiled (sampling.check, from
  # DiffusionMethod.from_config) sees the prediction ...
  with pytest.raises(ValueError, match=match):
    sde_samplers.check_sample_args(process, prediction, **kwargs)
  if kind == 'rectified_flow' and prediction == 'eps':
    return  # ... which the samplers, seeing only a denoiser, cannot.
  # The samplers run the same checks; an unknown prediction already fails
  # when the denoiser is made.
  with pytest.raises(ValueError, match=match):
    sde_samplers.sample(
        denoiser.make_denoiser(lambda x, t: x, process, prediction), process,
        jnp.zeros((2, 3)), jax.random.key(0), **kwargs)


def test_sde_samplers_need_an_rng():
  process = sde.Process('vp')
  with pytest.raises(ValueError, match='rng'):
    sde_samplers.sample(denoiser.make_denoiser(lambda x, t: x, process, 'eps'),
                        process, jnp.zeros((2, 3)), None,
                        sampler='euler_maruyama', num_steps=3)
