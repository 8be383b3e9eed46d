r"""Command line: train or sample.

  python -m diffusion_jax.main --config=configs/default.py --workdir=DIR \
      [--config.batch_size=64 ...] [--mode=train|sample]
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples and '
                    'TensorBoard logs; a run resumes from it.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'What to run.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so --help stays fast and XLA_FLAGS set by the caller apply.
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import generate, train  # pylint: disable=g-import-not-at-top

  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
  if FLAGS.mode == 'train':
    train.train_and_evaluate(config, workdir)
  else:
    generate.generate(config, workdir)


if __name__ == '__main__':
  app.run(main)
