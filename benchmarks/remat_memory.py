r"""What config.model.remat buys: temporaries and step time per policy.

  .venv/bin/python benchmarks/remat_memory.py [--models=unet_cifar10,dit_b2]
      [--policies=none,dots_saveable,full] [--batch_size=8] [--steps=3]
      [--smoke] [--json_out=F]

For each model and remat policy (models/remat.py), the trainer's own train
step (experiment.py) is compiled on one CPU device and run: printed are
XLA's memory analysis of the compiled step (temp bytes: the activations
kept for the backward pass plus scratch; argument bytes: the state and the
batch) and the median wall time of --steps steps after one untimed step.
Models: unet_cifar10, the DDPM paper's 35.7M CIFAR-10 U-Net
(configs/cifar10_ddpm.py); dit_b2, DiT-B/2 on 32x32x4 latents (the
ImageNet-256 DiT config's network, without the VAE). Time it on a quiet
machine: the policies run one after another. `--smoke`: the smoke U-Net
and a 2-block DiT at 8x8, one step.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
import numpy as np

from benchmarks import common
from configs import cifar10_ddpm, default
from diffusion_jax import parallel
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list('models', ['unet_cifar10', 'dit_b2'],
                  'unet_cifar10 and/or dit_b2.')
flags.DEFINE_list('policies', ['none', 'dots_saveable', 'full'],
                  'config.model.remat values.')
flags.DEFINE_integer('batch_size', 8, 'Images per step.')
flags.DEFINE_integer('steps', 3, 'Timed steps per policy.')
common.define_smoke_flags()
FLAGS = flags.FLAGS


def model_config(name: str, smoke: bool):
  """The model's train config, data-free (random images stand in)."""
  if name == 'unet_cifar10':
    config = (common.smoke_model(default.get_config()) if smoke
              else cifar10_ddpm.get_config())
  elif name == 'dit_b2':
    config = common.dit_b2_config(smoke)
  else:
    raise app.UsageError(f'--models: unknown {name!r} (unet_cifar10, dit_b2)')
  config.sample_grid.every_steps = config.sample_quality.every_steps = 0
  config.posthoc_ema.sigma_rels = ()
  config.steps_per_call = config.grad_accum_steps = 1
  return config


def measure(config, policy: str, mesh) -> dict:
  config = config.copy_and_resolve_references()
  config.model.remat = policy
  exp, state, images = common.experiment_state_and_images(
      config, FLAGS.batch_size, mesh)
  step = exp.jit_train_step()
  start = time.perf_counter()
  compiled = step.lower(state, images).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  state, _ = compiled(state, images)  # untimed: warms the allocator
  jax.block_until_ready(state)
  times = []
  for _ in range(FLAGS.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, images)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return {'temp': int(memory.temp_size_in_bytes),
          'argument': int(memory.argument_size_in_bytes),
          'num_params': sum(int(np.prod(x.shape))
                            for x in jax.tree.leaves(state.params)),
          'compile_seconds': compile_s,
          'seconds_per_step': float(np.median(times)), 'times': times}


def main(argv):
  del argv
  common.apply_smoke(steps=1, batch_size=2)
  mesh = parallel.create_mesh(jax.devices()[:1])
  rows = {}
  for model in FLAGS.models:
    config = model_config(model, FLAGS.smoke)
    for policy in FLAGS.policies:
      rows[(model, policy)] = r = measure(config, policy, mesh)
      print(f'{model} {policy}: temp {r["temp"] / 2**20:,.1f} MiB, '
            f'{r["seconds_per_step"]:.3f} s/step (load {common.load()})',
            flush=True)
  print(f'\n# {common.cpu_model()}; jax {jax.__version__}; batch '
        f'{FLAGS.batch_size}, median of {FLAGS.steps} steps, 1 CPU device\n')
  print('| model | params | remat | XLA temp MiB | vs none | XLA argument MiB '
        '| s/step | vs none |\n| --- | ---: | --- | ---: | ---: | ---: | ---: '
        '| ---: |')
  for (model, policy), r in rows.items():
    base = rows.get((model, 'none'), r)
    print(f'| {model} | {r["num_params"] / 1e6:.1f}M | {policy} | '
          f'{r["temp"] / 2**20:,.1f} | {r["temp"] / base["temp"]:.2f}x | '
          f'{r["argument"] / 2**20:,.1f} | {r["seconds_per_step"]:.3f} | '
          f'{r["seconds_per_step"] / base["seconds_per_step"]:.2f}x |')
  common.write_json(FLAGS.json_out, {
      'models': list(FLAGS.models), 'policies': list(FLAGS.policies),
      **{f'{m} {p}': r for (m, p), r in rows.items()}})


if __name__ == '__main__':
  app.run(main)
