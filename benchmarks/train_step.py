r"""Train-step and forward timing of a config's model on this machine.

  .venv/bin/python benchmarks/train_step.py --config=configs/cifar10_ddpm.py \
      --batch_size=8 --steps=5

Prints seconds per train step, images/s, forward time, XLA's FLOP count and
the process's peak RSS. Data are random (the input pipeline is benchmarked
separately in benchmarks/input_pipeline.py). `--smoke`: a tiny U-Net, batch
2, one step (tests/test_benchmarks.py).
"""

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from diffusion_jax import host_malloc, parallel

config_flags.DEFINE_config_file('config', 'configs/cifar10_ddpm.py', 'Config.')
flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
flags.DEFINE_integer('steps', 5, 'Timed steps (after one warm-up step).')
flags.DEFINE_bool('cpu_big_heap', True,
                  'As main.py: diffusion_jax/host_malloc.py on the CPU.')
common.define_smoke_flags()
FLAGS = flags.FLAGS


def timed(fn, n):
  fn()  # warm-up (compiled already)
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), float(np.min(times))


def main(_):
  common.apply_smoke(batch_size=2, steps=1)
  if FLAGS.cpu_big_heap and jax.default_backend() == 'cpu':
    host_malloc.keep_large_buffers()
  config = FLAGS.config
  if FLAGS.smoke:
    common.smoke_model(config)
  mesh = parallel.create_mesh()
  b = FLAGS.batch_size
  exp, state, images = common.experiment_state_and_images(config, b, mesh)
  model, step = exp.method.network, exp.jit_train_step()

  t0 = time.perf_counter()
  compiled = step.lower(state, images).compile()
  compile_s = time.perf_counter() - t0
  flops = compiled.cost_analysis().get('flops', float('nan'))

  holder = {'state': state}

  def run_step():
    holder['state'], metrics = compiled(holder['state'], images)
    return metrics['loss']

  step_med, step_min = timed(run_step, FLAGS.steps)

  fwd = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False))
  t = jnp.full((b,), 500, jnp.int32)
  fwd_c = fwd.lower(holder['state'].params, images, t).compile()
  fwd_flops = fwd_c.cost_analysis().get('flops', float('nan'))
  fwd_med, _ = timed(lambda: fwd_c(holder['state'].params, images, t),
                     FLAGS.steps)

  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; '
        f'model params: '
        f'{sum(x.size for x in jax.tree.leaves(holder["state"].params)):,}')
  print(f'batch {b}: compile {compile_s:.1f} s')
  print(f'train step: {step_med:.3f} s median ({step_min:.3f} min), '
        f'{b / step_med:.1f} images/s, '
        f'{flops / b / 1e9:.1f} GFLOP/image, {flops / step_med / 1e9:.0f} '
        'GFLOP/s')
  print(f'forward:    {fwd_med:.3f} s median, {b / fwd_med:.1f} images/s, '
        f'{fwd_flops / b / 1e9:.1f} GFLOP/image')
  print(f'peak RSS: {rss_gb:.2f} GB')
  common.write_json(FLAGS.json_out, dict(
      batch_size=b, compile_s=compile_s, step_median_s=step_med,
      step_min_s=step_min, step_images_per_s=b / step_med, step_flops=flops,
      forward_median_s=fwd_med, forward_images_per_s=b / fwd_med,
      forward_flops=fwd_flops, peak_rss_gb=rss_gb))


if __name__ == '__main__':
  app.run(main)
