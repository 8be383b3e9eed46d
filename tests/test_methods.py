"""The method interface: a toy method runs through the unchanged loop.

A per-pixel Gaussian fitted by maximum likelihood is the smallest generative
method there is. Registered from outside the package, it trains,
checkpoints, resumes, logs, samples and evaluates through trainer.py,
generate.py and evaluate.py, and its figures are checked against numpy and
scipy on the same data.
"""

import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import flops, methods
from diffusion_jax.data import sources
from diffusion_jax.diffusion import likelihood
from diffusion_jax.train_state import create_optimizer, learning_rate_schedule
from tests.util import run_eval, run_sample, run_train, tiny_config


class Gaussian(methods.OneOptimizerMethod):
  """x ~ N(mean, exp(log_std)^2) independently per pixel."""
  name = 'gaussian'

  def __init__(self, image_shape, **optim):
    super().__init__(**optim)
    self.image_shape = image_shape

  def init_params(self, rng):
    return {'mean': jnp.zeros(self.image_shape),
            'log_std': jnp.zeros(self.image_shape)}

  def loss(self, params, x, rng):  # the NLL per pixel, in nats
    z = (x - params['mean']) * jnp.exp(-params['log_std'])
    nll = 0.5 * z ** 2 + params['log_std'] + 0.5 * math.log(2 * math.pi)
    values = jnp.mean(nll.reshape(x.shape[0], -1), axis=1)
    return jnp.mean(values), values

  def sample(self, params, noise, rng):
    return params['mean'] + jnp.exp(params['log_std']) * noise

  def log_likelihood(self, params, images, rng):
    log_p = likelihood.discretized_gaussian_log_likelihood(
        images, params['mean'], params['log_std'])
    bits = -jnp.mean(log_p.reshape(images.shape[0], -1), 1) / math.log(2.0)
    return {'total_bpd': bits}


def build_gaussian(config):
  return Gaussian((config.data.image_size,) * 2 + (config.data.channels,),
                  optimizer=create_optimizer(config.optim),
                  learning_rate_fn=learning_rate_schedule(config.optim),
                  ema_decay=config.optim.ema_decay, seed=config.seed)


methods.register('gaussian', build_gaussian)


def gaussian_config(**overrides):
  return tiny_config(**{
      'method': 'gaussian', 'batch_size': 64, 'num_train_steps': 300,
      'checkpoint_every_steps': 100, 'log_every_steps': 50,
      'optim.learning_rate': 0.05, 'optim.warmup_steps': 0,
      'optim.ema_decay': 0.9, 'sample_grid.every_steps': 300,
      'sample.num_images': 512, 'sample.batch_size': 256, **overrides})


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('gaussian'))
  return run_train(gaussian_config(), workdir), workdir


def _pixels(split):
  data = sources.load_split(tiny_config().data, split).images
  return data.astype(np.float64) / 127.5 - 1.0


def test_fit_is_the_maximum_likelihood_estimate(trained):
  state, _ = trained
  x = _pixels('train')
  params = jax.device_get(state.ema_params)
  # The MLE is the per-pixel mean and standard deviation. Pixels that are
  # constant in the data have no finite MLE (std -> 0); compare the rest.
  varying = x.std(0) > 0.05
  np.testing.assert_allclose(params['mean'][varying], x.mean(0)[varying],
                             atol=0.05)
  np.testing.assert_allclose(np.exp(params['log_std'])[varying],
                             x.std(0)[varying], rtol=0.15)


def test_checkpoints_logs_and_grid_of_the_loop(trained):
  _, workdir = trained
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '100', '200', '300']
  assert os.listdir(os.path.join(workdir, 'samples')) == [
      'ema_step_00000300.png']
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(workdir)
  events.Reload()
  loss = events.Tensors('loss')
  assert [e.step for e in loss] == [50, 100, 150, 200, 250, 300]
  # Training lowered the NLL from its value at the init (0.92 nats/pixel
  # for N(0, 1) on data in [-1, 1], at least 0.919).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert float(tf.make_ndarray(loss[-1].tensor_proto)) < 0.5
  # Throughput at every log step: XLA's FLOPs of the step against the
  # CPU's measured peak (flops.py), mfu = achieved / peak.
  value = lambda e: float(tf.make_ndarray(e.tensor_proto))
  mfu, achieved = events.Tensors('mfu'), events.Tensors('tflops_per_device')
  assert [e.step for e in mfu] == [e.step for e in loss]
  peak = flops.measured_cpu_peak_tflops()
  for m, a in zip(mfu, achieved):
    assert 0 < value(m) < 1
    np.testing.assert_allclose(value(m), value(a) / peak, rtol=1e-5)


def test_resume_continues_exactly(trained, tmp_path):
  full, _ = trained
  run_train(gaussian_config(num_train_steps=200), str(tmp_path))
  resumed = run_train(gaussian_config(), str(tmp_path))
  assert int(resumed.step) == 300
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
               jax.device_get(full.params))


def test_samples_follow_the_fitted_gaussian(trained):
  state, workdir = trained
  out = run_sample(gaussian_config(), workdir)
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape == (512, 8, 8, 1)
  params = jax.device_get(state.ema_params)
  # uint8 samples of N(m, s) clipped to [-1, 1]: their expected value is
  # -P(X < -1) + P(X > 1) + m (Phi(b) - Phi(a)) + s (phi(a) - phi(b)), with
  # a, b the standardised edges; rounding to 8 bits moves it by < 1/255.
  x = images.astype(np.float64) / 127.5 - 1
  m = params['mean'].astype(np.float64)
  s = np.exp(params['log_std'].astype(np.float64))
  a, b = (-1 - m) / s, (1 - m) / s
  want = (-stats.norm.cdf(a) + stats.norm.sf(b)
          + m * (stats.norm.cdf(b) - stats.norm.cdf(a))
          + s * (stats.norm.pdf(a) - stats.norm.pdf(b)))
  err = np.abs(x.mean(0) - want)
  assert np.all(err < 4 * s / math.sqrt(len(x)) + 1 / 255), err.max()


def test_eval_bits_per_dim_equal_scipy(trained):
  state, workdir = trained
  metrics = run_eval(gaussian_config(), workdir)
  params = jax.device_get(state.ema_params)
  x = _pixels('test')
  mean, std = params['mean'].astype(np.float64), np.exp(
      params['log_std'].astype(np.float64))
  # Each 8-bit value's bin of width 2/255; the edge bins reach +-inf.
  hi = np.where(x > 1 - 1e-3, np.inf, (x + 1 / 255 - mean) / std)
  lo = np.where(x < -1 + 1e-3, -np.inf, (x - 1 / 255 - mean) / std)
  # Upper-tail bins through the survival function, so no bin cancels.
  prob = np.where(lo > 0, stats.norm.sf(lo) - stats.norm.sf(hi),
                  stats.norm.cdf(hi) - stats.norm.cdf(lo))
  want = -np.mean(np.log2(np.maximum(prob, 1e-300)))
  assert metrics['num_images'] == len(x)
  assert metrics['total_bpd'] == pytest.approx(want, rel=1e-4)
  assert glob.glob(os.path.join(workdir, 'eval', 'step_00000300',
                                'metrics.json'))
