"""Preemption and exact resume, through the command line as a cloud runs it.

SIGTERM (the preemption notice) must save and exit 0; SIGKILL at any moment,
including in the middle of an async save, must lose at most the steps since
the last checkpoint. In both cases re-running the same command has to end
with params bitwise equal to an uninterrupted run of the same length.

The runs share a persistent XLA compilation cache (same program, same
executable, so no effect on the numbers) to keep each restart cheap.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, experiment, parallel
from tests.compile_flags import FAST_COMPILE
from tests.test_cli import REPO
from tests.util import tiny_config

STEPS = 60
# A one-level U-Net without attention (as tests/test_scale.py): cheap restarts.
ARGS = ['--config.model.ch=8', '--config.model.ch_mult=(1,)',
        '--config.model.num_res_blocks=1', '--config.model.num_groups=4',
        '--config.model.attn_resolutions=()', '--config.model.temb_dim=16',
        '--config.diffusion.num_timesteps=10', '--config.sample.num_steps=0',
        '--config.batch_size=16', f'--config.num_train_steps={STEPS}',
        '--config.checkpoint_every_steps=20', '--config.log_every_steps=1',
        '--config.sample_grid.every_steps=0',
        '--config.sample_quality.every_steps=0']
_LOGGED_STEP = re.compile(r'logging_writer\.py:\d+\] \[(\d+)\] ')
TMP = 'orbax-checkpoint-tmp'


@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


def _start(workdir, log_path, xla_cache, extra=()):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
             XLA_FLAGS=FAST_COMPILE, JAX_COMPILATION_CACHE_DIR=xla_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  log = open(log_path, 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, '-m', 'diffusion_jax.main',
       '--config=configs/default.py', f'--workdir={workdir}', *ARGS, *extra],
      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  log.close()
  return proc


def _logged_step(log_path) -> int:
  with open(log_path) as f:
    steps = [int(s) for s in _LOGGED_STEP.findall(f.read())]
  return max(steps, default=0)


def _wait_for(proc, condition, timeout=240):
  """Polls until condition() or the process exits; True if condition held."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.005)
  raise TimeoutError('the training run neither progressed nor exited')


def _run_to_end(workdir, log_path, xla_cache):
  proc = _start(workdir, log_path, xla_cache)
  assert proc.wait(timeout=600) == 0, open(log_path).read()[-4000:]


def _ckpt_dir(workdir):
  return os.path.join(workdir, 'checkpoints')


def _final_state(workdir):
  config = tiny_config(**{'diffusion.num_timesteps': 10, 'model.ch': 8,
                          'model.ch_mult': (1,), 'model.attn_resolutions': (),
                          'model.temb_dim': 16})
  mesh = parallel.create_mesh(jax.devices()[:1])
  abstract = experiment.build(config, mesh).abstract_state()
  ckpt = checkpointing.Checkpointer(_ckpt_dir(workdir))
  state, data = ckpt.restore(abstract)
  ckpt.close()
  return jax.device_get(state), data


def _assert_bitwise_equal(a, b):
  assert int(a.step) == int(b.step) == STEPS
  for x, y in ((a.params, b.params), (a.ema_params, b.ema_params),
               (a.opt_state, b.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, x, y)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, xla_cache):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  _run_to_end(workdir, os.path.join(workdir, 'log.txt'), xla_cache)
  return _final_state(workdir)


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, xla_cache,
                                                         uninterrupted):
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log1.txt')
  proc = _start(workdir, log, xla_cache)
  assert _wait_for(proc, lambda: _logged_step(log) >= 3), open(log).read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(log).read()[-4000:]
  text = open(log).read()
  match = re.search(r'Preempted \(SIGTERM\) at step (\d+) of 60: saved '
                    r'checkpoint step \d+ in (\S+)\. Re-run the same command',
                    text)
  assert match, text[-3000:]
  step = int(match.group(1))
  assert 3 <= step < STEPS
  assert match.group(2) == _ckpt_dir(workdir)
  ckpt = checkpointing.Checkpointer(_ckpt_dir(workdir))
  assert ckpt.latest_step() == step
  ckpt.close()

  _run_to_end(workdir, str(tmp_path / 'log2.txt'), xla_cache)
  assert f'Resumed from {_ckpt_dir(workdir)} step {step}' in open(
      tmp_path / 'log2.txt').read()
  _assert_bitwise_equal(_final_state(workdir)[0], uninterrupted[0])


def _kill_and_resume(tmp_path, xla_cache, kill_points):
  """Runs, SIGKILLs at each kill point in turn, then runs to the end. A
  point ('term', p) sends SIGTERM instead of SIGKILL at p."""
  workdir = str(tmp_path / 'run')
  seen_tmp = False
  for i, point in enumerate(kill_points):
    term = isinstance(point, tuple)
    point = point[1] if term else point
    log = str(tmp_path / f'log{i}.txt')
    proc = _start(workdir, log, xla_cache)
    if point == 'during_save':
      def condition():
        d = _ckpt_dir(workdir)
        return os.path.isdir(d) and any(TMP in n for n in os.listdir(d))
    else:
      condition = lambda: _logged_step(log) >= point  # pylint: disable=cell-var-from-loop
    hit = _wait_for(proc, condition)
    if term:
      proc.send_signal(signal.SIGTERM)
      # A clean stop: saved (or nothing to save yet), exit 0.
      assert proc.wait(timeout=120) == 0, open(log).read()[-3000:]
    else:
      proc.kill()
      proc.wait(timeout=60)
    assert hit, f'run {i} ended before kill point {point!r}'
    if point == 'during_save':
      # Usually still there; the rename may just have won the race.
      seen_tmp |= any(TMP in n for n in os.listdir(_ckpt_dir(workdir)))
  _run_to_end(workdir, str(tmp_path / 'final.txt'), xla_cache)
  # A half-written step was never chosen, and the leftover was cleaned up.
  assert not any(TMP in n for n in os.listdir(_ckpt_dir(workdir)))
  return _final_state(workdir), seen_tmp


def test_sigkill_anywhere_then_rerun_is_bitwise_exact(tmp_path, xla_cache,
                                                      uninterrupted):
  (state, data), _ = _kill_and_resume(tmp_path, xla_cache,
                                      ['during_save', 30])
  assert data == {'step': STEPS}
  _assert_bitwise_equal(state, uninterrupted[0])


@pytest.mark.slow
def test_sigkill_at_many_points_is_bitwise_exact(tmp_path, xla_cache,
                                                 uninterrupted):
  (state, _), _ = _kill_and_resume(
      tmp_path, xla_cache, [0, 2, 'during_save', 21, 'during_save', 45, 59])
  _assert_bitwise_equal(state, uninterrupted[0])


@pytest.mark.slow
def test_random_sigkills_and_sigterms_are_bitwise_exact(tmp_path, xla_cache,
                                                        uninterrupted):
  """The fault campaign of issue 18 at small scale: SIGKILL or SIGTERM at
  random steps (and mid-save), then one uninterrupted rerun."""
  rng = np.random.default_rng(18)
  points = sorted(int(p) for p in rng.choice(np.arange(1, STEPS - 1), 6,
                                            replace=False))
  points = [('term', p) if rng.random() < 0.5 else p for p in points]
  points.insert(int(rng.integers(len(points))), 'during_save')
  (state, data), _ = _kill_and_resume(tmp_path, xla_cache, points)
  assert data == {'step': STEPS}
  _assert_bitwise_equal(state, uninterrupted[0])


def test_sigterm_during_start_up_exits_0_with_a_message(tmp_path, xla_cache):
  """Before the loop there is nothing to save: exit 0 and say so (it exited
  143 with no message)."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  proc = _start(workdir, log, xla_cache)
  # Logged right after JAX is imported, seconds before the first step.
  assert _wait_for(proc, lambda: 'process 0/1, devices' in open(log).read())
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(log).read()[-3000:]
  last = open(log).read().strip().splitlines()[-1]
  assert last.startswith('Stopped by SIGTERM outside the training loop'), last
  assert 'rerun the same command' in last
  assert _logged_step(log) == 0


@pytest.mark.slow  # a 4-step CLI run for one edge; SIGTERM's path is above
def test_sigterm_in_the_last_moments_exits_0(tmp_path, xla_cache):
  """After "Finished" (the report, shutdown) SIGTERM must not turn a done
  run into a failure (it exited 143)."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'log.txt')
  proc = _start(workdir, log, xla_cache, [
      '--config.num_train_steps=4', '--config.checkpoint_every_steps=2'])
  assert _wait_for(proc, lambda: 'Finished at step 4' in open(log).read())
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, open(log).read()[-3000:]
  ckpt = checkpointing.Checkpointer(_ckpt_dir(workdir))
  assert ckpt.latest_step() == 4
  ckpt.close()


def test_leftover_tmp_checkpoint_is_ignored_and_removed(tmp_path):
  """A kill mid-save leaves `<step>.orbax-checkpoint-tmp-*`: never resumed
  from, deleted when the next run opens the directory."""
  ckpt_dir = tmp_path / 'checkpoints'
  ckpt = checkpointing.Checkpointer(str(ckpt_dir))
  ckpt.save(2, {'w': np.arange(3, dtype=np.float32)}, {'step': 2})
  ckpt.wait_until_finished()
  ckpt.close()
  leftover = ckpt_dir / f'4.{TMP}-1795321397'
  (leftover / 'state').mkdir(parents=True)
  (leftover / 'state' / 'garbage').write_bytes(b'half a checkpoint')
  ckpt = checkpointing.Checkpointer(str(ckpt_dir))
  assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
  _, data = ckpt.restore({'w': jax.ShapeDtypeStruct((3,), np.float32)})
  assert data == {'step': 2}
  ckpt.close()
  assert not leftover.exists()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(
    tmp_path, xla_cache):
  """JAX's preemption sync point: only process 1 gets the notice, both save
  the same step and exit 0 (a checkpoint of half the hosts is useless)."""
  from tests.test_multihost import _free_port  # pylint: disable=g-import-not-at-top
  port, workdir = _free_port(), str(tmp_path / 'run')
  logs = [str(tmp_path / f'log{i}.txt') for i in range(2)]
  procs = []
  for i in range(2):
    proc = _start(workdir, logs[i], xla_cache, extra=[
        f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
        f'--process_id={i}'])
    procs.append(proc)
  assert _wait_for(procs[0], lambda: _logged_step(logs[0]) >= 3)
  procs[1].send_signal(signal.SIGTERM)
  for proc, log in zip(procs, logs):
    assert proc.wait(timeout=300) == 0, open(log).read()[-4000:]
  steps = [int(re.search(r'Preempted \(SIGTERM\) at step (\d+)',
                         open(log).read()).group(1)) for log in logs]
  assert steps[0] == steps[1] < STEPS
  ckpt = checkpointing.Checkpointer(_ckpt_dir(workdir))
  assert ckpt.latest_step() == steps[0]
  ckpt.close()
