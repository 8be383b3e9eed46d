"""A real 2-process run (jax.distributed on localhost, CPU collectives)
against a 1-process run with the same global batch, devices and seed."""

import os
import pickle
import socket
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from diffusion_jax import checkpointing, experiment, parallel
from tests.compile_flags import FAST_COMPILE
from tests.test_cli import REPO, TINY
from tests.util import tiny_config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, devices_per_process, extra=()):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count='
             f'{devices_per_process} {FAST_COMPILE}')
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


# Slow: the in-process 8 -> 4 -> 2 -> 1 resume (tests/test_sharding.py) and
# the two-process run above stay in the default suite.
@pytest.mark.slow
def test_fsdp8_checkpoint_restores_on_two_processes_bit_exactly(tmp_path):
  """Issue 17: a run saved by 1 process on 8 devices with fsdp 8 restores on
  2 processes x 2 devices (data 2, fsdp 2): every shard each process holds
  is bit-equal to the saved array's slice, and the next train batch is the
  1-process run's (the data position is global)."""
  saved = _launch(tmp_path / 'run', 8, ['--config.mesh.fsdp=8'])
  out, _ = saved.communicate(timeout=600)
  assert saved.returncode == 0, out[-4000:]
  port = _free_port()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2 '
             + FAST_COMPILE)
  procs = [subprocess.Popen(
      [sys.executable, 'tests/multihost_restore.py', str(port), str(i),
       str(tmp_path / 'run'), str(tmp_path / f'p{i}.pkl')], cwd=REPO,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-4000:]
  want, data = _final_state(str(tmp_path / 'run'))
  assert data == {'step': 3}
  config = tiny_config(**{'diffusion.num_timesteps': 10})
  it = experiment.build(config, parallel.create_mesh(jax.devices()[:1])
                        ).train_iterator(start_step=3)
  want_batch = parallel.gather(next(it))
  it.close()
  leaves = [np.asarray(x) for x in jax.tree.leaves(want)]
  for i in range(2):
    with open(tmp_path / f'p{i}.pkl', 'rb') as f:
      got = pickle.load(f)
    assert got['data'] == {'step': 3}
    # conv_in's 16 output channels over fsdp 2: 8 per device.
    assert got['fsdp_shape'][-1] == 8
    assert len(got['shards']) == len(leaves)
    for leaf, shards in zip(leaves, got['shards']):
      for index, shard in shards:
        np.testing.assert_array_equal(
            shard, leaf[tuple(slice(a, b) for a, b in index)])
    np.testing.assert_array_equal(got['batch'], want_batch)
