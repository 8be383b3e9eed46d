r"""Command line: encode a data set once into a latent cache.

  python -m diffusion_jax.cache_latents --config=configs/digits_latent.py \
      [--config.latent.autoencoder=runs/digits_ae ...]

Reads the images of config.latent.images (with config.data's splits, size,
channels and random_flip), encodes them with config.latent.autoencoder and
writes config.data.data_dir, the cache that the same config then trains on
(latent/encode.py, latent/store.py). A rerun over a complete cache of the
same autoencoder and images does nothing; an interrupted one starts over.
Multi-process runs take main.py's flags (--distributed, or
--coordinator_address, --num_processes, --process_id); every process reads
and writes its share. Exit codes as main.py's: 2 for a user error, with one
line on stderr.
"""


from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import config_checks, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config'])
flags.DEFINE_bool('distributed', False, 'Multi-process run with auto-detected '
                  'peers: calls jax.distributed.initialize().')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for an explicit multi-process run.')
flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')


def run(config) -> bool:
  """Checks the config and writes the cache; False if it already existed."""
  config_checks.check(config, 'train')
  if config.data.source != 'latents':
    raise errors.ConfigError(
        f'config.data.source={config.data.source!r}: the cache is written to '
        "config.data.data_dir of a config with data.source='latents' (the "
        'images are config.latent.images): set both')
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.is_parsed() and FLAGS.coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  elif FLAGS.is_parsed() and FLAGS.distributed:
    jax.distributed.initialize()
  from diffusion_jax.latent import encode  # pylint: disable=g-import-not-at-top
  return encode.cache_latents(config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    run(FLAGS.config)
  except errors.UserError as e:
    errors.exit_on_user_error(e)


if __name__ == '__main__':
  app.run(main)
