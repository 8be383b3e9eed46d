r"""What config.model.remat and bfloat16 parameters buy: temporaries, state
bytes and step time.

  .venv/bin/python benchmarks/remat_memory.py [--models=unet_cifar10,dit_b2]
      [--policies=none,dots_saveable,full] [--precisions=float32,bfloat16]
      [--batch_size=8] [--steps=3] [--smoke] [--json_out=F]

For each model, remat policy (models/remat.py) and precision (float32; or
bfloat16: config.optim.param_dtype and config.model.dtype 'bfloat16', the
parameters stored and computed in bfloat16 with a float32 master copy in
the optimizer state, train_state.with_float32_master), the trainer's own train
step (experiment.py) is compiled on one CPU device and run: printed are
XLA's memory analysis of the compiled step (temp bytes: the activations
kept for the backward pass plus scratch; argument bytes: the state and the
batch) and the median wall time of --steps steps after one untimed step.
"grad temp" is the temporaries of the loss gradient alone (no optimizer
update), where the activations remat drops live: the whole step's peak
can sit in the update instead (gradients plus Adam's new moments, a few
copies of the parameters), where no remat policy reaches.
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
flags.DEFINE_list('precisions', ['float32', 'bfloat16'],
                  'float32 and/or bfloat16 (parameters and compute).')
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


def gradient_temp(method, state, images) -> int:
  """XLA temp bytes of the loss gradient alone, on the same batch."""
  def grad(params, images):
    rng = jax.random.key(0)
    xs = method.draw(images, rng, state.loss_history)
    return jax.grad(lambda p: method.loss(p, xs, rng)[0])(params)
  compiled = jax.jit(grad).lower(state.params, images).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def measure(config, policy: str, precision: str, mesh) -> dict:
  config = config.copy_and_resolve_references()
  config.model.remat = policy
  if precision not in ('float32', 'bfloat16'):
    raise app.UsageError(f'--precisions: unknown {precision!r} (float32, '
                         'bfloat16)')
  config.optim.param_dtype = config.model.dtype = precision
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
          'grad_temp': gradient_temp(exp.method, state, images),
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
    for precision in FLAGS.precisions:
      for policy in FLAGS.policies:
        rows[(model, policy, precision)] = r = measure(config, policy,
                                                       precision, mesh)
        print(f'{model} {policy} {precision}: temp '
              f'{r["temp"] / 2**20:,.1f} MiB (grad alone '
              f'{r["grad_temp"] / 2**20:,.1f}), {r["seconds_per_step"]:.3f} '
              f's/step (load {common.load()})', flush=True)
  print(f'\n# {common.cpu_model()}; jax {jax.__version__}; batch '
        f'{FLAGS.batch_size}, median of {FLAGS.steps} steps, 1 CPU device\n')
  print('Ratios are against the same model with no remat in float32.\n')
  print('| model | params | precision | remat | XLA temp MiB | vs none | grad '
        'temp MiB | vs none | XLA argument MiB | vs none | s/step | vs none '
        '|\n| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: '
        '| ---: | ---: |')
  for (model, policy, precision), r in rows.items():
    base = rows.get((model, 'none', 'float32'), r)
    print(f'| {model} | {r["num_params"] / 1e6:.1f}M | {precision} | '
          f'{policy} | {r["temp"] / 2**20:,.1f} | '
          f'{r["temp"] / base["temp"]:.2f}x | {r["grad_temp"] / 2**20:,.1f} | '
          f'{r["grad_temp"] / base["grad_temp"]:.2f}x | '
          f'{r["argument"] / 2**20:,.1f} | '
          f'{r["argument"] / base["argument"]:.2f}x | '
          f'{r["seconds_per_step"]:.3f} | '
          f'{r["seconds_per_step"] / base["seconds_per_step"]:.2f}x |')
  common.write_json(FLAGS.json_out, {
      'models': list(FLAGS.models), 'policies': list(FLAGS.policies),
      'precisions': list(FLAGS.precisions),
      **{f'{m} {p} {q}': r for (m, p, q), r in rows.items()}})


if __name__ == '__main__':
  app.run(main)
