"""Eval mode: likelihood (bits/dim), reconstruction and sample quality.

Loads the sample (EMA) params of the latest checkpoint, runs the method's
`log_likelihood` over every image of `config.data.eval_split` once (and,
for a method that reconstructs, e.g. an autoencoder, its `reconstruct`: MSE
and PSNR), scores samples with FD (FID) / IS / KID when
config.sample_quality.num_samples > 0, and writes
`eval/step_<step>/metrics.json` (and the method's figures).

Sharding: the eval batch is `config.eval.batch_size` images (global, split
over the 'data' axis of the mesh like every batch here). The jitted step
returns masked *sums* with a replicated output sharding, so XLA reduces
across devices (and processes); the host only adds a few numbers per batch,
in float64. The padded tail of the last batch has mask 0 and contributes
nothing. Noise is drawn for the global batch from (seed, batch index), so
the figures do not depend on the device count.
"""

import json
import math
import os
import time

from absl import logging
from clu import metric_writers
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from diffusion_jax import errors, parallel, visualization
from diffusion_jax.data.sources import DataError
from diffusion_jax.experiment import EVAL_STREAM, Experiment
from diffusion_jax.generate import load_sample_params
from diffusion_jax.metrics import sample_quality
from diffusion_jax.models import conv

# Images (and their reconstructions) in eval mode's reconstructions.png.
RECONSTRUCTIONS_SHOWN = 64


def make_eval_step(exp: Experiment):
  """(params, images, mask, rng) -> masked sums of the per-image arrays of
  method.log_likelihood, their count and the sum of squared totals."""

  def step(params, images, mask, rng):
    out = exp.method.log_likelihood(params, images, rng)
    weighted = lambda v: jnp.sum(mask.reshape((-1,) + (1,) * (v.ndim - 1)) * v,
                                 axis=0)
    sums = {k: weighted(v) for k, v in out.items()}
    sums['total_bpd_sq'] = weighted(jnp.square(out['total_bpd']))
    sums['num_images'] = jnp.sum(mask)
    return sums

  batch = parallel.batch_sharded(exp.mesh)
  return jax.jit(step, in_shardings=(parallel.replicated(exp.mesh), batch,
                                     batch, None),
                 out_shardings=parallel.replicated(exp.mesh),
                 compiler_options=conv.inference_compiler_options())


def has_likelihood(exp: Experiment) -> bool:
  """Whether the method defines log_likelihood (traced on shapes only)."""
  params = exp.method.sample_params(exp.abstract_state())
  images = jax.ShapeDtypeStruct((1, *exp.method.image_shape), jnp.float32)
  return jax.eval_shape(exp.method.log_likelihood, params, images,
                        jax.random.key(0)) is not None


def reconstructs(exp: Experiment) -> bool:
  """Whether the method defines reconstruct (traced on shapes only)."""
  params = exp.method.sample_params(exp.abstract_state())
  images = jax.ShapeDtypeStruct((1, *exp.method.image_shape), jnp.float32)
  return jax.eval_shape(exp.method.reconstruct, params, images,
                        jax.random.key(0)) is not None


def make_reconstruction_step(exp: Experiment):
  """(params, images, mask, rng) -> (reconstructions, {masked sum of the
  per-image MSE, count}). The MSE is on [0, 1] images, x01 = (x + 1) / 2
  (the 8-bit range 0..255 scaled by 1/255), i.e. a quarter of the MSE in
  [-1, 1]."""

  def step(params, images, mask, rng):
    rec = exp.method.reconstruct(params, images, rng)
    mse = 0.25 * jnp.mean(jnp.square(rec - images),
                          axis=tuple(range(1, images.ndim)))
    return rec, {'sse': jnp.sum(mask * mse), 'num_images': jnp.sum(mask)}

  batch = parallel.batch_sharded(exp.mesh)
  repl = parallel.replicated(exp.mesh)
  return jax.jit(step, in_shardings=(repl, batch, batch, None),
                 out_shardings=(batch, repl),
                 compiler_options=conv.inference_compiler_options())


def reconstruction(exp: Experiment, params, split: str,
                   num_shown: int = RECONSTRUCTIONS_SHOWN):
  """({'mse', 'psnr', 'num_images'}, figure): the data-set mean MSE of the
  reconstructions on [0, 1] and PSNR = 10 log10(1 / mse) in dB (peak 1:
  the 8-bit convention 10 log10(255^2 / MSE_8bit)); the figure shows the
  first num_shown images beside their reconstructions (uint8)."""
  step = make_reconstruction_step(exp)
  rng = exp.sample_rng(EVAL_STREAM)
  totals, shown = None, []
  for i, batch in enumerate(tqdm.tqdm(exp.eval_iterator(split),
                                      desc='reconstruct', unit='batch',
                                      disable=jax.process_index() > 0)):
    rec, sums = step(params, batch['images'], batch['mask'],
                     jax.random.fold_in(rng, i))
    if sum(len(x) for x, _ in shown) < num_shown:
      keep = parallel.gather(batch['mask']) > 0
      shown.append((parallel.gather(batch['images'])[keep],
                    parallel.gather(rec)[keep]))
    totals = _accumulate(totals, sums)
  if totals is None or totals['num_images'] == 0:
    raise DataError(f'split {split!r} yielded no images')
  n = float(totals['num_images'])
  mse = float(totals['sse']) / n
  originals, recs = (np.concatenate(x)[:num_shown] for x in zip(*shown))
  left, right = (visualization.make_grid(visualization.to_uint8(x))
                 for x in (originals, recs))
  gap = np.full((left.shape[0], max(left.shape[1] // 16, 2),
                 left.shape[2]), 255, np.uint8)
  psnr = 10.0 * math.log10(1.0 / mse) if mse > 0 else math.inf
  return ({'mse': mse, 'psnr': psnr,
           'num_images': int(round(n))},
          np.concatenate([left, gap, right], axis=1))


def likelihood(exp: Experiment, params, split: str) -> dict:
  """The data-set mean of every per-image array, the total's standard
  error and the method's summary of them."""
  eval_step = make_eval_step(exp)
  rng = exp.sample_rng(EVAL_STREAM)
  totals, pending = None, []
  batches = exp.eval_iterator(split)
  for i, batch in enumerate(tqdm.tqdm(batches, desc='eval', unit='batch',
                                      disable=jax.process_index() > 0)):
    pending.append(eval_step(params, batch['images'], batch['mask'],
                             jax.random.fold_in(rng, i)))
    if len(pending) > 1:  # keep one batch in flight while the host adds
      totals = _accumulate(totals, pending.pop(0))
  for sums in pending:
    totals = _accumulate(totals, sums)
  if totals is None or totals['num_images'] == 0:
    raise DataError(f'split {split!r} yielded no images')
  # float(): with a single batch the sums are 0-d arrays, which round()
  # refuses.
  n = float(totals.pop('num_images'))
  mean = {k: v / n for k, v in totals.items()}
  var = max(float(mean.pop('total_bpd_sq')) - float(mean['total_bpd']) ** 2,
            0.0)
  return {'total_bpd': float(mean['total_bpd']),
          'total_bpd_stderr': math.sqrt(var / max(n - 1, 1)),
          **exp.method.summarize_likelihood(mean),
          'num_images': int(round(n))}


def evaluate(exp: Experiment, workdir: str, step: int | None = None) -> dict:
  """Evaluates the latest (or `step`) checkpoint; returns the metrics dict
  that is written to `workdir/eval/step_<step>/metrics.json`."""
  start = time.perf_counter()
  q = exp.quality
  with_likelihood = (exp.config.eval.get('likelihood', True)
                     and has_likelihood(exp))
  with_reconstruction = reconstructs(exp)
  if not (with_likelihood or with_reconstruction) and not q.num_samples:
    raise errors.ConfigError(
        f'{exp.method.describe()} defines no likelihood to evaluate (or '
        'config.eval.likelihood=False): set config.sample_quality.'
        'num_samples > 0 to score its samples instead')
  params, step = load_sample_params(exp, workdir, step)
  split = exp.data.eval_split
  metrics = likelihood(exp, params, split) if with_likelihood else {}
  figure = None
  if with_reconstruction:
    reconstruction_metrics, figure = reconstruction(exp, params, split)
    metrics.update(reconstruction_metrics)
  if q.num_samples:
    cache_dir = q.cache_dir or os.path.join(workdir, 'fid_stats')
    metrics['sample_quality'] = sample_quality.compute_sample_quality(
        exp.sample_batch_fn(params, exp.eval_batch_size),
        data_config=exp.data, mesh=exp.mesh, batch_size=exp.eval_batch_size,
        num_samples=q.num_samples,
        network=sample_quality.load_network(q, exp.data, cache_dir,
                                            exp.seed),
        seed=exp.seed, reference=q.reference, floor_seeds=q.floor_seeds,
        cache_dir=cache_dir)
  metrics.update(split=split, step=int(step),
                 seconds=time.perf_counter() - start,
                 method=exp.method.describe(),
                 batch_size=exp.eval_batch_size,
                 num_devices=int(exp.mesh.devices.size))
  # epath: the workdir may be a gs:// bucket on a TPU pod.
  out_dir = epath.Path(workdir) / 'eval' / f'step_{step:08d}'
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'metrics.json').write_text(json.dumps(metrics, indent=1))
    if with_likelihood:
      exp.method.write_likelihood_figures(metrics, out_dir)
    exp.method.write_eval_figures(params, out_dir,
                                  exp.sample_rng(EVAL_STREAM))
    if figure is not None:  # originals | reconstructions
      visualization.save_png(str(out_dir / 'reconstructions.png'), figure,
                             min_size=512)
    _write_scalars(workdir, step, metrics)
  _log(metrics, out_dir)
  return metrics


def _write_scalars(workdir, step, metrics):
  writer = metric_writers.create_default_writer(
      str(epath.Path(workdir) / 'eval'))
  scalars = {f'eval/{k}': v for k, v in metrics.items()
             if (k.endswith('_bpd') or k in ('mse', 'psnr'))
             and isinstance(v, float)}
  if metrics.get('sample_quality'):
    # Which reference (train/test split or a stats file) is in the JSON.
    scalars.update({k.replace('sample_quality/', 'eval/'): v for k, v in
                    sample_quality.scalar_summaries(
                        metrics['sample_quality']).items()})
  writer.write_scalars(int(step), scalars)
  writer.close()


def _log(metrics, out_dir):
  if 'total_bpd' in metrics:
    logging.info(
        'Eval step %d, %s split (%d images): %.4f +- %.4f bits/dim (%.1f s). '
        'Wrote %s', metrics['step'], metrics['split'], metrics['num_images'],
        metrics['total_bpd'], metrics['total_bpd_stderr'], metrics['seconds'],
        out_dir)
  if 'psnr' in metrics:
    logging.info('Eval step %d, %s split (%d images): reconstruction MSE %.6f '
                 '(images in [0, 1]), PSNR %.2f dB. Wrote %s',
                 metrics['step'], metrics['split'], metrics['num_images'],
                 metrics['mse'], metrics['psnr'], out_dir)
  if 'sample_quality' in metrics:
    q = metrics['sample_quality']
    floor = (f'; real training images {q["floor_fd_mean"]:.3f} +- '
             f'{q["floor_fd_std"]:.3f} over {q["floor_seeds"]} draws'
             if 'floor_fd_mean' in q else '')
    logging.info('Sample quality of %d EMA samples (%d with NaN or inf '
                 'pixels) vs the %s statistics, %s '
                 'features: FD %.3f%s, IS %.3f +- %.3f, KID %s%s',
                 q['num_samples'], q.get('num_nonfinite_samples', 0),
                 q['fd_vs'], q['network'], q['fd'], floor,
                 q['is_mean'], q['is_std'], q['kid_mean'],
                 '' if q['comparable_to_published'] or q['network'] !=
                 'inception' else
                 ' (NOT comparable to published numbers: see the warning)')


def _accumulate(totals, sums):
  host = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.device_get(sums))
  return host if totals is None else jax.tree.map(np.add, totals, host)
