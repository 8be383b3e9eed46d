"""The command line, run as a user runs it (a subprocess)."""

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.ch=16', '--config.model.ch_mult=(1,2)',
        '--config.model.num_res_blocks=1', '--config.model.num_groups=4',
        '--config.model.temb_dim=32', '--config.diffusion.num_timesteps=10',
        '--config.batch_size=16', '--config.num_train_steps=3',
        '--config.checkpoint_every_steps=2', '--config.log_every_steps=1',
        '--config.sample_grid.every_steps=3', '--config.sample_grid.num_images=8',
        '--config.sample.num_images=8', '--config.sample.batch_size=8',
        '--config.sample.num_steps=0', '--config.eval.batch_size=8',
        '--config.sample_quality.every_steps=0']


def run(*args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'diffusion_jax.main',
       '--config=configs/default.py', *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key_is_rejected_before_anything_runs(tmp_path):
  out = run(f'--workdir={tmp_path}', '--config.model.chanels=3')
  assert out.returncode != 0
  assert "config key 'model.chanels' does not exist" in out.stderr
  assert 'did you mean model.ch' in out.stderr
  assert not os.listdir(tmp_path)


def test_wrong_config_value_type_is_rejected(tmp_path):
  out = run(f'--workdir={tmp_path}', '--config.batch_size=big')
  assert out.returncode != 0 and 'batch_size' in out.stderr


def test_train_then_sample_from_the_command_line(tmp_path):
  workdir = str(tmp_path / 'run')
  out = run(f'--workdir={workdir}', *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'parameters' in out.stderr and 'Mesh' in out.stderr
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '3']
  assert os.path.exists(os.path.join(workdir, 'samples',
                                     'ema_step_00000003.png'))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert os.path.exists(os.path.join(workdir, 'config.json'))

  out = run(f'--workdir={workdir}', '--mode=sample', *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  images = np.load(os.path.join(workdir, 'samples', 'step_00000003',
                                'samples.npz'))['images']
  assert images.shape == (8, 8, 8, 1)


def test_a_renamed_config_key_names_its_new_name(tmp_path):
  out = run(f'--workdir={tmp_path}', '--config.fid.every_steps=100')
  assert out.returncode != 0
  assert ("config key 'fid.every_steps' is now 'sample_quality.every_steps'"
          in out.stderr)
  assert not os.listdir(tmp_path)
