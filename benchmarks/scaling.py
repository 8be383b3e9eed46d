r"""Data-parallel scaling: 1 vs 8 devices, 1 vs 2 processes, same global batch.

  .venv/bin/python benchmarks/scaling.py [--config=configs/default.py]
      [--steps=20] [--skip_processes]

Part 1 (one process, 8 simulated CPU devices via XLA_FLAGS, set below before
jax is imported): the jitted train step on a 1-device mesh and on an
8-device mesh; steps/s, and the cross-device collectives in the compiled HLO
(`jitted.lower(...).compile().as_text()`): their number and bytes against
the parameter bytes. The target is one gradient all-reduce of parameter size
(XLA may split or fuse it into a few all-reduces) plus a few scalars, and no
all-gather/all-to-all of activations. Also the same for
config.grad_accum_steps=4, to show where the gradient all-reduce lands.

Part 2: the CLI on localhost as 1 process with 2 devices vs 2 processes with
1 device each (jax.distributed + gloo, as tests/test_multihost.py), steps/s
read from the runs' logs (median of the logged intervals after compilation).

On a shared 2-core CPU, 8 simulated devices cannot be faster than 1: the
point here is the communication pattern, not speed-up. `--smoke`: a tiny
U-Net and a few steps, in both parts (tests/test_benchmarks.py).
"""

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

USER_XLA_FLAGS = os.environ.get('XLA_FLAGS', '')  # for part 2's processes too
os.environ['XLA_FLAGS'] = (USER_XLA_FLAGS +
                           ' --xla_force_host_platform_device_count=8')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax import experiment, parallel  # pylint: disable=g-import-not-at-top, wrong-import-position

config_flags.DEFINE_config_file('config', os.path.join(REPO, 'configs',
                                                       'default.py'), 'Config.')
flags.DEFINE_integer('steps', 20, 'Timed steps per mesh (after warm-up).')
flags.DEFINE_integer('process_steps', 60, 'Steps of each CLI run in part 2.')
flags.DEFINE_bool('skip_processes', False, 'Skip part 2.')
common.define_smoke_flags()
FLAGS = flags.FLAGS

collectives = common.hlo_collectives


def bench_mesh(config, devices, steps):
  mesh = parallel.create_mesh(devices)
  exp = experiment.build(config, mesh)
  state = exp.init_state(jax.random.key(0))
  param_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(state.params))
  step = exp.jit_train_step()
  images = jax.device_put(
      np.random.default_rng(0).uniform(
          -1, 1, (config.batch_size, *exp.method.image_shape)).astype(
              np.float32), parallel.batch_sharded(mesh))
  compiled = step.lower(state, images).compile()
  ops = collectives(compiled.as_text())
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, images)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, images)
  jax.block_until_ready(metrics)
  return steps / (time.perf_counter() - t0), ops, param_bytes


def report_mesh(name, config, devices, steps):
  """Prints a mesh's figures; returns them."""
  rate, ops, param_bytes = bench_mesh(config, devices, steps)
  total = sum(b for _, b, _ in ops)
  kinds = sorted({op for op, _, _ in ops})
  big = [b for _, b, _ in ops if b >= 1024]
  where = sorted({c for _, _, c in ops})
  print(f'{name}: {rate:6.2f} steps/s | collectives: {len(ops)} '
        f'({", ".join(kinds) or "none"}), {total:,} bytes = '
        f'{total / param_bytes:.3f} x param bytes ({param_bytes:,}); '
        f'{len(big)} of >= 1 KiB ({sum(big):,} bytes); in computations: '
        f'{where}', flush=True)
  return dict(steps_per_s=rate, collectives=ops, param_bytes=param_bytes)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, devices_per_process, steps, log, extra=()):
  if FLAGS.smoke:
    extra = [f'--config.model.{k}={v}' for k, v in common.SMOKE_MODEL.items()
            ] + list(extra)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{USER_XLA_FLAGS} '
             f'--xla_force_host_platform_device_count={devices_per_process}')
  cmd = [sys.executable, '-m', 'diffusion_jax.main',
         '--config=configs/default.py', f'--workdir={workdir}',
         f'--config.num_train_steps={steps}',
         f'--config.log_every_steps={max(1, steps // 6)}',
         f'--config.checkpoint_every_steps={steps}',
         '--config.sample_grid.every_steps=0', *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)


def _steps_per_sec(path):
  rates = [float(x) for x in re.findall(r'\] \[\d+\] steps_per_sec=([\d.]+)',
                                        open(path).read())]
  return statistics.median(rates[1:]) if len(rates) > 1 else float('nan')


def processes(steps):
  tmp = tempfile.mkdtemp(prefix='scaling_')
  results = {}
  for name, n in (('1 process x 2 devices', 1), ('2 processes x 1 device', 2)):
    port, procs, logs = _free_port(), [], []
    for i in range(n):
      path = os.path.join(tmp, f'{n}_{i}.log')
      logs.append(path)
      extra = [] if n == 1 else [f'--coordinator_address=127.0.0.1:{port}',
                                 '--num_processes=2', f'--process_id={i}']
      with open(path, 'w') as log:
        procs.append(_launch(os.path.join(tmp, str(n)), 2 // n, steps, log,
                             extra))
    for p in procs:
      if p.wait(timeout=1800):
        sys.exit(f'{name} failed; see {logs}')
    results[name] = _steps_per_sec(logs[0])
    print(f'{name}: {results[name]:.2f} steps/s (median logged interval, '
          f'process 0; logs in {tmp})', flush=True)
  return results


def main(_):
  common.apply_smoke(steps=1, process_steps=4)
  config = FLAGS.config
  if FLAGS.smoke:
    common.smoke_model(config)
  print(f'JAX {jax.__version__}, {jax.device_count()} x '
        f'{jax.devices()[0].platform}; config batch {config.batch_size}, '
        f'model ch {config.model.ch} ch_mult {tuple(config.model.ch_mult)}; '
        f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores',
        flush=True)
  meshes = {}
  for name, devices in (('1-device mesh', jax.devices()[:1]),
                        ('8-device mesh', jax.devices())):
    meshes[name] = report_mesh(name, config, devices, FLAGS.steps)
  one, eight = (m['steps_per_s'] for m in meshes.values())
  print(f'8 vs 1 devices at global batch {config.batch_size}: '
        f'{eight / one:.2f}x steps/s', flush=True)
  accum = config.copy_and_resolve_references()
  with accum.unlocked():
    accum.grad_accum_steps = 4
  name = '8-device mesh, grad_accum_steps=4'
  meshes[name] = report_mesh(name, accum, jax.devices(), FLAGS.steps)
  report = dict(meshes=meshes, eight_vs_one=eight / one)
  if not FLAGS.skip_processes:
    report['processes'] = processes(FLAGS.process_steps)
  print(f'load average at the end: {os.getloadavg()[0]:.1f}')
  common.write_json(FLAGS.json_out, report)


if __name__ == '__main__':
  app.run(main)
