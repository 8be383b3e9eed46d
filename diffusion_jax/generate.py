"""Sample mode: EMA params of the latest checkpoint -> PNG grid and .npz."""

import math
import os

from absl import logging
import jax
import ml_collections
import numpy as np
from etils import epath
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
  x0_at = tuple(config.sample.progressive_timesteps)
  num, batch = config.sample.num_images, config.sample.batch_size
  out_dir = os.path.join(workdir, 'samples', f'step_{step:08d}')
  chunks = []
  for i in tqdm.trange(math.ceil(num / batch), desc='sample',
                       disable=jax.process_index() > 0):
    # Distinct, reproducible x_T and noise per batch, whatever the mesh.
    x_T = train.sample_noise(config, batch, 1000 + i, mesh)
    rng = jax.random.fold_in(jax.random.key(config.seed), 1000 + i)
    if i == 0 and x0_at:
      # The same x_T and rng as the plain sampler, so the progressive figure
      # shows how exactly these samples emerged.
      progressive_fn = train.make_sample_fn(config, model, schedule, mesh,
                                            x0_at=x0_at)
      images, preds = progressive_fn(params, x_T, rng)
      _write_progressive(out_dir, train.gather(images), np.stack(
          [train.gather(p) for p in preds]), x0_at, config)
    else:
      images = sample_fn(params, x_T, rng)
    chunks.append(visualization.to_uint8(train.gather(images)))
  images = np.concatenate(chunks)[:num]
  if jax.process_index() == 0:
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)  # Local or gs://.
    with (epath.Path(out_dir) / 'samples.npz').open('wb') as f:
      np.savez_compressed(f, images=images)
    visualization.save_png(os.path.join(out_dir, 'samples.png'),
                           visualization.make_grid(images[:256]))
    logging.info('Wrote %d samples from step %d EMA params to %s', num, step,
                 out_dir)
  return out_dir


def _write_progressive(out_dir, final, preds, x0_at, config):
  """One row per sample: x0_hat at each requested t, then the final x_0."""
  if jax.process_index() > 0:
    return
  rows = min(config.sample.progressive_num_images, final.shape[0])
  cols = np.concatenate([preds[:, :rows], final[None, :rows]])  # (K+1, R, ...)
  tiles = visualization.to_uint8(cols.transpose(1, 0, 2, 3, 4).reshape(
      -1, *final.shape[1:]))
  path = visualization.save_png(
      os.path.join(out_dir, 'progressive.png'),
      visualization.make_grid(tiles, ncols=len(x0_at) + 1))
  logging.info('Progressive generation (x0_hat at t=%s, then x_0): %s',
               [t + 1 for t in x0_at], path)
