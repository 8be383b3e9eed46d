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


def test_stages_train_resume_exactly_and_sample(teacher_dir, tmp_path):
  config = _student_config(teacher_dir, 2)
  straight = run_train(config, str(tmp_path / 'straight'))
  # The student starts as the teacher (step 0 would equal it); after 4 steps
  # it has moved, and the teacher in its state has not.
  t = teacher.load(config)
  jax.tree.map(np.testing.assert_array_equal, straight.loss_history, t.params)
  assert not np.allclose(jax.tree.leaves(straight.params)[0],
                         jax.tree.leaves(t.params)[0])
  config.num_train_steps = 2
  run_train(config, str(tmp_path / 'resumed'))
  config.num_train_steps = 4
  resumed = run_train(config, str(tmp_path / 'resumed'))
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  out = run_sample(config, str(tmp_path / 'straight'))
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape[0] == 12 and np.isfinite(images).all()
  # Stage 2 learns from stage 1; it must halve stage 1's steps.
  with pytest.raises(teacher.TeacherError, match='student_steps=1'):
    experiment.build(_student_config(tmp_path / 'straight', 2)).init_state()
  stage2 = _student_config(tmp_path / 'straight', 1, num_train_steps=2)
  run_train(stage2, str(tmp_path / 'stage2'))


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
