"""The variational bound: each formula against float64 numpy/scipy, an oracle
model whose KL terms vanish, and --mode=eval end to end on 1 and 8 devices."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import checkpointing, experiment, main, parallel
from diffusion_jax.data import pipeline as input_pipeline
from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import likelihood
from diffusion_jax.diffusion import schedules
from tests.util import run_eval, tiny_config

LN2 = math.log(2.0)


# ------------------------------------------------------ float64 references --


def ref_normal_kl(m1, lv1, m2, lv2):
  """KL of two Gaussians from the variances themselves (not log-variances)."""
  v1, v2 = np.exp(lv1), np.exp(lv2)
  return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def ref_decoder_log_prob(x, mean, log_scale):
  """scipy CDF differences, taken on the side of the mean where they do not
  cancel (sf above the mean, cdf below); edge bins open."""
  x, mean = np.float64(x), np.float64(mean)
  s = np.exp(np.float64(log_scale))
  lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
  hi = np.where(x > 0.999, np.inf, x + 1 / 255)
  zl, zh = (lo - mean) / s, (hi - mean) / s
  with np.errstate(divide='ignore'):
    return np.where(x > mean,
                    np.log(stats.norm.sf(zl) - stats.norm.sf(zh)),
                    np.log(stats.norm.cdf(zh) - stats.norm.cdf(zl)))


def test_normal_kl_matches_float64_reference():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(2, 500))
  lv1, lv2 = rng.uniform(-12, 2, size=(2, 500))
  lv1[:5] = lv2[:5]  # equal Gaussians: exactly 0
  m1[:5] = m2[:5]
  got = np.asarray(likelihood.normal_kl(*(jnp.float32(a)
                                          for a in (m1, lv1, m2, lv2))))
  want = ref_normal_kl(*(np.float64(np.float32(a))
                         for a in (m1, lv1, m2, lv2)))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(got[:5], 0.0)


def test_discretized_gaussian_matches_scipy_including_edges():
  rng = np.random.default_rng(1)
  n = 4000
  x = (rng.integers(0, 256, n) / 127.5 - 1).astype(np.float32)
  x[:200], x[200:400] = -1.0, 1.0
  log_scales = rng.uniform(-7, 0.5, n).astype(np.float32)
  # Means within a few scales (plus a bin) of x, so float64 does not
  # underflow in the reference; 8-sigma misses included.
  offsets = (rng.normal(0, 4, n) * np.exp(log_scales)
             + rng.uniform(-1 / 255, 1 / 255, n))
  means = (x + offsets).astype(np.float32)
  got = np.asarray(likelihood.discretized_gaussian_log_likelihood(
      x, means, log_scales))
  want = ref_decoder_log_prob(x, means, log_scales)
  assert np.isfinite(want).all() and want.min() < -30  # deep tails covered
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  assert (got <= 0).all()


def test_discretized_gaussian_extremes():
  """Edge bins are open; tiny scales are exact or huge but finite."""
  x = np.array([-1, 1, -1, 1, 0, -1, 1, 0], np.float32)
  means = np.array([-5, 5, -1, 1, 0, 1, -1, 0.5], np.float32)
  log_scales = np.float32([0, 0, -20, -20, -20, -20, -20, -1e-3])
  got = np.asarray(likelihood.discretized_gaussian_log_likelihood(
      x, means, log_scales))
  s = np.exp(np.float64(log_scales))
  # Mean far beyond an edge: the open bin holds all the mass, log P = 0.
  np.testing.assert_allclose(got[:2], [stats.norm.logcdf(-1 + 1 / 255 + 5),
                                       stats.norm.logsf(1 - 1 / 255 - 5)],
                             atol=1e-6)
  # Tiny scale centred in the (edge or interior) bin: probability 1.
  np.testing.assert_allclose(got[2:5], 0.0, atol=1e-6)
  # Tiny scale at the wrong edge: log P ~ -z^2/2 with z ~ 2/e^-20; finite.
  want = stats.norm.logcdf((-1 + 1 / 255 - 1) / s[5])
  np.testing.assert_allclose(got[5:7], [want, want], rtol=1e-4)
  assert np.isfinite(got).all() and got[5] < -1e17
  np.testing.assert_allclose(got[7], ref_decoder_log_prob(0, 0.5, -1e-3),
                             rtol=1e-5)


# --------------------------------------- the terms against float64 numpy --


def linear_eps(x, t):
  """A fixed, non-trivial eps model usable from jax and numpy alike."""
  t = t.reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.7 * x - 0.05 + 0.01 * t


def ref_vlb_terms(betas, x0, noises, variance, clip):
  """DDPM eqs. 4-7 and 13 in float64 numpy, written out independently."""
  T = len(betas)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  beta_tilde = betas * (1 - abar_prev) / (1 - abar)
  log_tilde = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
  log_model = (np.log(np.append(beta_tilde[1], betas[1:])) if variance == 'beta'
               else log_tilde)
  bpd = lambda nats: nats.reshape(len(x0), -1).mean(1) / LN2
  prior = bpd(ref_normal_kl(np.sqrt(abar[-1]) * x0, np.log(1 - abar[-1]),
                            0.0, 0.0))
  terms = np.zeros((len(x0), T))
  for i in range(T):
    x_t = np.sqrt(abar[i]) * x0 + np.sqrt(1 - abar[i]) * noises[i]
    eps = linear_eps(x_t, np.full(len(x0), i, np.float64))
    x0_hat = (x_t - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
    if clip:
      x0_hat = np.clip(x0_hat, -1, 1)
    post = lambda a: (np.sqrt(abar_prev[i]) * betas[i] * a
                      + np.sqrt(alphas[i]) * (1 - abar_prev[i]) * x_t
                      ) / (1 - abar[i])
    if i == 0:
      terms[:, i] = -bpd(ref_decoder_log_prob(x0, post(x0_hat),
                                              0.5 * log_model[0]))
    else:
      terms[:, i] = bpd(ref_normal_kl(post(x0), log_tilde[i], post(x0_hat),
                                      log_model[i]))
  return prior, terms


@pytest.mark.parametrize('variance,clip', [('beta', True),
                                           ('beta_tilde', False)])
def test_terms_match_float64_numpy(variance, clip):
  T = 50
  betas = np.linspace(1e-4, 0.2, T)  # abar_T ~ 0.006: the prior is not ~0
  schedule = schedules.Schedule.from_betas(betas)
  images = input_pipeline.load_split(tiny_config().data, 'test').images[:4]
  x0 = images.astype(np.float32) / 127.5 - 1
  rng = jax.random.key(3)
  denoise_fn = denoiser.make_denoiser(linear_eps, schedule, 'eps')
  out = jax.jit(lambda x: likelihood.vlb_terms(
      denoise_fn, schedule, x, rng, variance=variance, clip_denoised=clip))(x0)
  noises = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, i),
                                                  x0.shape), np.float64)
                     for i in range(T)])
  prior, terms = ref_vlb_terms(betas, np.float64(x0), noises, variance, clip)
  assert prior.min() > 1e-3
  np.testing.assert_allclose(out['prior_bpd'], prior, rtol=1e-4)
  for i in (0, 1, T // 2, T - 1):  # L_0, the first KL, a middle one, the last
    np.testing.assert_allclose(out['terms_bpd'][:, i], terms[:, i], rtol=2e-4,
                               err_msg=f'term {i}')
  np.testing.assert_allclose(out['terms_bpd'], terms, rtol=2e-4)
  assert np.abs(terms[:, 1:]).min() > 1e-6  # the comparison is not 0 == 0
  np.testing.assert_allclose(out['total_bpd'], prior + terms.sum(1),
                             rtol=1e-5)


# ------------------------------------------------------------ the oracle --


def test_oracle_that_knows_x0_has_zero_kl_terms():
  """A model handed x0 predicts eps exactly, so p_theta = q(x_{t-1}|x_t,x0)
  when sigma^2 = beta~: every KL term vanishes, L_0 and the mismatch cost of
  sigma^2 = beta have closed forms."""
  b = np.linspace(1e-4, 0.02, 1000)  # the paper's schedule, no network
  schedule = schedules.Schedule.from_betas(b)
  image = input_pipeline.load_split(tiny_config().data, 'test').images[:1]
  x0 = jnp.asarray(np.repeat(image, 4, 0), jnp.float32) / 127.5 - 1

  def oracle(x_t, t):
    a = schedule.sqrt_alphas_cumprod[t][:, None, None, None]
    s = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    return (x_t - a * x0) / s

  denoise_fn = denoiser.make_denoiser(oracle, schedule, 'eps')
  run = lambda var: jax.jit(lambda x: likelihood.vlb_terms(
      denoise_fn, schedule, x, jax.random.key(0), variance=var))(x0)
  tilde, beta = run('beta_tilde'), run('beta')
  assert np.abs(tilde['terms_bpd'][:, 1:]).max() < 1e-5
  assert tilde['x0_mse'][:, :100].max() < 1e-8
  # L_0 with x0_hat = x0: mean x0 (coef1 = 1, coef2 = 0 at t = 1), sigma^2 =
  # beta~_2; interior bins hold 2 Phi(h) - 1, edge bins Phi(h), h = 1/255/s.
  abar = np.cumprod(1 - b)
  s = math.sqrt(b[1] * (1 - abar[0]) / (1 - abar[1]))
  h = 1 / 255 / s
  x = np.asarray(x0[0]).ravel()
  edge = (x <= -1) | (x >= 1)
  nll = -np.where(edge, stats.norm.logcdf(h), np.log(2 * stats.norm.cdf(h) - 1))
  np.testing.assert_allclose(tilde['terms_bpd'][:, 0], nll.mean() / LN2,
                             rtol=1e-4)
  # sigma^2 = beta: the KL is only the variance mismatch, the same per pixel.
  ratio = (b * (1 - np.append(1.0, abar[:-1])) / (1 - abar))[1:] / b[1:]
  mismatch = 0.5 * (ratio - 1 - np.log(ratio)) / LN2
  np.testing.assert_allclose(beta['terms_bpd'][0, 1:], mismatch, rtol=2e-3,
                             atol=1e-9)
  assert mismatch[0] > 1e-2  # not a comparison of zeros


# ----------------------------------------------- the U-Net, real and edge --


def random_state(config, seed=0):
  """The config's method and a train state of its U-Net with random
  parameters: fan-in scaled kernels, norm scales near 1, small biases. Built
  from the abstract state with numpy, as initialising (`exp.init_state()`)
  costs ~10 s of compilation; the U-Net also zero-initialises its output
  layers, so a fresh init would predict eps_theta = 0."""
  exp = experiment.build(config, parallel.create_mesh(jax.devices()[:1]))
  abstract = exp.abstract_state()
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    if len(leaf.shape) >= 2:
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    is_scale = 'scale' in jax.tree_util.keystr(path)
    return (1.0 if is_scale else 0.0) + 0.1 * noise

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  return exp.method, state.replace(ema_params=state.params)


def test_bound_is_finite_nonnegative_and_sums_up_for_a_random_unet():
  config = tiny_config()
  method, state = random_state(config)
  schedule = schedules.schedule_from_config(config.diffusion)
  digits = input_pipeline.load_split(config.data, 'test').images[:6]
  x0 = np.concatenate([digits.astype(np.float32) / 127.5 - 1,
                       -np.ones((1, 8, 8, 1), np.float32),
                       np.ones((1, 8, 8, 1), np.float32)])

  @jax.jit
  def bound(params, x):
    denoise_fn = denoiser.make_denoiser(method.network_fn(params), schedule,
                                        'eps')
    return likelihood.vlb_terms(denoise_fn, schedule, x, jax.random.key(2))

  out = jax.device_get(bound(state.ema_params, x0))
  for key, value in out.items():
    assert np.isfinite(value).all(), key
  assert (out['terms_bpd'] >= 0).all() and (out['prior_bpd'] > 0).all()
  np.testing.assert_allclose(
      out['total_bpd'], out['prior_bpd'] + out['terms_bpd'].sum(1), rtol=1e-6)
  assert (out['total_bpd'] > 0).all()


# ----------------------------------------------------------- --mode=eval --


def write_checkpoint(config, workdir, step):
  """What the trainer leaves behind, minus the cost of compiling a train
  step: the train state saved by the trainer's Checkpointer (the slow test
  below goes through real training and the command line)."""
  _, state = random_state(config)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(step, state.replace(step=jnp.asarray(step, state.step.dtype)),
            {'step': step})
  ckpt.wait_until_finished()
  ckpt.close()


def test_eval_mode_end_to_end_same_on_one_and_eight_devices(tmp_path):
  # 300 test digits in batches of 32: the last batch has 20 padded rows.
  config = tiny_config(**{'eval.batch_size': 32})
  workdir = str(tmp_path)
  write_checkpoint(config, workdir, 2)
  m8 = run_eval(config, workdir)
  out = tmp_path / 'eval' / 'step_00000002'
  with open(out / 'metrics.json') as f:
    saved = json.load(f)
  assert saved['total_bpd'] == m8['total_bpd']
  assert (out / 'curve.png').stat().st_size > 0
  assert saved['num_images'] == 300 and saved['split'] == 'test'
  assert saved['step'] == 2 and saved['num_devices'] == 8
  T = config.diffusion.num_timesteps
  for key in ('terms_bpd', 'rate_bpd', 'distortion_rmse'):
    assert len(saved[key]) == T and np.isfinite(saved[key]).all(), key
  for key in ('total_bpd', 'prior_bpd', 'decoder_bpd', 'kl_terms_bpd',
              'total_bpd_stderr', 'seconds'):
    assert np.isfinite(saved[key]) and saved[key] >= 0, key
  assert 0 < saved['total_bpd_stderr'] < 0.1 * saved['total_bpd']
  np.testing.assert_allclose(
      saved['total_bpd'],
      saved['prior_bpd'] + saved['decoder_bpd'] + saved['kl_terms_bpd'],
      rtol=1e-6)
  np.testing.assert_allclose(saved['rate_bpd'][0] + saved['decoder_bpd'],
                             saved['total_bpd'], rtol=1e-6)

  # Padding is masked out: the prior term has no noise, so it must be the
  # mean over exactly the 300 real images (a padded blank image is all -1).
  x0 = input_pipeline.load_split(config.data, 'test').images / 127.5 - 1
  abar_T = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[-1]
  prior = ref_normal_kl(np.sqrt(abar_T) * x0, np.log(1 - abar_T), 0.0, 0.0)
  np.testing.assert_allclose(saved['prior_bpd'], prior.mean() / LN2,
                             rtol=1e-5)

  m1 = run_eval(config, workdir, mesh=parallel.create_mesh(jax.devices()[:1]))
  assert m1['num_devices'] == 1 and m1['num_images'] == 300
  for key in ('total_bpd', 'prior_bpd', 'decoder_bpd', 'kl_terms_bpd'):
    np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5, err_msg=key)
  # From E[x^2] - E[x]^2 in float32 sums: a few digits cancel.
  np.testing.assert_allclose(m1['total_bpd_stderr'], m8['total_bpd_stderr'],
                             rtol=1e-3)
  np.testing.assert_allclose(m1['terms_bpd'], m8['terms_bpd'], rtol=1e-4)

  # The whole split in one batch: the sums stay 0-d arrays (this crashed
  # round() once).
  one = run_eval(tiny_config(**{'eval.batch_size': 304}), workdir,
                 mesh=parallel.create_mesh(jax.devices()[:1]))
  assert one['num_images'] == 300
  # Other batches draw other noise: the prior term has none.
  np.testing.assert_allclose(one['prior_bpd'], m1['prior_bpd'], rtol=1e-5)
  assert abs(one['total_bpd'] - m1['total_bpd']) < 3 * m1['total_bpd_stderr']


def test_eval_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='train first'):
    run_eval(tiny_config(), str(tmp_path))
  assert not (tmp_path / 'eval').exists()


def test_eval_without_likelihood_or_samples_has_nothing_to_do(tmp_path):
  # config.eval.likelihood=False skips DDPM's T passes per image; with no
  # samples to score either, eval says so before it reads a checkpoint.
  config = tiny_config(**{'eval.likelihood': False,
                          'sample_quality.num_samples': 0})
  with pytest.raises(ValueError, match='config.eval.likelihood=False'):
    run_eval(config, str(tmp_path))
  assert not (tmp_path / 'eval').exists()
  with pytest.raises(checkpointing.CheckpointError, match='train first'):
    run_eval(tiny_config(), str(tmp_path))  # the default evaluates bits/dim


def test_eval_is_a_command_line_mode():
  assert 'eval' in main.FLAGS['mode'].parser.enum_values


@pytest.mark.slow
def test_train_then_eval_from_the_command_line(tmp_path):
  from tests import test_cli  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  out = test_cli.run(f'--workdir={workdir}', *test_cli.TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  out = test_cli.run(f'--workdir={workdir}', '--mode=eval', *test_cli.TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'bits/dim' in out.stderr
  with open(os.path.join(workdir, 'eval', 'step_00000003',
                         'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['num_images'] == 300 and np.isfinite(metrics['total_bpd'])
