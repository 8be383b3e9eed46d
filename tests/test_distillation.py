"""Progressive distillation (Salimans & Ho 2022): the target against the
teacher's two DDIM steps, the nested grids, and stages that train, resume
and sample through the loop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import experiment, teacher
from diffusion_jax.diffusion import denoiser, schedules, sde
from diffusion_jax.methods import distillation
from tests.util import run_sample, run_train, tiny_config

MU, S = 0.3, 0.5


def test_level_table_nests_and_ends_on_the_data():
  ddpm = schedules.Schedule.from_betas(schedules.linear_betas(20))
  times, alphas, sigmas = distillation.level_table(ddpm, 4)
  np.testing.assert_array_equal(times[1:], [4, 9, 14, 19])
  assert (alphas[0], sigmas[0]) == (1.0, 0.0)
  abar = np.asarray(ddpm.alphas_cumprod, np.float64)
  np.testing.assert_allclose(alphas[1:] ** 2, abar[[4, 9, 14, 19]], rtol=1e-6)
  half, _, _ = distillation.level_table(ddpm, 2)
  np.testing.assert_array_equal(half[1:], times[2::2])  # every other level
  with pytest.raises(distillation.DistillationError, match='divide'):
    distillation.level_table(ddpm, 8)
  vp = sde.Process('vp')
  times, alphas, sigmas = distillation.level_table(vp, 8)
  np.testing.assert_allclose(times, np.arange(9) / 8)
  a, s = vp.alpha_sigma(jnp.asarray(times[1:]))
  np.testing.assert_allclose(sigmas[1:], s, rtol=1e-6)


def test_one_student_step_lands_where_two_teacher_steps_do():
  """The target x~ is exactly the x0 whose DDIM step from level 2i reaches
  the teacher's point after two steps (Algorithm 2), for any teacher."""
  process = sde.Process('vp')
  times, alphas, sigmas = distillation.level_table(process, 8)
  k = jax.random.split(jax.random.key(0), 2)
  x = MU + S * jax.random.normal(k[0], (6, 2, 2, 1))
  eps = jax.random.normal(k[1], x.shape)

  def teacher_x0(z, level):  # the Gaussian posterior mean: a real denoiser
    a, s = alphas[level], sigmas[level]
    return MU + a * S ** 2 * (z - a * MU) / (a * a * S ** 2 + s * s)

  for i in (1, 2, 4):
    t, m, s = 2 * i, 2 * i - 1, 2 * i - 2
    z = alphas[t] * x + sigmas[t] * eps
    z1 = distillation.ddim_step(z, teacher_x0(z, t), alphas[t], sigmas[t],
                                alphas[m], sigmas[m])
    z2 = distillation.ddim_step(z1, teacher_x0(z1, m), alphas[m], sigmas[m],
                                alphas[s], sigmas[s])
    ratio = sigmas[s] / sigmas[t]
    target = (z2 - ratio * z) / (alphas[s] - ratio * alphas[t])
    student = distillation.ddim_step(z, target, alphas[t], sigmas[t],
                                     alphas[s], sigmas[s])
    np.testing.assert_allclose(student, z2, atol=1e-5)


def _teacher_config(**overrides):
  return tiny_config(**{'diffusion.process': 'vp', 'diffusion.prediction': 'v',
                        'sample.sampler': 'euler', 'sample.num_steps': 4,
                        **overrides})


def _student_config(teacher_dir, steps, **overrides):
  return _teacher_config(**{'method': 'progressive_distillation',
                            'distill.teacher_workdir': str(teacher_dir),
                            'distill.student_steps': steps, **overrides})


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('teacher')
  run_train(_teacher_config(), str(workdir))
  return workdir


def _resumes_exactly(config, straight, workdir):
  """2 + 2 steps (the teacher restored from the checkpoint's loss_history)
  give the straight 4-step run's parameters bit for bit."""
  config = config.copy_and_resolve_references()
  config.num_train_steps = 2
  run_train(config, str(workdir))
  config.num_train_steps = 4
  resumed = run_train(config, str(workdir))
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)


def test_stages_train_and_sample(teacher_dir, tmp_path):
  config = _student_config(teacher_dir, 2)
  straight = run_train(config, str(tmp_path / 'straight'))
  # The student starts as the teacher (step 0 would equal it); after 4 steps
  # it has moved, and the teacher in its state has not.
  t = teacher.load(config)
  jax.tree.map(np.testing.assert_array_equal, straight.loss_history, t.params)
  assert not np.allclose(jax.tree.leaves(straight.params)[0],
                         jax.tree.leaves(t.params)[0])
  out = run_sample(config, str(tmp_path / 'straight'))
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape[0] == 12 and np.isfinite(images).all()
  # Stage 2 learns from stage 1; it must halve stage 1's steps.
  with pytest.raises(teacher.TeacherError, match='student_steps=1'):
    experiment.build(_student_config(tmp_path / 'straight', 2)).init_state()
  stage2 = _student_config(tmp_path / 'straight', 1, num_train_steps=2)
  run_train(stage2, str(tmp_path / 'stage2'))


# The loop's exact resume is in the default suite for diffusion (with its
# loss history), GAN, VAE, Glow, PixelCNN++ and the captioned models.
@pytest.mark.slow
def test_a_stage_resumes_exactly(teacher_dir, tmp_path):
  config = _student_config(teacher_dir, 2)
  straight = run_train(config, str(tmp_path / 'straight'))
  _resumes_exactly(config, straight, tmp_path / 'resumed')


@pytest.mark.parametrize('overrides, match', [
    ({'model.ch': 8}, r'model.ch: student 8, teacher 16'),
    ({'diffusion.process': 'rectified_flow'},
     "diffusion.process: student 'rectified_flow', teacher 'vp'"),
    ({'distill.teacher_step': 3}, 'no checkpoint step 3'),
])
def test_a_mismatched_teacher_is_refused(teacher_dir, overrides, match):
  with pytest.raises(teacher.TeacherError, match=match):
    teacher.load(_student_config(teacher_dir, 2, **overrides))


def test_bad_distillation_settings(tmp_path):
  with pytest.raises(ValueError, match='student_steps must be >= 1'):
    experiment.build(_student_config(tmp_path, 0))
  with pytest.raises(teacher.TeacherError, match='config.json does not exist'):
    experiment.build(_student_config(tmp_path, 2)).init_state()
  with pytest.raises(teacher.TeacherError, match='set config.distill.teacher'):
    experiment.build(_student_config('', 2)).init_state()
  with pytest.raises(ValueError, match='do not divide'):
    experiment.build(_student_config(tmp_path, 3, **{
        'diffusion.process': 'ddpm', 'diffusion.prediction': 'eps',
        'sample.sampler': 'ddim'}))


# ------------------------------------------- guidance-conditioned student --

def _guided_config(teacher_dir, steps, **overrides):
  return _student_config(teacher_dir, steps, **{
      'model.num_classes': 10, 'model.guidance_input': True,
      'distill.guidance_min': 0.5, 'distill.guidance_max': 3.0, **overrides})


@pytest.fixture(scope='module')
def conditional_teacher_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('conditional_teacher')
  run_train(_teacher_config(**{'model.num_classes': 10}), str(workdir))
  return workdir


def _inputs(n=4):
  k = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k[0], (n, 8, 8, 1))
  t = jax.random.uniform(k[1], (n,), minval=0.1, maxval=0.9)
  return x, t, jnp.array([0, 1, 2, 3][:n]), jnp.array([0.5, 1.0, 2.0, 3.0][:n])


def test_a_guided_student_learns_its_teachers_guided_steps(
    conditional_teacher_dir, tmp_path):
  """Stage 1: the student starts as its plain teacher for every w, and its
  target comes from the teacher's classifier-free-guided prediction at each
  example's w (Meng et al. 2023); it trains and samples at w in one call
  per step. Stage 2: a guided teacher is given w."""
  config = _guided_config(conditional_teacher_dir, 2)
  student = experiment.build(config)
  state = student.init_state()
  plain = teacher.load(config)
  method = student.method
  x, t, labels, w = _inputs()
  # The w embedding adds exactly zero at init: the teacher's network.
  want = plain.method.network_fn(plain.params, labels)(x, t)
  got = method.network_fn(state.params, labels, guidance=w)(x, t)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # The teacher inside draw: (1 + w) f(y) - w f(null), per example.
  null = jnp.full_like(labels, 10)
  f = lambda y: plain.method.network_fn(plain.params, y)(x, t)
  guided = (1 + w[:, None, None, None]) * f(labels) - w[:, None, None,
                                                          None] * f(null)
  teach = method._teacher_network(state.loss_history, labels, w)
  assert not bool(state.loss_history['takes_guidance'])
  np.testing.assert_allclose(teach(x, t), guided, atol=1e-5)
  assert method.network_calls() == 2
  # Training, sampling at two weights (exact resume: the slow test below).
  straight = run_train(config, str(tmp_path / 'straight'))
  config.sample.guidance_scale = 2.0
  out = run_sample(config, str(tmp_path / 'straight'))
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape[0] == 12 and np.isfinite(images).all()
  # w reaches the trained network (the EMA moved its w embedding off zero).
  method.guidance_scale = 0.0
  at_0 = method.denoiser(straight.ema_params, 4)(x, t).x0
  method.guidance_scale = 2.0
  at_2 = method.denoiser(straight.ema_params, 4)(x, t).x0
  assert float(jnp.abs(at_2 - at_0).max()) > 1e-6
  # Stage 2: the teacher takes w, and is given it (one call, no mixing).
  stage2 = experiment.build(_guided_config(tmp_path / 'straight', 1))
  state2 = stage2.init_state()
  assert bool(state2.loss_history['takes_guidance'])
  stage1 = teacher.load(_guided_config(tmp_path / 'straight', 1))
  want = stage1.method.network_fn(stage1.params, labels, guidance=w)(x, t)
  teach = stage2.method._teacher_network(state2.loss_history, labels, w)
  np.testing.assert_allclose(teach(x, t), want, atol=1e-5)
  # A guided teacher cannot teach a student that does not take w.
  with pytest.raises(distillation.DistillationError,
                     match='model.guidance_input=True'):
    experiment.build(_student_config(
        tmp_path / 'straight', 1, **{'model.num_classes': 10})).init_state()


@pytest.mark.parametrize('overrides, match', [
    ({'model.num_classes': 0}, 'needs a class-conditional model'),
    ({'method': 'diffusion'}, 'only a progressive-distillation student'),
    ({'distill.guidance_min': 2.0, 'distill.guidance_max': 1.0},
     'guidance_min=2.0 is above config.distill.guidance_max'),
    ({'distill.guidance_min': -1.0}, 'guidance_min'),
])
def test_bad_guided_student_settings(overrides, match):
  from diffusion_jax import config_checks, errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=match):
    config_checks.check(_guided_config('/nonexistent', 2, **overrides))


def test_a_unet_without_guidance_input_refuses_a_weight():
  from diffusion_jax.models import unet  # pylint: disable=g-import-not-at-top
  net = unet.UNet(out_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1,
                  attn_resolutions=(), num_groups=4, temb_dim=16)
  x = jnp.zeros((2, 4, 4, 1))
  params = net.init(jax.random.key(0), x, jnp.zeros((2,)), train=False)
  with pytest.raises(ValueError, match='guidance_input'):
    net.apply(params, x, jnp.zeros((2,)), train=False, guidance=jnp.ones(2))


@pytest.mark.slow
def test_a_guided_student_resumes_exactly(conditional_teacher_dir, tmp_path):
  config = _guided_config(conditional_teacher_dir, 2)
  straight = run_train(config, str(tmp_path / 'straight'))
  _resumes_exactly(config, straight, tmp_path / 'resumed')
