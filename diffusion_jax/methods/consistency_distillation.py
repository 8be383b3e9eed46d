"""Consistency distillation (Song et al. 2023, Algorithm 2) as a method.

A trained diffusion model of the edm process (the teacher, config.distill)
solves the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM
eq. 3) between neighbouring levels sigma_n < sigma_{n+1} of a fixed Karras
grid of config.consistency.num_levels levels (18 in the paper's CIFAR-10
runs), with EDM's Heun step (Algorithm 1, its steps to sigma > 0). Per
example: n uniform in 0..N-2, x_{n+1} = x0 + sigma_{n+1} z, x^_n = one Heun
step of the teacher from x_{n+1} to sigma_n, and the loss

  d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x^_n, sigma_n)),  lambda = 1,

theta- the target network, an EMA of the student with decay mu
(config.consistency.target_ema; 0.95 in the paper), updated after every
optimizer step: theta- <- mu theta- + (1 - mu) theta. The paper's d is
LPIPS (FID 3.55 in one step on CIFAR-10), which needs an ImageNet-trained
VGG not available here: d is config.consistency.metric, the pseudo-Huber
metric of iCT or the squared l2 distance (the paper's l2 ablation).

The teacher's parameters and the target's live in the train state's
auxiliary slot ({'teacher': ..., 'target': ...}): not constants of the
compiled step, resumed exactly with the run, and its checkpoints sample
without the teacher's run. The teacher run is read once, when the run
starts; the student starts as a copy of it (config.consistency.
init_from_teacher): EDM's F and the consistency F differ only near
sigma_min, where c_out -> 0 makes F irrelevant.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp

from diffusion_jax import teacher as teacher_lib
from diffusion_jax.diffusion import denoiser
from diffusion_jax.methods.consistency import (ConsistencyError,
                                               ConsistencyMethod,
                                               karras_levels)
from diffusion_jax.methods.diffusion import DiffusionMethod
from diffusion_jax.train_state import ema_update


def heun_step(denoise_fn, x: jax.Array, sigma: jax.Array,
              sigma_next: jax.Array) -> jax.Array:
  """One step of EDM's Heun solver (Algorithm 1, lines 4-8) from sigma to
  sigma_next > 0, per example (sigma, sigma_next: (B,)):

    d = (x - D(x; sigma)) / sigma,  x' = x + (sigma_next - sigma) d,
    x_next = x + (sigma_next - sigma) (d + d') / 2,
    d' = (x' - D(x'; sigma_next)) / sigma_next.

  denoise_fn(x, sigma (B,)) -> D, the teacher's estimate of the data."""
  s, s_next = denoiser.bcast(sigma, x), denoiser.bcast(sigma_next, x)
  d = (x - denoise_fn(x, sigma)) / s
  x_euler = x + (s_next - s) * d
  d_next = (x_euler - denoise_fn(x_euler, sigma_next)) / s_next
  return x + (s_next - s) * 0.5 * (d + d_next)


class ConsistencyDistillation(ConsistencyMethod):
  """CD from the teacher run of config.distill."""

  name = 'consistency_distillation'

  @classmethod
  def from_config(cls, config, **kwargs) -> 'ConsistencyDistillation':
    if config.consistency.num_levels < 2:
      raise ConsistencyError(
          f'config.consistency.num_levels={config.consistency.num_levels}: '
          'CD needs >= 2 noise levels (the paper: 18 on CIFAR-10)')
    if not config.distill.teacher_workdir:
      raise teacher_lib.TeacherError(
          "config.method='consistency_distillation' learns from a trained "
          'diffusion run of the edm process: set '
          'config.distill.teacher_workdir to its work directory')
    method = super().from_config(config, **kwargs)
    method._load_teacher = functools.cache(lambda: _checked_teacher(config))
    return method

  def prepare(self):
    self.teacher()  # read before init is traced

  def teacher(self) -> teacher_lib.Teacher:
    """The teacher run, read on first use. Read eagerly even when `init`
    is being traced (experiment.init_state jits it): its checkpoint's
    arrays must be concrete, not staged into init's computation."""
    with jax.ensure_compile_time_eval():
      return self._load_teacher()

  def describe(self) -> str:
    s = self.settings
    return (f'consistency distillation: {s.num_levels} levels, {s.metric} '
            f'metric, target EMA {s.target_ema}, {self._sampling()}')

  def levels(self) -> jax.Array:
    """The fixed grid sigma_0 = sigma_min < ... < sigma_{N-1} = sigma_max."""
    s = self.settings
    return karras_levels(s.num_levels, s.num_levels, s.sigma_min,
                         s.sigma_max, s.rho)

  # -------------------------------------------------------------- state --

  def init_params(self, rng):
    if self.settings.init_from_teacher:
      return self.teacher().params
    return super().init_params(rng)

  def init(self, rng):
    params = self.init_params(rng)
    return self.state_from(params, {'teacher': self.teacher().params,
                                    'target': params})

  def abstract_init(self):
    # The teacher has the student's network (teacher.check_matches), so its
    # shapes are the student's: no need to read the teacher run to restore.
    def shapes(rng):
      params = DiffusionMethod.init_params(self, rng)
      return self.state_from(params, {'teacher': params, 'target': params})
    return jax.eval_shape(shapes, jax.random.key(0))

  def train_step(self, state, batch):
    state, metrics = super().train_step(state, batch)
    aux = state.loss_history
    # Algorithm 2's last line, after the optimizer's update.
    target = ema_update(aux['target'], state.params, self.settings.target_ema)
    return state.replace(loss_history=dict(aux, target=target)), metrics

  # ----------------------------------------------------------- training --

  def teacher_denoiser(self, teacher_params):
    """(x, sigma (B,)) -> the teacher's D(x; sigma). Student and teacher
    share the process and prediction (teacher.check_matches); on the edm
    process the time is sigma and alpha = 1."""
    denoise = denoiser.make_denoiser(self.network_fn(teacher_params),
                                     self.process, self.prediction)
    return lambda x, sigma: denoise(x, sigma).x0

  def draw(self, batch, rng, aux_state):
    images = batch
    n = images.shape[0]
    index_rng, noise_rng = jax.random.split(rng)
    sigmas = self.levels()
    i = jax.random.randint(index_rng, (n,), 0, self.settings.num_levels - 1)
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    z = jax.random.normal(noise_rng, images.shape, images.dtype)
    x_next = images + denoiser.bcast(sigma_next, z) * z
    x_prev = heun_step(self.teacher_denoiser(aux_state['teacher']), x_next,
                       sigma_next, sigma)
    # The target network without dropout: Song et al. train CD with
    # dropout 0 (iCT sec. 3.1; their ImageNet-64 script: --dropout 0.0),
    # where train and eval mode agree; draw() has no rng of loss()'s to
    # share masks with, as iCT's loss does.
    target = self.consistency_fn(aux_state['target'])(x_prev, sigma)
    return dict(x=x_next, sigma=sigma_next,
                target=jax.lax.stop_gradient(target))

  def loss(self, params, xs, rng):
    f = self.consistency_fn(params, train=True, dropout_rng=rng)
    values = self.distance(f(xs['x'], xs['sigma']), xs['target'])
    return jnp.mean(values), values


def _checked_teacher(config):
  """The teacher run: a diffusion model of the edm process."""
  teacher = teacher_lib.load(config)
  if teacher.config.get('method', 'diffusion') != 'diffusion':
    raise teacher_lib.TeacherError(
        f'the teacher in {teacher.workdir} is a {teacher.config.method!r} '
        'run; consistency distillation needs a diffusion model (its '
        'denoiser solves the ODE): point config.distill.teacher_workdir at '
        "a config.method='diffusion' run")
  logging.info('Teacher: %s step %d (%s)', teacher.workdir, teacher.step,
               teacher.method.describe())
  return teacher
