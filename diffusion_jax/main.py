r"""Command line: train, sample or evaluate; the only importer of the loop.

  python -m diffusion_jax.main --config=configs/default.py --workdir=DIR \
      [--config.batch_size=64 ...] [--mode=train|sample|eval]

Exit codes: 0 done, or stopped by SIGTERM with consistent checkpoints on
disk (rerun the same command to continue); 2 a user error (bad config, data
or checkpoint, a diverged run): one last line of stderr says what and how to
fix it, without a traceback unless --verbosity=1; anything else is a bug and
keeps its traceback.
"""

import difflib
import importlib.util
import os
import signal

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import config_checks, errors

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples and '
                    'TensorBoard logs; a run resumes from it.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'],
                  'What to run; eval: bits/dim of the EMA params on '
                  'config.data.eval_split (and sample quality).')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
flags.DEFINE_bool('distributed', False,
                  'Multi-process run with auto-detected peers (TPU VM pod '
                  'slices, SLURM): calls jax.distributed.initialize().')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for an explicit multi-process '
                    'run (GPU clusters without SLURM, CPU tests).')
flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')
flags.DEFINE_bool('cpu_big_heap', True,
                  'On the CPU backend, keep large buffers in the malloc heap '
                  'between steps (diffusion_jax/host_malloc.py; 1.1-1.4x '
                  'faster steps, the process keeps its peak memory).')


class _QuietLibraries:
  """Drops INFO records from Orbax and TensorStore internals (dozens per
  save); warnings and errors pass, as does everything with --verbosity>=1."""

  def filter(self, record):
    if record.levelno > 20 or logging.get_verbosity() >= 1:
      return True
    return not any(part in record.pathname
                   for part in ('/orbax/', '/tensorstore/', '/etils/'))


def initialize_distributed(jax) -> None:
  """Joins the other processes before any device is touched."""
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError('--coordinator_address needs --num_processes and '
                           '--process_id')
    # CPU collectives across processes (no effect on TPU/GPU backends).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()


class Terminated(BaseException):
  """SIGTERM outside the training loop (which saves and returns itself):
  a BaseException, so no `except Exception` on the way swallows it."""


def _on_sigterm(signum, frame):  # pylint: disable=unused-argument
  raise Terminated()


_exit = errors.exit_now


def user_error(message) -> None:
  """One line on stderr, exit code 2 (a user error, not a bug)."""
  _exit(2, f'error: {errors.one_line(message)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    _run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except Terminated:
    _exit(0, f'Stopped by SIGTERM outside the training loop ({FLAGS.mode} '
          f'mode). The checkpoints in {FLAGS.workdir} are consistent (Orbax '
          'commits a step atomically): rerun the same command to continue.')
  except errors.UserError as e:
    errors.exit_on_user_error(e)


def _run(config, workdir, mode):
  # Every config value, before JAX is imported or a file is touched.
  config_checks.check(config, mode)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so --help stays fast and XLA_FLAGS set by the caller apply.
  import jax  # pylint: disable=g-import-not-at-top
  initialize_distributed(jax)
  from diffusion_jax import evaluate, experiment, generate, host_malloc, trainer  # pylint: disable=g-import-not-at-top

  if FLAGS.cpu_big_heap and jax.default_backend() == 'cpu':
    if not host_malloc.keep_large_buffers():
      logging.info('No glibc mallopt here: malloc left at its defaults.')

  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices())
  if '://' not in workdir:  # abspath would mangle gs://bucket/dir.
    workdir = os.path.abspath(workdir)
  # Config to objects, once: every other check runs here, before any compile
  # (their ValueErrors name the key: the user's to fix).
  try:
    exp = experiment.build(config, mode=mode)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e
  if mode == 'train':
    trainer.train_and_evaluate(exp, workdir)
  elif mode == 'eval':
    evaluate.evaluate(exp, workdir)
  else:
    generate.generate(exp, workdir)


# Keys renamed by the methods restructuring (issue 12): old -> new.
RENAMED_KEYS = {
    'sample_every_steps': 'sample_grid.every_steps',
    'num_sample_images': 'sample_grid.num_images',
    **{f'fid.{k}': f'sample_quality.{k}' for k in (
        'weights_path', 'reference', 'num_samples', 'every_steps',
        'train_num_samples', 'resize_to', 'cache_dir')},
}


def _config_keys(config, prefix=''):
  for key, value in config.items():
    yield prefix + key
    if hasattr(value, 'items'):
      yield from _config_keys(value, f'{prefix}{key}.')


def parse_flags(argv):
  """absl parsing; every error of the command line or the config file ends
  in one line and exit code 2 (ml_collections raises a bare AttributeError
  deep in its override code for a key that does not exist)."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # a missing or broken file fails here, not later
    return rest
  except flags.Error as e:
    user_error(f'{e} (see --helpshort)')
  except (AttributeError, KeyError) as e:
    _unknown_key(argv, e)
  except (OSError, SyntaxError, ImportError) as e:
    path = _config_path(argv)
    if path and not os.path.exists(path):
      user_error(f'--config={path}: no such file (configs/ holds the '
                 'experiment files, e.g. --config=configs/default.py)')
    user_error(f'--config={path}: cannot load it: {type(e).__name__}: {e}')
  return None


def _config_path(argv):
  paths = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  return paths[-1].split(':')[0] if paths else None


def _unknown_key(argv, error):
  overrides = [a.split('=', 1)[0][len('--config.'):] for a in argv
               if a.startswith('--config.')]
  known = set()
  path = _config_path(argv)
  if path:
    try:
      spec = importlib.util.spec_from_file_location('_config', path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      known = set(_config_keys(module.get_config()))
    except Exception:  # pylint: disable=broad-except
      pass
  renamed = [k for k in overrides if k in RENAMED_KEYS]
  if renamed:
    user_error(f'config key {renamed[0]!r} is now '
               f'{RENAMED_KEYS[renamed[0]]!r}: use '
               f'--config.{RENAMED_KEYS[renamed[0]]}=...')
  bad = [k for k in overrides if known and k not in known]
  if not bad:
    raise error
  hints = difflib.get_close_matches(bad[0], sorted(known), n=3)
  user_error(f'config key {bad[0]!r} does not exist in the config file'
             + (f'; did you mean {" or ".join(hints)}?' if hints else '.')
             + ' Run with --config=FILE and see config.json in a workdir '
             'for all keys.')


if __name__ == '__main__':
  # From the first moment: SIGTERM outside the loop exits 0 with a message
  # (the loop's PreemptionGuard takes it over to save, then hands it back).
  signal.signal(signal.SIGTERM, _on_sigterm)
  app.run(main, flags_parser=parse_flags)
