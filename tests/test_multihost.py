"""A real 2-process run (jax.distributed on localhost, CPU collectives)
against a 1-process run with the same global batch, devices and seed."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from diffusion_jax import checkpointing, experiment, parallel
from tests.test_cli import REPO, TINY
from tests.util import tiny_config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, devices_per_process, extra=()):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count='
             f'{devices_per_process}')
  cmd = [sys.executable, '-m', 'diffusion_jax.main',
         '--config=configs/default.py', f'--workdir={workdir}', *TINY,
         *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _final_state(workdir):
  config = tiny_config(**{'diffusion.num_timesteps': 10})
  mesh = parallel.create_mesh(jax.devices()[:1])
  abstract = experiment.build(config, mesh).abstract_state()
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state, data = ckpt.restore(abstract)
  ckpt.close()
  return jax.device_get(state), data


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  procs = [_launch(tmp_path / 'multi', 1, [
      f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
      f'--process_id={i}']) for i in range(2)]
  single = _launch(tmp_path / 'single', 2)
  for p in procs + [single]:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]
  multi_state, multi_data = _final_state(str(tmp_path / 'multi'))
  single_state, single_data = _final_state(str(tmp_path / 'single'))
  assert int(multi_state.step) == int(single_state.step) == 3
  assert multi_data == single_data == {'step': 3}
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)
  jax.tree.map(close, multi_state.params, single_state.params)
  jax.tree.map(close, multi_state.ema_params, single_state.ema_params)
  # Only process 0 writes logs; the sample grid (gathered over both
  # processes) is identical to the 1-process one.
  events = [f for f in os.listdir(tmp_path / 'multi') if 'tfevents' in f]
  assert len(events) == 1
  grid = lambda d: np.asarray(Image.open(
      tmp_path / d / 'samples' / 'ema_step_00000003.png'))
  np.testing.assert_array_equal(grid('multi'), grid('single'))
