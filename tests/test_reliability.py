"""Reliability (issue 18): bad input through the command line, corrupt
checkpoints, NaN, and where a run stops.

The bad-input table runs `python -m diffusion_jax.main` as a user does,
against a work directory holding a trained checkpoint: every case must end
with exit code 2, one last stderr line naming the key (or path), no
traceback, and the work directory's files byte for byte as they were.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, config_checks, experiment, trainer
from diffusion_jax.errors import ConfigError
from tests.compile_flags import FAST_COMPILE
from tests.test_cli import REPO
from tests.test_preemption import ARGS
from tests.util import run_train, tiny_config

# The trained work directory: ARGS's tiny model, 4 steps, checkpoints 2, 4.
TRAIN = [a for a in ARGS if 'num_train_steps' not in a and
         'checkpoint_every' not in a] + [
             '--config.num_train_steps=4', '--config.checkpoint_every_steps=2',
             '--config.sample.num_images=8', '--config.sample.batch_size=8',
             '--config.sample.sampler=ddpm', '--config.sample.num_steps=0',
             '--config.eval.batch_size=8']


def _cli(workdir, *args, config='configs/default.py', timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
             XLA_FLAGS=FAST_COMPILE)
  argv = [sys.executable, '-m', 'diffusion_jax.main']
  if config:
    argv += [f'--config={config}', *TRAIN]
  return subprocess.run(argv + [f'--workdir={workdir}', *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _digest(directory) -> dict:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('trained'))
  out = _cli(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  return workdir


# (extra arguments, text the last line must contain). Train mode unless a
# --mode is given; all against the trained work directory.
BAD_INPUT = [
    # Counts and sizes that must be positive.
    (['--config.model.ch=0'], 'config.model.ch=0'),
    (['--config.diffusion.num_timesteps=0'], 'config.diffusion.num_timesteps'),
    (['--config.sample.num_images=-5', '--mode=sample'],
     'config.sample.num_images=-5'),
    (['--config.batch_size=0'], 'config.batch_size=0 must be positive'),
    (['--config.num_train_steps=-1'], 'config.num_train_steps'),
    (['--config.log_every_steps=0'], 'config.log_every_steps'),
    (['--config.checkpoint_every_steps=0'], 'config.checkpoint_every_steps'),
    (['--config.steps_per_call=0'], 'config.steps_per_call'),
    (['--config.grad_accum_steps=0'], 'config.grad_accum_steps'),
    (['--config.data.image_size=0'], 'config.data.image_size'),
    (['--config.data.channels=0'], 'config.data.channels'),
    (['--config.model.num_res_blocks=0'], 'config.model.num_res_blocks'),
    (['--config.model.num_groups=0'], 'config.model.num_groups'),
    (['--config.model.temb_dim=-1'], 'config.model.temb_dim'),
    (['--config.sample.batch_size=0', '--mode=sample'],
     'config.sample.batch_size'),
    (['--config.eval.batch_size=0', '--mode=eval'], 'config.eval.batch_size'),
    (['--config.sample_grid.num_images=0'], 'config.sample_grid.num_images'),
    (['--config.sample_quality.train_num_samples=0'],
     'config.sample_quality.train_num_samples'),
    (['--config.optim.grad_clip_norm=-1.0'], 'config.optim.grad_clip_norm'),
    (['--config.optim.learning_rate=-0.001'], 'config.optim.learning_rate'),
    (['--config.optim.adam_eps=0'], 'config.optim.adam_eps'),
    (['--config.sample.snr=0'], 'config.sample.snr'),
    # Checkpoint retention: 0 deleted every checkpoint; -1 failed in Orbax.
    (['--config.keep_checkpoints=0'], 'config.keep_checkpoints=0'),
    (['--config.keep_checkpoints=-1'], 'config.keep_checkpoints=-1'),
    # Must be >= 0.
    (['--config.sample.num_steps=-1', '--mode=sample'],
     'config.sample.num_steps'),
    (['--config.sample.ddim_eta=-1'], 'config.sample.ddim_eta'),
    (['--config.sample.guidance_scale=-1'], 'config.sample.guidance_scale'),
    (['--config.sample_grid.every_steps=-1'], 'config.sample_grid.every_steps'),
    (['--config.sample_quality.every_steps=-2'],
     'config.sample_quality.every_steps'),
    (['--config.sample_quality.floor_seeds=-1'],
     'config.sample_quality.floor_seeds'),
    (['--config.data.prefetch=-1'], 'config.data.prefetch'),
    (['--config.optim.warmup_steps=-1'], 'config.optim.warmup_steps'),
    # Fractions in range.
    (['--config.optim.ema_decay=1.0'], 'config.optim.ema_decay=1.0'),
    (['--config.optim.adam_b1=1.5'], 'config.optim.adam_b1'),
    (['--config.optim.adam_b2=-0.1'], 'config.optim.adam_b2'),
    (['--config.model.dropout=1.0'], 'config.model.dropout'),
    (['--config.model.label_dropout=1.5'], 'config.model.label_dropout'),
    (['--config.diffusion.beta_end=1.5'], 'config.diffusion.beta_end'),
    (['--config.diffusion.beta_start=0'], 'config.diffusion.beta_start'),
    # Values that must fit each other.
    (['--config.diffusion.beta_start=0.05'], 'config.diffusion.beta_start'),
    (['--config.diffusion.ve_sigma_min=100.0'], 'config.diffusion.ve_sigma_min'),
    (['--config.sample.corrector_steps=-1'], 'config.sample.corrector_steps'),
    (['--config.sample.class_label=-2'], 'config.sample.class_label'),
    (['--config.model.num_groups=3'], 'config.model.num_groups=3'),
    (['--config.model.ch_mult=(1,0)'], 'config.model.ch_mult'),
    # Enums.
    (['--config.model.dtype=float8'], 'config.model.dtype'),
    (['--config.sample_quality.network=vgg'], 'config.sample_quality.network'),
    (['--config.diffusion.loss=l3'], 'config.diffusion.loss'),
    (['--config.diffusion.prediction=score'], 'config.diffusion.prediction'),
    (['--config.method=flow_matching'], 'config.method'),
    (['--config.data.source=cifar'], 'digits'),
    # Sample mode runs the same checks as training (it skipped them).
    (['--mode=sample', '--config.sample.guidance_scale=3'],
     'config.sample.guidance_scale=3.0 needs a class-conditional model'),
    (['--mode=sample', '--config.sample.sampler=pc'], 'config.sample.sampler'),
    (['--mode=eval', '--config.sample.sampler=euler'], 'config.sample.sampler'),
    # The command line itself.
    (['--config.batch_size=abc'], 'batch_size'),
    (['--config.model.chanels=3'], "config key 'model.chanels' does not exist"),
    (['--config.sample_every_steps=5'], 'sample_grid.every_steps'),
    # Data that does not fit the model.
    (['--config.data.image_size=16'], 'image_size'),
    (['--config.data.source=npz', '--config.data.data_dir=/nonexistent.npz'],
     '/nonexistent.npz'),
]


def _case_id(case):
  return ' '.join(a.replace('--config.', '') for a in case[0])


@pytest.mark.parametrize('args, expected', BAD_INPUT,
                         ids=[_case_id(c) for c in BAD_INPUT])
def test_bad_input_one_line_exit_2_checkpoints_unchanged(trained, args,
                                                         expected):
  before = _digest(trained)
  out = _cli(trained, *args)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert lines[-1].startswith('error: ') and expected in lines[-1], lines[-1]
  assert _digest(trained) == before


def test_the_table_is_at_least_35_cases():
  assert len(BAD_INPUT) >= 35


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/nope.py'], 'configs/nope.py: no such file'),
    ([], 'config'),  # --config missing
])
def test_command_line_errors_before_any_config(tmp_path, args, expected):
  out = _cli(str(tmp_path / 'run'), *args, config=None)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, last
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('mode', ['sample', 'eval'])
def test_sample_and_eval_on_a_missing_workdir_create_nothing(tmp_path, mode):
  workdir = tmp_path / 'never_trained'
  out = _cli(str(workdir), f'--mode={mode}')
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert 'no checkpoint' in last and 'train first' in last, last
  # The Orbax manager's clean-up never prints the last word (it did:
  # "cannot schedule new futures after interpreter shutdown").
  assert 'RuntimeError' not in out.stderr
  assert not workdir.exists()


def test_traceback_only_with_verbosity(trained):
  out = _cli(trained, '--config.model.dtype=float8', '--verbosity=1')
  assert out.returncode != 0 and 'Traceback' in out.stderr
  assert 'ConfigError' in out.stderr


def test_fewer_steps_than_the_checkpoint_says_so_and_changes_nothing(trained):
  before = _digest(trained)
  out = _cli(trained, '--config.num_train_steps=2')
  assert out.returncode == 0, out.stderr[-2000:]
  assert ('already holds step 4, beyond config.num_train_steps=2: nothing to '
          'train') in out.stderr
  assert _digest(trained) == before


def test_config_checks_pass_every_shipped_config():
  """No false alarms: every experiment file passes the value checks."""
  import importlib  # pylint: disable=g-import-not-at-top
  # families.py holds sections default.py attaches; it is no experiment.
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs'))
                 if f.endswith('.py') and not f.startswith('_')
                 and f != 'families.py')
  assert 'cifar10_ddpm' in names
  for name in names:
    config_checks.check(importlib.import_module(f'configs.{name}').get_config())
  with pytest.raises(ConfigError, match='config.keep_checkpoints=0'):
    config_checks.check(tiny_config(keep_checkpoints=0))


# ------------------------------------------------------ corrupt checkpoints --


def _corrupt(step_dir, how):
  """The ways a fault campaign found a latest step broken."""
  state = step_dir / 'state'
  arrays = sorted(p for p in state.rglob('*') if p.is_file() and (
      p.parent.name == 'd' or 'ocdbt' in str(p.relative_to(state))))
  assert arrays, sorted(state.rglob('*'))
  if how == 'truncated_array_file':
    for p in arrays:
      p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
  elif how == 'missing_array_file':
    for p in arrays:
      p.unlink()
  elif how == 'missing_metadata':
    (state / '_METADATA').unlink()
  elif how == 'missing_data_iterator_state':
    shutil.rmtree(step_dir / 'data')


def _restore_final(workdir, config):
  mesh = experiment.parallel.create_mesh(jax.devices()[:1])
  abstract = experiment.build(config, mesh).abstract_state()
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state, data = ckpt.restore(abstract)
  ckpt.close()
  return jax.device_get(state), data


@pytest.fixture(scope='module')
def reference_six_steps(tmp_path_factory):
  """An uninterrupted 6-step run and a 4-step run to corrupt copies of."""
  mesh = experiment.parallel.create_mesh(jax.devices()[:1])
  ref = str(tmp_path_factory.mktemp('ref'))
  run_train(tiny_config(num_train_steps=6), ref, mesh)
  four = str(tmp_path_factory.mktemp('four'))
  run_train(tiny_config(num_train_steps=4), four, mesh)
  return _restore_final(ref, tiny_config(num_train_steps=6)), four


@pytest.mark.parametrize('how', [
    'truncated_array_file', 'missing_data_iterator_state',
    # The same path through restore_readable; slow to keep the suite short.
    pytest.param('missing_array_file', marks=pytest.mark.slow),
    pytest.param('missing_metadata', marks=pytest.mark.slow)])
def test_corrupt_latest_checkpoint_falls_back_and_resumes_bit_exactly(
    tmp_path, reference_six_steps, how):
  (want, want_data), four = reference_six_steps
  workdir = tmp_path / 'run'
  shutil.copytree(four, workdir)
  _corrupt(workdir / 'checkpoints' / '4', how)
  mesh = experiment.parallel.create_mesh(jax.devices()[:1])
  with mock.patch.object(checkpointing.logging, 'warning') as warning:
    run_train(tiny_config(num_train_steps=6), str(workdir), mesh)
  # Step 4 was skipped with a reason, moved aside (not deleted), and the run
  # resumed from step 2.
  # Orbax logs through the same absl module (e.g. 'Waiting for previous save'
  # on a loaded machine), so look for our message among all warnings.
  messages = [c[0][0] % c[0][1:] for c in warning.call_args_list]
  skipped = [m for m in messages if m.startswith('Skipped unreadable')]
  assert len(skipped) == 1, messages
  logged, = skipped
  assert logged.startswith('Skipped unreadable checkpoint step 4 ('), logged
  assert logged.endswith('Resuming from step 2.'), logged
  assert (workdir / 'checkpoints_unreadable' / '4').is_dir()
  got, data = _restore_final(str(workdir), tiny_config(num_train_steps=6))
  assert data == want_data
  assert int(got.step) == int(want.step) == 6
  for x, y in ((got.params, want.params), (got.ema_params, want.ema_params),
               (got.opt_state, want.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, x, y)


# --------------------------------------------------------------------- NaN --


def test_nan_stops_within_one_call_at_the_true_step(tmp_path):
  """With logging and checkpoints far apart, the first non-finite loss used
  to surface only at the next boundary (step 20 here)."""
  config = tiny_config(num_train_steps=20, log_every_steps=20,
                       checkpoint_every_steps=20, **{
                           'optim.learning_rate': 1e30,
                           'optim.warmup_steps': 0})
  mesh = experiment.parallel.create_mesh(jax.devices()[:1])
  exp = experiment.build(config, mesh)
  # Brute force: the first step whose loss is not finite.
  step_fn, state = exp.jit_train_step(), exp.init_state()
  it = exp.train_iterator()
  first_bad = None
  for s in range(1, 21):
    state, metrics = step_fn(state, next(it))
    if not all(np.isfinite(v) for v in jax.device_get(metrics).values()):
      first_bad = s
      break
  it.close()
  assert first_bad is not None and first_bad < 19
  with mock.patch.object(trainer, '_flush_metrics') as flush, \
       pytest.raises(trainer.NonFiniteLossError) as error:
    run_train(config, str(tmp_path), mesh)
  assert f') at step {first_bad}. ' in str(error.value), str(error.value)
  assert 'no checkpoint yet: nothing to resume' in str(error.value)
  flush.assert_not_called()  # stopped before the step-20 boundary


# ----------------------------------------------------------------- smaller --


def test_npz_with_an_object_array_names_the_file_and_keys(tmp_path):
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'pickled.npz'
  np.savez(path, images=np.array([{'a': 1}, None], dtype=object))
  config = tiny_config(**{'data.source': 'npz', 'data.data_dir': str(path)})
  with pytest.raises(sources.DataError,
                     match=r'pickled\.npz: an array of \[.images.\] holds '
                     r'Python objects'):
    sources.load_split(config.data, 'train')


def test_missing_fid_weights_name_the_config_key(tmp_path):
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  with pytest.raises(inception.WeightsError,
                     match=r'config\.sample_quality\.weights_path'):
    inception._read_state_dict(str(tmp_path / 'missing.pth'))  # pylint: disable=protected-access
