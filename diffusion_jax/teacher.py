"""A trained run as a frozen teacher for distillation (config.distill).

Distillation methods (progressive distillation, consistency distillation)
learn from the EMA parameters of another run's checkpoint. `load` reads that
run's config.json, checks that it is the same model and process as the
student's (the student starts from, or is compared with, the teacher's
network), builds the teacher's method from its own config and restores the
checkpoint. Every problem is a TeacherError naming the key and the fix,
raised before anything compiles.
"""

import dataclasses
import os
from typing import Any

from etils import epath
import jax
import ml_collections

from diffusion_jax import checkpointing, errors, parallel, run_config

# The config sections a student shares with its teacher: the network and the
# diffusion process (a student initialised from its teacher predicts what
# the teacher predicts).
SHARED_SECTIONS = ('model', 'diffusion', 'data')
# Keys of those sections a student may set differently (none affect the
# network's shape or the process).
# model.guidance_input: a guidance-conditioned student of a plain teacher
# (the w embedding is the only parameter it adds; distillation.py).
MAY_DIFFER = ('model.dropout', 'model.label_dropout', 'data.prefetch',
              'model.guidance_input',
              'data.data_dir', 'data.download', 'diffusion.time_sampling',
              'diffusion.logit_normal_mean', 'diffusion.logit_normal_std',
              'diffusion.loss', 'diffusion.sampler_variance')


class TeacherError(errors.UserError, ValueError):
  """The teacher run cannot teach this student; the message says why."""


@dataclasses.dataclass(frozen=True)
class Teacher:
  method: Any  # a methods.DiffusionMethod (or a subclass)
  params: Any  # its EMA parameters
  step: int
  workdir: str
  config: ml_collections.ConfigDict


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict a run wrote to <workdir>/config.json (run_config.py)."""
  try:
    return run_config.load(workdir, 'config.distill.teacher_workdir')
  except run_config.RunConfigError as e:
    raise TeacherError(str(e)) from e


def _flat(config, prefix='') -> dict:
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(_flat(value, name + '.'))
    else:
      out[name] = value
  return out


def check_matches(student, teacher_config, workdir: str) -> None:
  """The student's model, process and data equal the teacher's (but for
  MAY_DIFFER); raises TeacherError listing every difference."""
  mine = _flat({k: student[k] for k in SHARED_SECTIONS})
  theirs = _flat({k: teacher_config[k] for k in SHARED_SECTIONS
                  if k in teacher_config})
  diffs = [f'{k}: student {mine.get(k)!r}, teacher {theirs.get(k)!r}'
           for k in sorted(set(mine) | set(theirs))
           if k not in MAY_DIFFER and mine.get(k) != theirs.get(k)]
  if diffs:
    raise TeacherError(
        f'the teacher in {workdir} is another model, process or data set '
        f'than this student ({"; ".join(diffs)}): set these keys as the '
        "teacher's config.json has them, or train a matching teacher")


def load(config, mesh=None) -> Teacher:
  """The teacher of config.distill (teacher_workdir, teacher_step: 0 = the
  newest), checked against `config` and restored replicated over `mesh`."""
  from diffusion_jax import methods  # pylint: disable=g-import-not-at-top
  workdir = config.distill.teacher_workdir
  if not workdir:
    raise TeacherError(f'config.method={config.method!r} learns from a '
                       'trained run: set config.distill.teacher_workdir to '
                       "its work directory")
  teacher_config = load_run_config(workdir)
  check_matches(config, teacher_config, workdir)
  method = methods.create_method(teacher_config)
  directory = os.path.join(workdir, 'checkpoints')
  if not epath.Path(directory).exists():
    raise TeacherError(f'no checkpoint in {directory}: train the teacher '
                       'first or fix config.distill.teacher_workdir')
  mesh = parallel.create_mesh() if mesh is None else mesh
  repl = parallel.replicated(mesh)
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
      method.abstract_init())
  ckpt = checkpointing.Checkpointer(directory)
  try:
    step = config.distill.teacher_step or ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
      raise TeacherError(
          f'no checkpoint step {step} in {directory} (it holds '
          f'{list(ckpt.all_steps())}): set config.distill.teacher_step to '
          'one of them, or 0 for the newest')
    state, _ = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return Teacher(method=method, params=method.sample_params(state),
                 step=int(step), workdir=workdir, config=teacher_config)
