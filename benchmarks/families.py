r"""Every generative family at equal CPU training time (issue 16, item 5).

  .venv/bin/python benchmarks/families.py [--dataset=digits|fashion_mnist] \
      [--minutes_per_family=1.5] [--families=ddpm,iddpm,glow,vae,gan,pixelcnn]\
      [--num_samples=300] [--bpd_images=N] [--num_samples_for=pixelcnn=0] \
      [--workdir=/tmp/families_<dataset>]

The analogue of the DDPM paper's Tables 1 and 2. Each family trains its
digits config (configs/default.py for DDPM, digits_iddpm, digits_glow,
digits_vae, digits_gan, digits_pixelcnn; with --dataset=fashion_mnist the
same models on Fashion-MNIST, 28x28 as stored or --fashion_size=32 padded)
with the trainer for the same wall-clock budget: a timed run of its
compiled train step (after one untimed call) gives s/step, and
num_train_steps = budget / s/step (warm-ups capped at a quarter of the
run). A work directory holding a family's planned run is reused. Reported
per family: parameters (of the sampling network: the GAN's generator),
steps, training seconds (the trainer call: wall and process CPU), bits/dim
on the first --bpd_images test images (default: the digits' whole split,
16 Fashion-MNIST images, since DDPM's bound costs T = 1000 network passes
per image) by evaluate.likelihood: exact for PixelCNN++ and Glow (one
dequantisation draw), upper bounds for the VAE (importance weighted) and
DDPM (the variational bound), none for the GAN; FD (and over the floor of
as many real training images, 3 draws) and IS analogue of --num_samples
EMA samples against the test split in the features of the data set's own
classifier (metrics/classifier.py); samples/s of the compiled sampler (the
first batch untimed when more follow). Writes families.md (the table) and
families.png (each family's first 64 samples, 8x8, left to right in
--families order, labelled) into --workdir. `--smoke`: tiny networks, at
most 3 steps and 16 samples per family.
"""

import datetime
import importlib
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging
import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks import common
from diffusion_jax import evaluate, experiment, generate, parallel, trainer
from diffusion_jax import visualization
from diffusion_jax.data import pipeline, sources
# pylint: enable=g-import-not-at-top,wrong-import-position

# family -> (configs/ module, row label, what its bits/dim are)
FAMILIES = {
    'ddpm': ('default', 'DDPM (eps, L_simple, linear)', 'bound (VLB)'),
    'iddpm': ('digits_iddpm', 'improved DDPM (cosine, L_hybrid, learned '
              'var.)', 'bound (VLB)'),
    'glow': ('digits_glow', 'Glow', 'exact'),
    'vae': ('digits_vae', 'VAE (logistic decoder)', 'bound (IWAE)'),
    'gan': ('digits_gan', 'DC-GAN (spectral norm)', None),
    'pixelcnn': ('digits_pixelcnn', 'PixelCNN++', 'exact'),
}
FASHION = '/usr/share/datasets/fashion-mnist'
# CIFAR-10 test figures (model (paper), bits/dim, FID, IS): context only.
PAPERS = (
    ('PixelCNN (van den Oord et al. 2016a)', '3.14', '', ''),
    ('Gated PixelCNN (van den Oord et al. 2016b; DDPM Table 1)', '3.03',
     '65.93', '4.60'),
    ('PixelCNN++ (Salimans et al. 2017, Table 1)', '2.92', '', ''),
    ('Glow (Kingma & Dhariwal 2018, Table 2)', '3.35', '', ''),
    ('IAF-VAE (Kingma et al. 2016)', '<= 3.11', '', ''),
    ('SNGAN (DDPM Table 1)', '', '21.7', '8.22'),
    ('DDPM, L (Ho et al. 2020, Table 1)', '<= 3.70', '13.51', '7.67'),
    ('DDPM, L_simple (Ho et al. 2020, Table 1)', '<= 3.75', '3.17', '9.46'),
    ('improved DDPM, L_vlb (Nichol & Dhariwal 2021)', '<= 2.94', '11.47', ''),
)

flags.DEFINE_list('families', list(FAMILIES), 'Families, in table order.')
flags.DEFINE_enum('dataset', 'digits', ['digits', 'fashion_mnist'],
                  'The embedded 8x8 digits or Fashion-MNIST (IDX files in '
                  f'{FASHION}).')
flags.DEFINE_integer('fashion_size', 28, '28 (as stored) or 32 (padded).')
flags.register_validator('fashion_size', lambda v: v in (28, 32), '28 or 32')
flags.register_validator('families', lambda v: set(v) <= set(FAMILIES),
                         f'families of {", ".join(FAMILIES)}')
flags.DEFINE_float('minutes_per_family', 1.5,
                   'Training budget per family (wall-clock minutes).')
flags.DEFINE_integer('max_steps', 0, 'Cap on the steps per family (0: none).')
flags.DEFINE_integer('num_samples', 300, 'Samples per family for FD / IS.')
flags.DEFINE_list('num_samples_for', [],
                  'family=n overrides of --num_samples (PixelCNN++ draws '
                  'H x W pixels one after another).')
flags.DEFINE_integer('bpd_images', None, 'Test images for bits/dim (0: the '
                     'whole split; default: digits 0, fashion_mnist 16).')
flags.DEFINE_string('workdir', None,
                    'Runs, table and PNG (default /tmp/families_<dataset>; '
                    'finished runs are reused).')
common.define_smoke_flags()
FLAGS = flags.FLAGS

CALIBRATION_SECONDS = 10.0  # timed train steps per family (at least 2)


def load_config(family: str):
  module = importlib.import_module(f'configs.{FAMILIES[family][0]}')
  config = module.get_config()
  if FLAGS.dataset == 'fashion_mnist':
    size, data = FLAGS.fashion_size, config.data
    data.source, data.data_dir, data.image_size = 'idx', FASHION, size
    data.resize = 'pad' if size == 32 else ''
    if config.method == 'diffusion':  # attention at the lowest level, as 8x8
      config.model.attn_resolutions = (size // 2 ** (len(
          config.model.ch_mult) - 1),)
    elif config.method == 'vae':  # the same f and channels
      f = 2 ** (len(config.vae.widths) - 1)
      config.vae.latent_shape = (size // f, size // f,
                                 config.vae.latent_shape[-1])
  config.sample_quality.every_steps = 0  # scored here, after training
  config.sample_grid.every_steps = 0
  if FLAGS.smoke:
    if config.method == 'diffusion':
      common.smoke_model(config)
      config.diffusion.num_timesteps = 20  # the bound scans every t
      config.sample.num_steps = 2
    # No warm-up to shorten (set_steps): the trainer's step then is the
    # calibrated one, whose compilation the persistent cache holds.
    config.optim.warmup_steps, config.sample.batch_size = 0, 8
    config.glow.update(steps_per_level=2, hidden_channels=16)
    config.vae.update(widths=(8, 16), eval_importance_samples=2)
    config.gan.update(generator_widths=(16, 8), discriminator_widths=(8, 16))
    config.pixelcnn.update(nr_filters=8, nr_logistic_mix=2)
  return config


def set_steps(config, steps: int) -> None:
  config.num_train_steps = config.checkpoint_every_steps = steps
  config.log_every_steps = min(config.log_every_steps, steps)
  # A warm-up longer than the run would never reach the learning rate.
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 4)


def seconds_per_step(config, mesh) -> float:
  """The compiled train step's seconds on real batches, after one untimed
  call (its compilation lands in the persistent cache the trainer reads)."""
  exp = experiment.build(config, mesh)
  state, batches = exp.init_state(), exp.train_iterator()
  try:
    step = exp.jit_train_step()
    state, metrics = step(state, next(batches))
    jax.block_until_ready(metrics)
    n, start = 0, time.perf_counter()
    while n < 2 or (time.perf_counter() - start < CALIBRATION_SECONDS
                    and n < 50 and not FLAGS.smoke):
      state, metrics = step(state, next(batches))
      jax.block_until_ready(metrics)
      n += 1
    return (time.perf_counter() - start) / n
  finally:
    batches.close()


def train(family: str, config, mesh) -> dict:
  """Trains workdir/<family> for the budget (or reuses the run that did)."""
  run_dir = os.path.join(FLAGS.workdir, family)
  plan_path = os.path.join(run_dir, 'families_plan.json')
  budget = 60.0 * FLAGS.minutes_per_family
  plan = (json.loads(open(plan_path).read())
          if os.path.exists(plan_path) else None)
  checkpoints = os.path.join(run_dir, 'checkpoints')
  if plan and plan['budget_seconds'] == budget and os.path.isdir(
      os.path.join(checkpoints, str(plan['train_steps']))):
    logging.info('%s: reusing %s', family, run_dir)
    set_steps(config, plan['train_steps'])
    return plan
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise app.UsageError(f'{run_dir} holds a run of another budget: delete '
                         'it or pass another --workdir')
  per_step = seconds_per_step(config, mesh)
  steps = max(1, math.floor(budget / per_step))
  steps = min(steps, FLAGS.max_steps or steps)
  set_steps(config, steps)
  logging.info('%s: %.3f s/step -> %d steps in %.0f s', family, per_step,
               steps, budget)
  plan = dict(budget_seconds=budget, seconds_per_step=per_step,
              train_steps=steps, note='')
  wall, cpu = time.perf_counter(), time.process_time()
  try:
    trainer.train_and_evaluate(experiment.build(config, mesh), run_dir)
  except trainer.NonFiniteLossError as e:  # the GAN's diagnosis, a NaN
    plan['note'] = f'stopped early: {e}'.split('. ')[0]
    logging.warning('%s: %s; evaluating its last checkpoint', family, e)
  plan.update(train_seconds=time.perf_counter() - wall,
              train_cpu_seconds=time.process_time() - cpu)
  with open(plan_path, 'w') as f:
    json.dump(plan, f, indent=1)
  return plan


class _FirstImages:
  """An Experiment whose eval split is its first n images."""

  def __init__(self, exp, n: int):
    self._exp, self._n = exp, n

  def __getattr__(self, name):  # method, mesh, sample_rng, ...
    return getattr(self._exp, name)

  def eval_iterator(self, split):
    return pipeline.create_eval_iterator(
        self._exp.data, split, global_batch_size=self._exp.eval_batch_size,
        sharding=parallel.batch_sharded(self._exp.mesh),
        indices=np.arange(self._n))


def bits_per_dim(config, mesh, run_dir: str, num_images: int):
  """evaluate.likelihood on the first num_images test images, or None."""
  d = jax.device_count()
  # Little padding; two batches at least: evaluate.likelihood's count is a
  # 0-d array after one batch, which its int(round(n)) refuses.
  batch = math.ceil(num_images / max(2, math.ceil(num_images / 96)))
  config.eval.batch_size = math.ceil(batch / d) * d
  exp = experiment.build(config, mesh, mode='eval')
  if not evaluate.has_likelihood(exp):
    return None
  params, _ = generate.load_sample_params(exp, run_dir)
  return evaluate.likelihood(_FirstImages(exp, num_images), params,
                             exp.data.eval_split)


def draw(config, mesh, run_dir: str, num: int):
  """(num uint8 samples, samples/s, network params, network calls per
  sample). The sampler is compiled and the noise drawn (SAMPLE_STREAM + i,
  as sample mode) before timing; the first batch is not timed when others
  follow."""
  exp = experiment.build(config, mesh, mode='sample')
  params, _ = generate.load_sample_params(exp, run_dir)
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  calls = exp.method.network_calls()
  if not num:
    return None, None, count, calls
  d, k = jax.device_count(), math.ceil(num / exp.sample_batch_size)
  b = math.ceil(math.ceil(num / k) / d) * d  # k batches, little surplus
  streams = [experiment.SAMPLE_STREAM + i for i in range(k)]
  inputs = [(exp.sample_noise(b, s), exp.sample_rng(s)) for s in streams]
  jax.block_until_ready(inputs)
  sample = exp.jit_sample_fn().lower(params, *inputs[0]).compile()
  out, seconds = [], []
  for x in inputs:
    start = time.perf_counter()
    out.append(jax.block_until_ready(sample(params, *x)))
    seconds.append(time.perf_counter() - start)
  timed = seconds[1:] or seconds  # the first batch warms up, when not alone
  rate = b * len(timed) / sum(timed)
  images = np.concatenate([parallel.gather(x) for x in out])[:num]
  return visualization.to_uint8(images), rate, count, calls


def run_family(family: str, mesh, score, floor) -> tuple[dict, np.ndarray]:
  config = load_config(family)
  run_dir = os.path.join(FLAGS.workdir, family)
  module, label, kind = FAMILIES[family]
  row = dict(family=family, label=label, config=f'configs/{module}.py',
             bpd_kind=kind)
  try:
    experiment.build(config, mesh)  # the family's checks at this size
  except ValueError as e:
    logging.warning('%s cannot run here: %s', family, e)
    return dict(row, error=str(e)), None
  plan = train(family, config, mesh)
  row.update({k: plan[k] for k in ('train_steps', 'seconds_per_step',
                                    'train_seconds', 'train_cpu_seconds',
                                    'note')})
  n_test = len(sources.open_split(config.data, config.data.eval_split))
  bpd = bits_per_dim(config, mesh, run_dir,
                     min(FLAGS.bpd_images or n_test, n_test))
  row.update({k: bpd and bpd[key] for k, key in (
      ('bits_per_dim', 'total_bpd'), ('bpd_stderr', 'total_bpd_stderr'),
      ('bpd_images', 'num_images'))})
  overrides = dict(s.split('=') for s in FLAGS.num_samples_for)
  num = int(overrides.get(family, FLAGS.num_samples))
  images, rate, params, calls = draw(config, mesh, run_dir, num)
  row.update(params=params, network_calls=calls, num_samples=num,
             samples_per_sec=rate, fd=None, **{'is': None})
  if num:
    quality = score(images)
    row.update(fd=quality['fd'], **{'is': quality['is_mean']},
               kid=quality['kid_mean'], fd_over_floor=quality['fd'] /
               floor['floor_fd_mean'] if num == FLAGS.num_samples else None)
  logging.info('%s', row)
  return row, images


def save_panels(path: str, panels, size: int) -> str:
  """One 8x8 grid of the first 64 samples per (label, images), side by
  side in the given order, each under its label; blank where none."""
  grids = []
  for label, images in panels:
    grid = (visualization.make_grid(images[:64], ncols=8) if images is not None
            else np.full((8 * (size + 1) + 1,) * 2 + (1,), 255, np.uint8))
    grid = visualization.upscale(grid, 256)
    grids.append((label, Image.fromarray(grid[..., 0]).convert('RGB')))
  gap, top = 12, 18
  width = sum(g.width for _, g in grids) + gap * (len(grids) - 1)
  canvas = Image.new('RGB', (width, top + max(g.height for _, g in grids)),
                     'white')
  draw_, font, x = ImageDraw.Draw(canvas), ImageFont.load_default(), 0
  for label, grid in grids:
    canvas.paste(grid, (x, top))
    draw_.text((x + grid.width // 2, 3), label, fill='black', font=font,
               anchor='ma')
    x += grid.width + gap
  canvas.save(path)
  return path


def fmt(value, spec: str, none: str = '—') -> str:
  return none if value is None else format(value, spec)


def table(rows, data_row, num: int, size: int) -> str:
  lines = [
      f'# {common.cpu_model()}; jax {jax.__version__}; {FLAGS.dataset} '
      f'({size}x{size}); {FLAGS.minutes_per_family:g} min of training per '
      f'family; {datetime.date.today()}; load {common.load()}',
      f'# FD / IS: {num} EMA samples vs the test split in the data set\'s '
      'classifier features; floor = as many real training images (3 draws)',
      '| family | params | steps | train s (CPU s) | s/step | bits/dim '
      '(test) | FD (x floor) | IS | samples/s | calls/sample |',
      '|---|---|---|---|---|---|---|---|---|---|',
      f"| real training images ({num}) | | | | | | "
      f"{data_row['floor_fd_mean']:.2f} +- {data_row['floor_fd_std']:.2f} "
      f"(1.00x) | {data_row['is_mean']:.2f} | | |"]
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['label']} | cannot run: {r['error'][:120]} "
                   '| | | | | | | | |')
      continue
    bpd = ('—' if r['bits_per_dim'] is None else
           f"{r['bits_per_dim']:.3f} +- {r['bpd_stderr']:.3f} "
           f"{r['bpd_kind']}")
    fd = fmt(r['fd'], '.2f', 'not drawn') + (
        '' if r['fd'] is None else f" ({r['fd_over_floor']:.2f}x)"
        if r.get('fd_over_floor') else f" (n={r['num_samples']})")
    note = f" ({r['note']})" if r['note'] else ''
    lines.append(
        f"| {r['label']}{note} | {r['params']:,} | {r['train_steps']} | "
        f"{r['train_seconds']:.0f} ({r['train_cpu_seconds']:.0f}) | "
        f"{r['seconds_per_step']:.3f} | {bpd} | {fd} | {fmt(r['is'], '.2f')}"
        f" | {fmt(r['samples_per_sec'], '.1f')} | "
        f"{fmt(r['network_calls'], 'd')} |")
  n_bpd = {r.get('bpd_images') for r in rows} - {None}
  lines += ['', f'Bits/dim on the first {"/".join(map(str, n_bpd))} test '
            'images (+- standard error over images). For context, CIFAR-10 '
            '(32x32x3, Inception features; not comparable):', '',
            '| model | bits/dim (test) | FID | IS |', '|---|---|---|---|',
            *[f'| {" | ".join(p)} |' for p in PAPERS]]
  return '\n'.join(lines)


def main(_):
  common.apply_smoke(minutes_per_family=0.01, max_steps=3, num_samples=16,
                     bpd_images=8)
  if FLAGS.workdir is None:  # the smoke's under $TMPDIR (the test's)
    FLAGS.workdir = (os.path.join(tempfile.gettempdir(), 'families_smoke')
                     if FLAGS.smoke else f'/tmp/families_{FLAGS.dataset}')
  if FLAGS.bpd_images is None:  # DDPM's bound: T network passes per image
    FLAGS.bpd_images = 0 if FLAGS.dataset == 'digits' else 16
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # calibration -> trainer
    jax.config.update('jax_compilation_cache_dir',
                      os.path.join(FLAGS.workdir, 'xla_cache'))
  mesh = parallel.create_mesh()
  data = load_config('ddpm').data
  score, _ = common.classifier_scorer(
      data, os.path.join(FLAGS.workdir, 'classifier'))
  real = sources.load_split(data, data.train_split).images
  data_row = score(real[:FLAGS.num_samples], floor_seeds=3)
  rows, images = zip(*[run_family(f, mesh, score, data_row)
                        for f in FLAGS.families])
  png = save_panels(os.path.join(FLAGS.workdir, 'families.png'),
                    zip(FLAGS.families, images), data.image_size)
  for row in rows:
    row['png'] = png
  text = table(rows, data_row, FLAGS.num_samples, data.image_size) + (
      f'\n\nSamples (first 64 per family, left to right: '
      f'{", ".join(FLAGS.families)}): {png}')
  print(text)
  with open(os.path.join(FLAGS.workdir, 'families.md'), 'w') as f:
    f.write(text + '\n')
  common.write_json(FLAGS.json_out, dict(
      dataset=FLAGS.dataset, cpu=common.cpu_model(), jax=jax.__version__,
      minutes_per_family=FLAGS.minutes_per_family,
      num_samples=FLAGS.num_samples, floor=data_row, png=png, rows=rows))


if __name__ == '__main__':
  app.run(main)
