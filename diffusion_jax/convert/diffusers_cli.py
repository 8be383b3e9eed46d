r"""The diffusers import command: a released checkpoint -> a new workdir.

Usage (from a local copy; nothing is downloaded):

  python -m diffusion_jax.convert.diffusers_cli --src=/path/to/ddpm-cifar10-32 \
      --workdir=runs/ddpm_cifar10_released --config=configs/cifar10_ddpm.py
  python -m diffusion_jax.main --config=configs/cifar10_ddpm.py \
      --workdir=runs/ddpm_cifar10_released --mode=sample

The workdir gets `checkpoints/0`: a TrainState with step 0, params =
ema_params = the released weights (they are the EMA weights of the paper's
runs) and a fresh optimizer state, so sampling, evaluation and fine-tuning
all start from it like from any of our checkpoints.

Reading and mapping the checkpoint is `convert.diffusers`; this module adds
the TrainState, the checkpoint and config.json, and the command line.
"""

import os
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from diffusion_jax.convert import diffusers


# ---------------------------------------------------------------- workdir --
def convert_to_workdir(src: str, workdir: str,
                       base_config: ml_collections.ConfigDict):
  """Writes workdir/checkpoints/0 and workdir/config.json; returns the config.

  The TrainState has step 0, params = ema_params = the checkpoint's weights
  and a freshly initialised optimizer state (released checkpoints carry
  none), so training from it is a fine-tune that starts Adam anew.
  """
  # Imported here: the training stack (TensorFlow via clu) is slow to import
  # and not needed to read or map weights.
  from diffusion_jax import checkpointing, experiment, methods  # pylint: disable=g-import-not-at-top
  from diffusion_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top

  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f'{ckpt_dir} already holds checkpoints: refusing to mix '
                     'converted weights into an existing run; use a new '
                     '--workdir')
  hf_config, state_dict = diffusers.load_diffusers_unet(src)
  config = diffusers.config_from_diffusers(hf_config, base_config)
  method = methods.DiffusionMethod.from_config(config)
  abstract = jax.eval_shape(method.init_params, jax.random.key(0))
  params = jax.tree.map(jnp.asarray,
                        diffusers.convert_params(state_dict, abstract))
  state = create_train_state(params, method.optimizer)
  num = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  checkpointer = checkpointing.Checkpointer(ckpt_dir)
  # The input pipeline's position ({'step': 0}), so fine-tuning resumes.
  checkpointer.save(0, state, {'step': 0})
  checkpointer.wait_until_finished()
  checkpointer.close()
  experiment.write_config(config, workdir)
  logging.info('Converted %s (%s parameters) into %s/checkpoints/0',
               src, f'{num:,}', workdir)
  return config


# -------------------------------------------------------------------- CLI --
def config_overrides(base_config, config) -> list[str]:
  """The --config.X=V flags that turn base_config's model/data into config's."""
  flags_ = []
  for section in ('model', 'data'):
    for key, value in config[section].items():
      if base_config[section][key] != value:
        if isinstance(value, tuple):
          value = '(' + ','.join(map(str, value)) + (',)' if len(value) == 1
                                                     else ')')
        flags_.append(f'--config.{section}.{key}={value}')
  return flags_


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from configs import default  # pylint: disable=g-import-not-at-top
  base = FLAGS.config if FLAGS.config is not None else default.get_config()
  workdir = os.path.abspath(FLAGS.workdir)
  try:
    config = convert_to_workdir(FLAGS.src, workdir, base)
  except (ValueError, ImportError) as e:
    # Bad input, not a bug: the message alone says what to do.
    sys.exit(f'diffusers_cli: {e}')
  overrides = config_overrides(base, config)
  config_file = ('configs/default.py' if FLAGS.config is None else
                 config_flags.get_config_filename(FLAGS['config']))
  # Sample mode rebuilds the model from its own --config: these overrides
  # make it the checkpoint's model (plus any --config.* passed here).
  print('Converted. Sample with:\n  python -m diffusion_jax.main '
        + ' '.join([f'--config={config_file}', *overrides,
                    f'--workdir={workdir}', '--mode=sample']))


FLAGS = flags.FLAGS

if __name__ == '__main__':
  # Flags are defined only when run as a script: main.py defines --config and
  # --workdir too, and tests import both modules.
  flags.DEFINE_string('src', None, 'Local diffusers UNet2DModel directory or '
                      'pipeline root (with unet/).')
  flags.DEFINE_string('workdir', None, 'New run directory to write the '
                      'converted checkpoint and config.json into.')
  config_flags.DEFINE_config_file(
      'config', None, 'Base experiment config (schedule, sampling, optimiser); '
      'model and image shape come from the checkpoint. Default: '
      'configs/default.py.', lock_config=True)
  flags.mark_flags_as_required(['src', 'workdir'])
  app.run(main)
