"""Class conditioning and classifier-free guidance."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.data import pipeline as input_pipeline
from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import guidance
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules
from tests.util import tiny_config


def test_class_labels_cycle_or_fix_a_class():
  np.testing.assert_array_equal(guidance.class_labels(7, 3),
                                [0, 1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(guidance.class_labels(4, 3, 2), [2, 2, 2, 2])
  with pytest.raises(ValueError, match='class_label'):
    guidance.class_labels(4, 3, 3)


def test_guided_model_is_one_call_of_the_combination():
  calls = []

  def apply_fn(x, t, y):
    calls.append(x.shape[0])
    # An output that depends on the row's label and input; 2 channels: a
    # "mean" channel and a "variance" channel.
    return jnp.concatenate([x * (1.0 + y[:, None, None, None]),
                            x + y[:, None, None, None]], -1)

  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  t = jnp.arange(3)
  labels = jnp.array([0, 1, 2])
  null = 5
  w = 1.5
  out = guidance.guided_model(apply_fn, labels, null_label=null, scale=w,
                              channels=1)(x, t)
  assert calls == [6]  # one call on the doubled batch
  cond = apply_fn(x, t, labels)
  uncond = apply_fn(x, t, jnp.full((3,), null))
  np.testing.assert_allclose(out[..., :1], (1 + w) * cond[..., :1]
                             - w * uncond[..., :1], rtol=1e-6)
  np.testing.assert_allclose(out[..., 1:], cond[..., 1:], rtol=1e-6)
  plain = guidance.guided_model(apply_fn, labels, null_label=null, scale=0.0,
                                channels=1)(x, t)
  np.testing.assert_allclose(plain, cond)


def test_guidance_on_gaussian_classes_has_a_known_answer():
  """Class k ~ N(mu_k, s2), the null class ~ N(0, s2). eps_theta is affine
  in mu, so (1 + w) eps(mu_k) - w eps(0) = eps((1 + w) mu_k): guided samples
  are exactly N((1 + w) mu_k, s2). DDIM (eta = 0) through guided_model must
  produce that per class."""
  schedule = schedules.Schedule.from_betas(schedules.linear_betas(1000))
  mus = jnp.array([-0.4, 0.1, 0.5, 0.0])  # last: the null class
  s2 = 0.04

  def apply_fn(x, t, y):
    ab = schedules.at(schedule.alphas_cumprod, t, x)
    mu = mus[y].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * s2 + 1 - ab)

  labels = guidance.class_labels(3 * 1024, 3)
  x_T = jax.random.normal(jax.random.key(0), (3 * 1024, 2, 1, 1))
  for w in (0.0, 2.0):
    model_fn = guidance.guided_model(apply_fn, labels, null_label=3, scale=w,
                                     channels=1)
    denoise_fn = denoiser.make_denoiser(model_fn, schedule, 'eps')
    out = np.asarray(jax.jit(lambda x, m=denoise_fn: samplers.ddim_sample(
        m, schedule, x, jax.random.key(1),
        timesteps=samplers.spaced_timesteps(1000, 100), clip_denoised=False)
    )(x_T))
    for k in range(3):
      rows = out[np.asarray(labels) == k]
      assert abs(rows.mean() - (1 + w) * float(mus[k])) < 0.02
      assert abs(rows.var() - s2) < 0.15 * s2


def test_train_batches_carry_the_labels_of_their_images():
  config = tiny_config()
  it = input_pipeline.create_train_iterator(
      config.data, global_batch_size=32, seed=3, sharding=None,
      with_labels=True)
  images, labels = next(it)
  it.close()
  data = input_pipeline.load_split(config.data, 'train')
  as_uint8 = np.round((images + 1) * 127.5).astype(np.uint8)
  for image, label in zip(as_uint8, labels):
    matches = np.flatnonzero((data.images == image).all(axis=(1, 2, 3)))
    assert label in data.labels[matches]


def test_a_source_without_labels_is_a_clear_error(tmp_path):
  np.savez(tmp_path / 'd.npz', images=np.zeros((4, 8, 8, 1), np.uint8))
  config = tiny_config(**{'data.source': 'npz',
                          'data.data_dir': str(tmp_path / 'd.npz')})
  with pytest.raises(input_pipeline.DataError, match='num_classes'):
    input_pipeline.create_train_iterator(
        config.data, global_batch_size=4, seed=0, sharding=None,
        with_labels=True)


def test_a_label_beyond_num_classes_is_a_clear_error(tmp_path):
  """Digits have labels 0-9: a 3-class model would index its class
  embedding out of range (NaN at step 1); it stops with the fix instead."""
  from tests.util import run_train  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{'model.num_classes': 3, 'num_train_steps': 1})
  with pytest.raises(input_pipeline.DataError,
                     match=r'outside 0..2 \(config.model.num_classes=3\)'):
    run_train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints') or not (
      os.listdir(tmp_path / 'run' / 'checkpoints'))
