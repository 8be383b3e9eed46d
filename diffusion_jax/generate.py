"""Sample mode: EMA params of the latest checkpoint -> PNG grid and .npz."""

import math
import os

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from diffusion_jax import checkpointing, parallel, visualization
from diffusion_jax import train
from diffusion_jax.train_state import create_optimizer


def load_ema_params(config, workdir: str, mesh, step: int | None = None):
  """Restores the checkpoint and returns (ema_params, step)."""
  model, _ = train.create_model_and_schedule(config)
  abstract = train.abstract_train_state(
      config, model, create_optimizer(config.optim), mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise checkpointing.CheckpointError(
        f'no checkpoint in {ckpt.directory}: train first (--mode=train) or '
        'point --workdir at a run directory')
  state, _ = ckpt.restore(abstract, step)
  ckpt.close()
  return state.ema_params, step


def generate(config: ml_collections.ConfigDict, workdir: str, mesh=None,
             step: int | None = None) -> str:
  """Writes samples/<step>/samples.png and samples.npz; returns the dir."""
  mesh = parallel.create_mesh() if mesh is None else mesh
  parallel.check_batch_size(config.sample.batch_size, mesh,
                            'config.sample.batch_size')
  params, step = load_ema_params(config, workdir, mesh, step)
  model, schedule = train.create_model_and_schedule(config)
  sample_fn = train.make_sample_fn(config, model, schedule, mesh)
  num, batch = config.sample.num_images, config.sample.batch_size
  chunks = []
  for i in tqdm.trange(math.ceil(num / batch), desc='sample',
                       disable=jax.process_index() > 0):
    # Distinct, reproducible x_T and noise per batch.
    x_T = train.sample_noise(config, batch, 1000 + i, mesh)
    rng = jax.random.fold_in(jax.random.key(config.seed), 1000 + i)
    chunks.append(visualization.to_uint8(train.gather(
        sample_fn(params, x_T, rng))))
  images = np.concatenate(chunks)[:num]
  out_dir = os.path.join(workdir, 'samples', f'step_{step:08d}')
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, 'samples.npz'), images=images)
    visualization.save_png(os.path.join(out_dir, 'samples.png'),
                           visualization.make_grid(images[:256]))
    logging.info('Wrote %d samples from step %d EMA params to %s', num, step,
                 out_dir)
  return out_dir
