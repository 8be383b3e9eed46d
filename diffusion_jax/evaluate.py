"""Eval mode: the variational bound (bits/dim) of the EMA model on a split.

Loads the EMA params of the latest checkpoint, runs `likelihood.vlb_terms`
over every image of `config.data.eval_split` once, and writes
`eval/step_<step>/metrics.json` and `eval/step_<step>/curve.png`.

Sharding: the eval batch is `config.sample.batch_size` images (global, split
over the 'data' axis of the mesh like every batch here; the config has no
separate eval batch size). The jitted step returns masked *sums* with a
replicated output sharding, so XLA reduces across devices (and processes);
the host only adds a few numbers per batch, in float64. The padded tail of
the last batch has mask 0 and contributes nothing. Noise is drawn for the
global batch from (seed, batch index, t), so the figures do not depend on the
device count.
"""

import json
import math
import time

from absl import logging
from clu import metric_writers
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tqdm

from diffusion_jax import generate
from diffusion_jax.data import pipeline as input_pipeline
from diffusion_jax.diffusion import likelihood
from diffusion_jax.diffusion import losses
from diffusion_jax import parallel
from diffusion_jax import train
from diffusion_jax.metrics import sample_quality as sample_metrics
from diffusion_jax.models import conv

# Keeps the eval noise apart from the training (fold 0/1) and sampling
# (1000 + i) streams of the same seed.
_EVAL_STREAM = 2


def make_eval_step(config, model, schedule, mesh):
  """(params, images, mask, rng) -> (masked sums, per-image total bpd)."""
  variance = config.diffusion.sampler_variance
  clip = config.diffusion.clip_denoised

  def step(params, images, mask, rng):
    # A class-conditional model is scored unconditionally (the null class).
    model_fn = losses.eps_model(train.network_fn(config, model, params),
                                schedule, config.diffusion.loss)
    out = likelihood.vlb_terms(model_fn, schedule, images, rng,
                               variance=variance, clip_denoised=clip)
    weighted = lambda v: jnp.sum(mask.reshape((-1,) + (1,) * (v.ndim - 1)) * v,
                                 axis=0)
    sums = {k: weighted(v) for k, v in out.items()}
    sums['total_bpd_sq'] = weighted(jnp.square(out['total_bpd']))
    sums['num_images'] = jnp.sum(mask)
    return sums

  batch = parallel.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(parallel.replicated(mesh), batch, batch,
                                     None),
                 out_shardings=parallel.replicated(mesh),
                 compiler_options=conv.inference_compiler_options())


def summarize(sums: dict, num_timesteps: int) -> dict:
  """Host-side float64 sums -> the metrics written to metrics.json."""
  n = sums['num_images']
  mean = {k: np.asarray(v) / n for k, v in sums.items() if k != 'num_images'}
  terms = mean['terms_bpd']
  var = max(mean['total_bpd_sq'] - mean['total_bpd'] ** 2, 0.0)
  # Rate after x_t is received (t = i + 1): L_T + sum_{j > i} L_j; the
  # distortion is the RMSE of x0_hat(x_t) on the 0..255 scale (DDPM sec. 4.3,
  # Fig. 5). The last entry of the rate misses only L_0.
  rate = float(mean['prior_bpd']) + np.concatenate(
      [np.cumsum(terms[::-1])[::-1][1:], [0.0]])
  return {
      'total_bpd': float(mean['total_bpd']),
      'total_bpd_stderr': float(math.sqrt(var / max(n - 1, 1))),
      'prior_bpd': float(mean['prior_bpd']),
      'decoder_bpd': float(terms[0]),
      'kl_terms_bpd': float(terms[1:].sum()),
      'terms_bpd': [float(v) for v in terms],
      'rate_bpd': [float(v) for v in rate],
      'distortion_rmse': [float(v) for v in
                          np.sqrt(mean['x0_mse']) * 127.5],
      'num_images': int(round(n)),
      'num_timesteps': num_timesteps,
  }


def evaluate(config: ml_collections.ConfigDict, workdir: str, mesh=None,
             step: int | None = None) -> dict:
  """Bits/dim of the latest (or `step`) checkpoint's EMA params; returns the
  metrics dict that is written to `workdir/eval/step_<step>/metrics.json`."""
  start = time.perf_counter()
  mesh = parallel.create_mesh() if mesh is None else mesh
  batch_size = config.sample.batch_size
  parallel.check_batch_size(batch_size, mesh, 'config.sample.batch_size')
  train.check_diffusion_config(config)
  if train.is_continuous(config):
    raise ValueError(
        'the bits/dim bound of --mode=eval is implemented for '
        "config.diffusion.process='ddpm'; for the continuous process "
        f'{config.diffusion.process!r} score samples during training '
        '(config.fid.every_steps) or compare --mode=sample outputs')
  params, step = generate.load_ema_params(config, workdir, mesh, step)
  model, schedule = train.create_model_and_schedule(config)
  eval_step = make_eval_step(config, model, schedule, mesh)
  split = config.data.eval_split
  batches = input_pipeline.create_eval_iterator(
      config.data, split, global_batch_size=batch_size,
      sharding=parallel.batch_sharded(mesh))
  rng = jax.random.fold_in(jax.random.key(config.seed), _EVAL_STREAM)
  totals = None
  pending = []
  for i, batch in enumerate(tqdm.tqdm(batches, desc='eval', unit='batch',
                                      disable=jax.process_index() > 0)):
    pending.append(eval_step(params, batch['images'], batch['mask'],
                             jax.random.fold_in(rng, i)))
    if len(pending) > 1:  # keep one batch in flight while the host adds
      totals = _accumulate(totals, pending.pop(0))
  for sums in pending:
    totals = _accumulate(totals, sums)
  if totals is None or totals['num_images'] == 0:
    raise input_pipeline.DataError(f'split {split!r} yielded no images')

  metrics = summarize(totals, schedule.num_timesteps)
  if config.fid.num_samples:
    metrics['sample_quality'] = sample_metrics.compute_sample_metrics(
        config, workdir, mesh, params, num_samples=config.fid.num_samples,
        inception_params=sample_metrics.load_inception(
            config.fid.weights_path),
        reference=config.fid.reference, resize_to=config.fid.resize_to,
        cache_dir=config.fid.cache_dir or None)
  metrics.update(
      split=split, step=int(step), seconds=time.perf_counter() - start,
      sampler_variance=config.diffusion.sampler_variance,
      clip_denoised=bool(config.diffusion.clip_denoised),
      batch_size=batch_size, num_devices=int(mesh.devices.size))
  # epath: the workdir may be a gs:// bucket on a TPU pod.
  out_dir = epath.Path(workdir) / 'eval' / f'step_{step:08d}'
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'metrics.json').write_text(json.dumps(metrics, indent=1))
    plot_curves(metrics, out_dir / 'curve.png')
    writer = metric_writers.create_default_writer(str(epath.Path(workdir) / 'eval'))
    scalars = {f'eval/{k}': metrics[k] for k in (
        'total_bpd', 'prior_bpd', 'kl_terms_bpd', 'decoder_bpd')}
    quality = metrics.get('sample_quality') or {}
    # Which reference (train/test split or a stats file) is in the JSON.
    scalars.update({f'eval/{k}': quality[k] for k in ('fid', 'is_mean',
                                                      'kid_mean')
                    if quality.get(k) is not None})
    writer.write_scalars(int(step), scalars)
    writer.close()
  logging.info(
      'Eval step %d, %s split (%d images): %.4f +- %.4f bits/dim = prior '
      '%.2e + sum L_1..L_%d %.4f + decoder L_0 %.4f (%.1f s). Wrote %s',
      step, split, metrics['num_images'], metrics['total_bpd'],
      metrics['total_bpd_stderr'], metrics['prior_bpd'],
      schedule.num_timesteps - 1, metrics['kl_terms_bpd'],
      metrics['decoder_bpd'], metrics['seconds'], out_dir)
  if 'sample_quality' in metrics:
    q = metrics['sample_quality']
    logging.info('Sample quality of %d EMA samples vs the %s statistics: '
                 'FID %.3f, IS %.3f +- %.3f, KID %s%s', q['num_samples'],
                 q['fid_vs'], q['fid'], q['is_mean'], q['is_std'],
                 q['kid_mean'], '' if q['comparable_to_published'] else
                 ' (NOT comparable to published numbers: see the warning)')
  return metrics


def _accumulate(totals, sums):
  host = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.device_get(sums))
  return host if totals is None else jax.tree.map(np.add, totals, host)


# -------------------------------------------------------------------- plot --
# Drawn with PIL (already a dependency) instead of adding matplotlib and its
# font/build dependencies for three line plots.

_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 420, 320, 64, 16, 30, 44


def _ticks(lo, hi, log):
  if log:  # lo, hi are log10 values; decades, or finer under two decades
    decades = [10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1)
               if lo <= e <= hi]
    return decades if len(decades) > 1 else [
        10.0 ** v for v in _ticks(lo, hi, False)]
  step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12))) / 10
  for mult in (1, 2, 5, 10):
    if (hi - lo) / (step * mult) <= 6:
      step *= mult
      break
  return list(np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step))


def _panel(xs, ys, title, xlabel, ylabel, logy=False):
  img = Image.new('RGB', (_W, _H), 'white')
  draw, font = ImageDraw.Draw(img), ImageFont.load_default()
  xs = np.asarray(xs, np.float64)
  ys = np.asarray(ys, np.float64)
  if logy:
    ys = np.log10(np.maximum(ys, 1e-12))
  ok = np.isfinite(xs) & np.isfinite(ys)
  xs, ys = xs[ok], ys[ok]
  x0, x1 = min(float(xs.min()), 0.0), float(xs.max())  # axes from 0
  y0, y1 = float(ys.min()), float(ys.max())
  y0 = y0 if logy else min(y0, 0.0)
  x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
  ax_l, ax_r, ax_t, ax_b = _PAD_L, _W - _PAD_R, _PAD_T, _H - _PAD_B
  px = lambda v: ax_l + (v - x0) / (x1 - x0) * (ax_r - ax_l)
  py = lambda v: ax_b - (v - y0) / (y1 - y0) * (ax_b - ax_t)
  draw.rectangle((ax_l, ax_t, ax_r, ax_b), outline='black')
  for v in _ticks(x0, x1, False):
    draw.line((px(v), ax_b, px(v), ax_b + 4), fill='black')
    draw.text((px(v), ax_b + 6), f'{v:g}', fill='black', font=font,
              anchor='ma')
  for v in _ticks(y0, y1, logy):
    pos = math.log10(v) if logy else v
    draw.line((ax_l - 4, py(pos), ax_l, py(pos)), fill='black')
    draw.line((ax_l, py(pos), ax_r, py(pos)), fill=(225, 225, 225))
    draw.text((ax_l - 6, py(pos)), f'{v:.3g}', fill='black', font=font,
              anchor='rm')
  draw.line([(px(a), py(b)) for a, b in zip(xs, ys)], fill=(31, 119, 180),
            width=2)
  draw.text((_W / 2, 8), title, fill='black', font=font, anchor='ma')
  draw.text(((ax_l + ax_r) / 2, _H - 14), xlabel, fill='black', font=font,
            anchor='ma')
  draw.text((4, ax_t - 14), ylabel, fill='black', font=font)
  return img


def plot_curves(metrics: dict, path: str) -> str:
  """Three panels: the per-term bound L_{t-1} vs t (log y), the cumulative
  rate after x_t is received, and distortion vs rate (DDPM sec. 4.3)."""
  terms, rate = metrics['terms_bpd'], metrics['rate_bpd']
  t = np.arange(1, len(terms) + 1)  # column i is L_{t-1} with t = i + 1
  panels = [
      _panel(t, terms, f'L_(t-1), bits/dim (total {metrics["total_bpd"]:.3f})',
             't', 'bits/dim (log)', logy=True),
      _panel(t, rate, 'rate after receiving x_t', 't', 'bits/dim'),
      _panel(rate, metrics['distortion_rmse'], 'distortion vs rate',
             'rate (bits/dim)', 'RMSE [0, 255]'),
  ]
  out = Image.new('RGB', (_W * len(panels), _H), 'white')
  for k, p in enumerate(panels):
    out.paste(p, (k * _W, 0))
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    out.save(f, format='PNG')
  return str(path)
