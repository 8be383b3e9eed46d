r"""Per-device memory and collectives of the train step at fsdp 1, 2, 4, 8.

  .venv/bin/python benchmarks/sharding_memory.py [--models=unet256,dit_xl2]
      [--fsdp=1,2,4,8] [--batch_per_device=1] [--smoke] [--json_out=F]

On 8 simulated CPU devices (XLA_FLAGS, set below before jax is imported),
for each model and fsdp size, the trainer's train step (experiment.py, the
state sharded by sharding.py on a (8 / fsdp, fsdp) mesh) is lowered and
compiled on `jax.ShapeDtypeStruct` inputs, never run: nothing is allocated
but the compiler's own memory. Printed per device:
  - `compiled.memory_analysis()`: argument, output, temp and alias bytes
    (XLA's accounting of the compiled per-device program);
  - params / EMA / Adam bytes from the state's shardings (shard shapes);
  - the collectives in `compiled.as_text()`: all-gather, reduce-scatter,
    all-reduce and all-to-all counts and bytes of their results, every
    element of a combined (tuple) op counted (an FSDP step all-gathers
    each sharded weight and reduces its gradient onto the shards: XLA:CPU
    as one combined full-size all-reduce plus slices, where GPU/TPU
    compilers form reduce-scatters; fsdp 1 only all-reduces).
Models: unet256, DDPM's ~256M LSUN Bedroom U-Net (lsun_bedroom_large_ddpm.py,
256x256x3); dit_xl2, imagenet256_dit_xl2.py's DiT-XL/2 on its 32x32x4
latents without the VAE. Compiling them on CPU takes minutes each.
`--smoke`: the 8x8 smoke U-Net and a 2-block DiT (tests/test_benchmarks.py).
"""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default, imagenet256_dit_xl2, lsun_bedroom_large_ddpm  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax import experiment, methods, parallel, sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list('models', ['unet256', 'dit_xl2'], 'unet256 and/or dit_xl2.')
flags.DEFINE_list('fsdp', ['1', '2', '4', '8'], 'fsdp sizes (divide 8).')
flags.DEFINE_integer('batch_per_device', 1, 'Images per device.')
common.define_smoke_flags()
FLAGS = flags.FLAGS

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all')


def collectives(hlo: str) -> dict[str, list[int]]:
  """op -> [count, bytes of its results] over compiled HLO text."""
  out = {op: [0, 0] for op in COLLECTIVES}
  for op, size, _ in common.hlo_collectives(hlo):
    if op in out:
      out[op][0] += 1
      out[op][1] += size
  return out


def model_config(name: str, smoke: bool):
  """(config, image shape (H, W, C)) of a model, data-free."""
  if name == 'unet256':
    config = (common.smoke_model(default.get_config()) if smoke
              else lsun_bedroom_large_ddpm.get_config())
  elif name == 'dit_xl2':
    config = imagenet256_dit_xl2.get_config()
    config.latent.autoencoder = ''  # the network method alone, on latents
    config.data.source, config.data.data_dir = 'digits', ''
    config.data.image_size, config.data.channels = 32, 4
    if smoke:
      config.data.image_size = 8
      config.model.update(dit_variant='custom', dit_depth=2,
                          dit_hidden_size=32, dit_num_heads=4, num_classes=10)
  else:
    raise app.UsageError(f'--models: unknown {name!r} (unet256, dit_xl2)')
  config.sample_grid.every_steps = config.sample_quality.every_steps = 0
  config.posthoc_ema.sigma_rels = ()
  config.steps_per_call = config.grad_accum_steps = 1
  config.num_train_steps = config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  c = config.data
  return config, (c.image_size, c.image_size, c.channels)


def measure(config, image_shape, fsdp: int) -> dict:
  config = config.copy_and_resolve_references()
  config.batch_size = FLAGS.batch_per_device * jax.device_count()
  mesh = parallel.create_mesh(data=jax.device_count() // fsdp, fsdp=fsdp)
  exp = experiment.build(config, mesh, method=methods.create_method(config))
  state = exp.abstract_state()
  batch_sharding = parallel.batch_sharded(mesh)
  batch = jax.ShapeDtypeStruct((config.batch_size, *image_shape),
                               jnp.float32, sharding=batch_sharding)
  if exp.method.with_labels:
    batch = (batch, jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                         sharding=batch_sharding))
  compiled = exp.jit_train_step().lower(state, batch).compile()
  memory = compiled.memory_analysis()
  xla = {k: int(getattr(memory, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'temp', 'alias')}
  return {'mesh': dict(mesh.shape),
          'num_params': sum(int(np.prod(x.shape)) for x in
                            jax.tree.leaves(state.params)),
          'state': sharding.bytes_per_device(state, exp.state_sharding),
          'xla': xla, 'collectives': collectives(compiled.as_text())}


def table(rows: dict) -> str:
  mib = lambda b: f'{b / 2**20:,.1f}'
  lines = [
      '| model | fsdp | params | EMA | Adam | params+EMA+Adam | XLA argument '
      '| XLA output | XLA temp | all-gather | reduce-scatter | all-reduce '
      '| all-to-all |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- '
      '| --- | --- | --- |']
  for (model, fsdp), r in rows.items():
    s, x, c = r['state'], r['xla'], r['collectives']
    ops = [f'{c[op][0]} ({mib(c[op][1])})' for op in COLLECTIVES]
    lines.append(
        f'| {model} | {fsdp} | {mib(s["params"])} | {mib(s["ema"])} | '
        f'{mib(s["optimizer"])} | '
        f'{mib(s["params"] + s["ema"] + s["optimizer"])} | '
        f'{mib(x["argument"])} | {mib(x["output"])} | {mib(x["temp"])} | '
        + ' | '.join(ops) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  common.apply_smoke(fsdp=['1', '8'])
  sizes = [int(f) for f in FLAGS.fsdp]
  rows = {}
  for model in FLAGS.models:
    config, image_shape = model_config(model, FLAGS.smoke)
    for fsdp in sizes:
      rows[(model, fsdp)] = measure(config, image_shape, fsdp)
      print(f'{model} fsdp {fsdp}: {rows[(model, fsdp)]["num_params"]:,} '
            'parameters compiled', flush=True)
  print(f'Per device, MiB ({jax.device_count()} simulated CPU devices, '
        f'{FLAGS.batch_per_device} image(s) per device; collectives: count '
        '(MiB of results)):\n')
  print(table(rows))
  common.write_json(FLAGS.json_out, {f'{m} fsdp {f}': r
                                     for (m, f), r in rows.items()})


if __name__ == '__main__':
  app.run(main)
