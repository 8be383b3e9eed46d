"""Sample mode: the EMA params of a checkpoint -> PNG grid and .npz."""

import math
import os

from absl import logging
from etils import epath
import jax
import numpy as np
import tqdm

from diffusion_jax import checkpointing, parallel, visualization
from diffusion_jax.experiment import SAMPLE_STREAM, Experiment


def load_sample_params(exp: Experiment, workdir: str, step: int | None = None):
  """Restores the checkpoint; returns (the method's sample params, step).
  Reads only: a work directory without checkpoints is left as it was."""
  directory = epath.Path(workdir) / 'checkpoints'
  missing = checkpointing.CheckpointError(
      f'no checkpoint in {directory}: train first (--mode=train) or point '
      '--workdir at a run directory')
  if not directory.exists():  # Opening a Checkpointer would create it.
    raise missing
  ckpt = checkpointing.Checkpointer(os.fspath(directory))
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise missing
    state, _ = ckpt.restore(exp.abstract_state(), step)
  finally:
    ckpt.close()  # Orbax's background clean-up must never outlive an error.
  return exp.method.sample_params(state), step


def generate(exp: Experiment, workdir: str, step: int | None = None) -> str:
  """Writes samples/step_<step>/samples.png and samples.npz (uint8 `images`
  and `nonfinite`, which samples had NaN or inf pixels); returns the dir.

  Batch i starts from the noise of stream SAMPLE_STREAM + i, so a run's
  samples do not depend on the mesh, and sample quality sees these images.
  """
  params, step = load_sample_params(exp, workdir, step)
  sample_fn = exp.jit_sample_fn()
  x0_at = exp.progressive_timesteps
  num, batch = exp.sample_num_images, exp.sample_batch_size
  out_dir = os.path.join(workdir, 'samples', f'step_{step:08d}')
  chunks, nonfinite = [], []
  for i in tqdm.trange(math.ceil(num / batch), desc='sample',
                       disable=jax.process_index() > 0):
    noise = exp.sample_noise(batch, SAMPLE_STREAM + i)
    rng = exp.sample_rng(SAMPLE_STREAM + i)
    if i == 0 and x0_at:
      # The same noise and rng as the plain sampler, so the progressive
      # figure shows how exactly these samples emerged.
      images, preds = exp.jit_sample_fn(x0_at)(params, noise, rng)
      _write_progressive(exp, out_dir, parallel.gather(images), np.stack(
          [parallel.gather(p) for p in preds]))
    else:
      images = sample_fn(params, noise, rng)
    images = parallel.gather(images)
    nonfinite.append(visualization.nonfinite_samples(images))
    chunks.append(visualization.to_uint8(images))
  images = np.concatenate(chunks)[:num]
  nonfinite = np.concatenate(nonfinite)[:num]
  if jax.process_index() == 0:
    visualization.warn_nonfinite(int(nonfinite.sum()), num, 'sample mode')
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)  # Local or gs://.
    with (epath.Path(out_dir) / 'samples.npz').open('wb') as f:
      np.savez_compressed(f, images=images, nonfinite=nonfinite)
    visualization.save_png(os.path.join(out_dir, 'samples.png'),
                           visualization.make_grid(images[:256]))
    logging.info('Wrote %d samples from step %d EMA params to %s', num, step,
                 out_dir)
  return out_dir


def _write_progressive(exp: Experiment, out_dir, final, preds):
  """One row per sample: x0_hat at each requested t, then the final x_0
  (DDPM sec. 4.3)."""
  if jax.process_index() > 0:
    return
  x0_at = exp.progressive_timesteps
  rows = min(exp.progressive_num_images, final.shape[0])
  cols = np.concatenate([preds[:, :rows], final[None, :rows]])  # (K+1, R, ...)
  tiles = visualization.to_uint8(cols.transpose(1, 0, 2, 3, 4).reshape(
      -1, *final.shape[1:]))
  path = visualization.save_png(
      os.path.join(out_dir, 'progressive.png'),
      visualization.make_grid(tiles, ncols=len(x0_at) + 1))
  logging.info('Progressive generation (x0_hat at t=%s, then x_0): %s',
               [t + 1 for t in x0_at], path)
