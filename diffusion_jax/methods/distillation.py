"""Progressive distillation (Salimans & Ho 2022) as a method.

A student that samples in N deterministic DDIM steps learns, from a teacher
that samples in 2N, to take two of the teacher's steps in one (Algorithm 2).
Both step over the levels of one grid: level j of M = 2N has time
t_j = j / M (continuous processes; t_j = j T / M - 1 for the discrete DDPM
schedule, which needs T divisible by M), level 0 being the data (alpha 1,
sigma 0). The student's levels are the even ones, so halving again
(teacher = this stage's student) keeps the grid: 1024 -> 512 -> ... -> 4.

Per example: level 2i (i uniform in 1..N), z = alpha x + sigma eps; two
teacher DDIM steps 2i -> 2i-1 -> 2i-2; the target x~ is the x0 that one
DDIM step from 2i would need to land on the same point,
  x~ = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha),
and the student is trained on w ||x0_hat - x~||^2 with the truncated-SNR
weight w = max(alpha^2 / sigma^2, 1) (sec. 4). The student starts as a copy
of the teacher (so predicts what it predicts; the paper's students predict
v: eps fails at few steps, sec. 4), with a fresh optimizer and EMA.

The teacher's parameters are part of the train state (its auxiliary slot),
so a stage resumes exactly and its checkpoint samples without the teacher's
run; the teacher run is read once, when the stage starts.

A guidance-conditioned student (config.model.guidance_input; Meng et al.
2023, "On distillation of guided diffusion models") takes the guidance
weight w as an input and learns, per example at w ~ U[guidance_min,
guidance_max], the teacher's *guided* steps: a plain class-conditional
teacher's two steps use classifier-free guidance at w (Meng et al.'s stage
one, the w-conditioned model, folded into the first halving), a
guidance-conditioned teacher (an earlier stage) is given w. It then samples
at config.sample.guidance_scale in one network call per step instead of
two. Which kind the teacher is is a flag in the state (its auxiliary slot
holds the teacher's parameters in the student's tree, the w embedding of a
plain teacher being the zero-output one it never used), so resuming needs
no teacher run.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import teacher as teacher_lib
from diffusion_jax.diffusion import denoiser, guidance
from diffusion_jax.methods.diffusion import DiffusionMethod


class DistillationError(teacher_lib.TeacherError):
  """A distillation stage that cannot work; the message says why."""


def level_table(process, num_levels: int):
  """(times (M+1,), alphas (M+1,), sigmas (M+1,)) of levels j = 0..M;
  level 0 is the data (alpha 1, sigma 0), its time unused."""
  j = np.arange(num_levels + 1)
  if process.is_discrete:
    steps = process.num_timesteps
    if steps % num_levels:
      raise DistillationError(
          f'the teacher samples in {num_levels} steps over the ddpm '
          f"schedule's {steps} (config.diffusion.num_timesteps), which they "
          'do not divide: progressive distillation needs nested grids. Use a '
          'continuous process (vp, rectified_flow) or num_timesteps '
          f'divisible by {num_levels}')
    times = np.maximum(j * (steps // num_levels) - 1, 0).astype(np.int32)
    abar = np.asarray(process.alphas_cumprod, np.float64)[times]
    alphas, sigmas = np.sqrt(abar), np.sqrt(1.0 - abar)
  elif process.kind == 'edm':
    raise DistillationError(
        "progressive distillation runs over t in [0, 1]; the 'edm' process "
        'has none: distil it with consistency distillation, or a vp teacher')
  else:
    times = (j / num_levels).astype(np.float32)
    alphas, sigmas = (np.asarray(a, np.float64)
                      for a in process.alpha_sigma(jnp.asarray(times)))
  alphas, sigmas = alphas.copy(), sigmas.copy()
  alphas[0], sigmas[0] = 1.0, 0.0
  return times, alphas, sigmas


def ddim_step(z, x0, alpha_t, sigma_t, alpha_s, sigma_s):
  """DDIM (eta 0) from level t to s: alpha_s x0 + (sigma_s / sigma_t)
  (z - alpha_t x0) (Song et al. 2021, eq. 12; x0 at s = data)."""
  return alpha_s * x0 + (sigma_s / sigma_t) * (z - alpha_t * x0)


class ProgressiveDistillation(DiffusionMethod):
  """A student of config.distill.student_steps DDIM steps."""

  name = 'progressive_distillation'

  def setup_distillation(self, student_steps: int, load_teacher,
                         guidance_range=(0.0, 0.0)) -> None:
    self.student_steps = student_steps
    self.guidance_range = guidance_range
    self._load_teacher = functools.cache(load_teacher)
    times, alphas, sigmas = level_table(self.process, 2 * student_steps)
    self.times = jnp.asarray(times)
    self.alphas = jnp.asarray(alphas, jnp.float32)
    self.sigmas = jnp.asarray(sigmas, jnp.float32)

  @classmethod
  def from_config(cls, config, **kwargs) -> 'ProgressiveDistillation':
    n = config.distill.student_steps
    if not n or n < 1:
      raise DistillationError(
          'config.distill.student_steps must be >= 1: the number of DDIM '
          "steps the student samples in (half its teacher's)")
    method = super().from_config(config, **kwargs)
    method.setup_distillation(
        n, lambda: _checked_teacher(config, n),
        (config.distill.guidance_min, config.distill.guidance_max))
    return method

  def describe(self) -> str:
    guided = (' taking w in [{}, {}]'.format(*self.guidance_range)
              if self.takes_guidance else '')
    return (f'progressive distillation: {2 * self.student_steps} -> '
            f'{self.student_steps} DDIM steps, {self.prediction} student'
            f'{guided}')

  # -------------------------------------------------------------- state --

  def prepare(self):
    self._load_teacher()  # outside jit: init then closes over its arrays

  def init_params(self, rng):
    """The teacher's parameters (in a guidance-conditioned student's tree:
    plus a fresh w embedding, whose output starts at zero)."""
    return self._in_student_tree(self._load_teacher().params, rng)

  def init_aux_state(self):
    """The teacher's parameters; a guidance-conditioned student's: those in
    its own tree, and whether the teacher takes w itself."""
    teacher = self._load_teacher()
    if not self.takes_guidance:
      return teacher.params
    return dict(params=self._in_student_tree(teacher.params,
                                             jax.random.key(0)),
                takes_guidance=jnp.asarray(teacher.method.takes_guidance))

  def _in_student_tree(self, teacher_params, rng):
    if not self.takes_guidance:
      return teacher_params
    fresh = DiffusionMethod.init_params(self, rng)
    return {**fresh, **teacher_params}

  def abstract_init(self):
    def shapes(rng):
      params = DiffusionMethod.init_params(self, rng)
      aux = (dict(params=params, takes_guidance=jnp.asarray(False))
             if self.takes_guidance else params)
      return self.state_from(params, aux)
    return jax.eval_shape(shapes, jax.random.key(0))

  def update_aux_state(self, teacher, xs, values):
    del xs, values
    return teacher

  # ----------------------------------------------------------- training --

  def _at(self, table, level, x):
    return denoiser.bcast(table[level], x)

  def _teacher_network(self, teacher, labels, w):
    """The teacher's network at labels; a guidance-conditioned student's
    teacher: guided at w (B,), by classifier-free guidance or, when it
    takes w itself, by its input."""
    if not self.takes_guidance:
      return self.network_fn(teacher, labels)
    params = teacher['params']
    takes_w = self.network_fn(params, labels, guidance=w)
    combined = guidance.guided_model(
        lambda x, t, y: self.network_fn(params, y)(x, t), labels,
        null_label=self.num_classes, scale=w, channels=self.image_shape[-1])
    # Only the branch taken runs (one network call, or one on 2B rows).
    return lambda x, t: jax.lax.cond(teacher['takes_guidance'], takes_w,
                                     combined, x, t)

  def draw(self, batch, rng, teacher):
    images, labels = batch if self.with_labels else (batch, None)
    level_rng, noise_rng, label_rng = jax.random.split(rng, 3)
    n = images.shape[0]
    i = jax.random.randint(level_rng, (n,), 1, self.student_steps + 1)
    noise = jax.random.normal(noise_rng, images.shape, images.dtype)
    if self.with_labels:
      drop = jax.random.bernoulli(label_rng, self.label_dropout, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)
    w = None
    if self.takes_guidance:  # per example (Meng et al. 2023, Algorithm 1)
      w = jax.random.uniform(jax.random.fold_in(rng, 3), (n,),
                             minval=self.guidance_range[0],
                             maxval=self.guidance_range[1])
    teach = denoiser.make_denoiser(self._teacher_network(teacher, labels, w),
                                   self.process, self.prediction)
    coef = lambda level: (self._at(self.alphas, level, images),
                          self._at(self.sigmas, level, images))
    a, s = coef(2 * i)
    z = a * images + s * noise
    z1 = z
    for level in (2 * i, 2 * i - 1):  # two teacher steps
      a_t, s_t = coef(level)
      a_s, s_s = coef(level - 1)
      x0 = teach(z1, self.times[level]).x0
      z1 = ddim_step(z1, x0, a_t, s_t, a_s, s_s)
    a2, s2 = coef(2 * i - 2)
    ratio = s2 / s
    target = (z1 - ratio * z) / (a2 - ratio * a)
    weight = jnp.maximum(jnp.square(self.alphas[2 * i] / self.sigmas[2 * i]),
                         1.0)
    return dict(z=z, t=self.times[2 * i], target=jax.lax.stop_gradient(target),
                weights=weight, labels=labels, w=w)

  def loss(self, params, xs, rng):
    network_fn = self.network_fn(params, xs['labels'], train=True,
                                 dropout_rng=rng, guidance=xs['w'])
    x0 = denoiser.make_denoiser(network_fn, self.process,
                                self.prediction)(xs['z'], xs['t']).x0
    err = jnp.mean(jnp.square(x0 - xs['target']).reshape(x0.shape[0], -1),
                   axis=1)
    values = xs['weights'] * err
    return jnp.mean(values), values

  # ----------------------------------------------------------- sampling --

  def sample(self, params, noise, rng):
    """student_steps DDIM steps over the even levels, from sigma_M z."""
    del rng  # deterministic
    denoise = self.denoiser(params, noise.shape[0])
    clip = self.sample_settings.clip_denoised

    def step(z, k):
      t, s = 2 * k, 2 * k - 2
      x0 = denoise(z, jnp.full((z.shape[0],), self.times[t])).x0
      if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
      return ddim_step(z, x0, self.alphas[t], self.sigmas[t], self.alphas[s],
                       self.sigmas[s]), None

    z = self.sigmas[-1] * noise
    z, _ = jax.lax.scan(step, z, jnp.arange(self.student_steps, 0, -1))
    return z

  def network_calls(self) -> int:
    return self.student_steps * self.evaluations_per_call()

  def sample_progressive(self, params, noise, rng, x0_at):
    raise DistillationError('progressive_timesteps need the ddpm sampler; a '
                            'distilled student samples with its own steps')


def _checked_teacher(config, student_steps: int):
  """The teacher run, checked: a distilled teacher must sample in twice
  this student's steps."""
  teacher = teacher_lib.load(config)
  if teacher.method.takes_guidance and not config.model.guidance_input:
    raise DistillationError(
        f'the teacher in {teacher.workdir} takes the guidance weight as an '
        'input (a guidance-conditioned student): set '
        'config.model.guidance_input=True')
  if teacher.config.get('method') == ProgressiveDistillation.name:
    theirs = teacher.config.distill.student_steps
    if theirs != 2 * student_steps:
      raise DistillationError(
          f'the teacher in {teacher.workdir} samples in {theirs} steps; this '
          f'stage halves it: set config.distill.student_steps={theirs // 2}')
  if config.diffusion.prediction == 'eps':
    logging.warning('an eps-predicting student: Salimans & Ho (sec. 4) found '
                    'eps fails at few steps; train the teacher with '
                    "prediction 'v' (or 'x0')")
  logging.info('Teacher: %s step %d (%s)', teacher.workdir, teacher.step,
               teacher.method.describe())
  return teacher
