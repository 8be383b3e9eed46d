r"""Sample quality against network calls (NFE), every sampler, one checkpoint.

  .venv/bin/python benchmarks/quality_vs_nfe.py [--config=default] \
      [--workdir=/tmp/quality_vs_nfe] [--num_samples=600] [--nfe=5,10,20,50]

Trains the config (configs/<--config>.py, as `./run.sh train` would) into
--workdir unless it already holds a checkpoint, then, from that one
checkpoint's EMA parameters and the same starting noise, draws --num_samples
images per (sampler, NFE) and scores them with the digits' own classifier
against the test split (FD, as the first run, issue 13), beside the floor of
as many real training digits (3 draws). NFE counts network calls per image
exactly (method.network_calls): EDM's Heun makes 2N - 1 calls for N noise
levels, so it is run at the largest N within each budget; classifier-free
guidance evaluates the network twice per call. A class-conditional
checkpoint is sampled at each --guidance_scales w (default: its config's),
and its rows also report the accuracy of the digits classifier on the
samples against the labels they were drawn for. The reference row
is the 1,000-step ancestral sampler. --run adds rows for other runs
(distilled and consistency students) sampled as their own configs say.
Writes quality_vs_nfe.png (FD against
NFE, one curve per sampler) and the table into --workdir, prints the table.
Sampling seconds are for --num_samples images on this machine, compilation
excluded; run nothing else meanwhile. `--smoke`: a tiny network, 2 training
steps, 16 samples, NFE 3.
"""

import ast
import dataclasses
import importlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging
import jax
import numpy as np

from benchmarks import common
from diffusion_jax import experiment, generate, parallel, run_config
from diffusion_jax import trainer
from diffusion_jax import visualization
from diffusion_jax.data import sources
from diffusion_jax.diffusion import guidance, sampling
from diffusion_jax.metrics import classifier
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string('config', 'default', 'A module of configs/.')
flags.DEFINE_string('workdir', '/tmp/quality_vs_nfe',
                    'The run to sample (trained here if it holds no '
                    'checkpoint) and where the table and plot are written.')
flags.DEFINE_integer('num_samples', 600, 'Images per (sampler, NFE).')
flags.DEFINE_list('nfe', ['5', '10', '20', '50'], 'Network-call budgets.')
flags.DEFINE_list('samplers', ['ddim', 'edm', 'dpm_solver_pp', 'unipc',
                               'ddpm', 'heun'],
                  'Samplers to run (those that do not apply to the '
                  "checkpoint's process are skipped).")
flags.DEFINE_multi_string(
    'run', [], 'A further run directory (a distilled or consistency '
    "student, another config), scored with its own config.json and sampler "
    "at its own NFE; 'DIR key=value ...' overrides its config first, e.g. "
    "--run='runs/ict consistency.sample_sigmas=(80.0,0.821)'. Repeatable.")
flags.DEFINE_list('guidance_scales', [],
                  'Class-conditional checkpoints: the guidance weights w of '
                  "the sampler rows (default: the config's "
                  'sample.guidance_scale).')
flags.DEFINE_integer('reference_steps', 1000,
                     'Steps of the ancestral reference row (0: none).')
common.define_smoke_flags()
FLAGS = flags.FLAGS


def num_steps_for(sampler: str, nfe: int) -> int:
  """The sampler's num_steps with at most `nfe` network calls."""
  if sampler == 'edm':
    return max((nfe + 1) // 2, 1)
  if sampler == 'heun':
    return max(nfe // 2, 1)
  return nfe


def load_config():
  config = importlib.import_module(f'configs.{FLAGS.config}').get_config()
  config.sample_quality.every_steps = 0  # scored here
  if FLAGS.smoke:
    common.smoke_model(config)
    config.num_train_steps = 2
    config.log_every_steps = config.checkpoint_every_steps = 2
    config.sample_grid.every_steps = 0
  return config


def trained_params(config, mesh, workdir: str):
  """The EMA parameters of workdir's newest checkpoint, training first if
  there is none."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
    start = time.perf_counter()
    trainer.train_and_evaluate(experiment.build(config, mesh), workdir)
    logging.info('trained in %.0f s', time.perf_counter() - start)
  return generate.load_sample_params(
      experiment.build(config, mesh, mode='sample'), workdir)


def draw(exp, params, num: int, settings=None):
  """(images uint8, seconds without compilation), with `settings` in
  place of the method's own; the same noise and rng for every row."""
  if settings is not None:  # the one thing that differs per row
    exp.method.sample_settings = settings
  fn = exp.jit_sample_fn()
  noise = exp.sample_noise(num, experiment.SAMPLE_STREAM)
  rng = exp.sample_rng(experiment.SAMPLE_STREAM)
  jax.block_until_ready(fn(params, noise, rng))  # compile
  start = time.perf_counter()
  images = parallel.gather(fn(params, noise, rng))
  return visualization.to_uint8(images), time.perf_counter() - start


def main(_):
  smoke_dir = os.path.join(tempfile.gettempdir(), 'quality_vs_nfe_smoke')
  # --run: the smoke run itself, scored through its own config.json (DDIM
  # 50), and again with an override.
  common.apply_smoke(num_samples=16, nfe=['3'], reference_steps=4,
                     workdir=smoke_dir,
                     run=[smoke_dir, f'{smoke_dir} sample.num_steps=4'])
  config = load_config()
  mesh = parallel.create_mesh()
  params, step = trained_params(config, mesh, FLAGS.workdir)
  exp = experiment.build(config, mesh, mode='sample')
  process, base = exp.method.process, exp.method.sample_settings
  score_fd, network = common.classifier_scorer(
      config.data, os.path.join(FLAGS.workdir, 'classifier'))

  def score(images, method=None, **kw):
    out = score_fd(images, **kw)
    if method is not None and getattr(method, 'num_classes', 0):
      labels = np.asarray(guidance.class_labels(
          len(images), method.num_classes, method.class_label))
      out['accuracy'] = classifier.accuracy(
          network.variables, network.num_classes, images, labels)
    return out

  real = sources.load_split(config.data, 'train').images
  floor = score_fd(real[:FLAGS.num_samples], floor_seeds=3)
  rows = []
  plan = [(s, int(n)) for s in FLAGS.samplers for n in FLAGS.nfe]
  if FLAGS.reference_steps:
    plan.append(('ddpm', FLAGS.reference_steps))
  scales = [float(w) for w in FLAGS.guidance_scales] or [
      exp.method.guidance_scale]
  if scales != [exp.method.guidance_scale] and not exp.method.num_classes:
    raise app.UsageError('--guidance_scales needs a class-conditional config')
  for (sampler, nfe), w in ((p, w) for p in plan for w in scales):
    if not sampling.SAMPLERS[sampler].applies(process):
      continue
    settings = dataclasses.replace(base, sampler=sampler,
                                   num_steps=num_steps_for(sampler, nfe))
    sampling.check(process, exp.method.prediction, settings)
    exp.method.guidance_scale = w
    exp.method.sample_settings = settings
    images, seconds = draw(exp, params, FLAGS.num_samples, settings)
    name = f'{sampler} w={w:g}' if exp.method.num_classes else sampler
    rows.append(dict(sampler=name, num_steps=settings.num_steps,
                     nfe=exp.method.network_calls(), sample_s=seconds,
                     **score(images, exp.method)))
    logging.info('%s', rows[-1])
  for spec in FLAGS.run:  # students: their own config and sampler
    run_dir, *overrides = spec.split()
    run_cfg = run_config.load(run_dir, '--run')
    for item in overrides:
      key, value = item.split('=', 1)
      run_cfg.update_from_flattened_dict({key: ast.literal_eval(value)})
    run_exp = experiment.build(run_cfg, mesh, mode='sample')
    run_params, _ = generate.load_sample_params(run_exp, run_dir)
    images, seconds = draw(run_exp, run_params, FLAGS.num_samples)
    rows.append(dict(sampler=' '.join([os.path.basename(
                         os.path.normpath(run_dir)), *overrides]),
                     method=run_exp.method.describe(), num_steps='-',
                     nfe=run_exp.method.network_calls(), sample_s=seconds,
                     **score(images, run_exp.method)))
    logging.info('%s', rows[-1])
  cpu = common.cpu_model()
  lines = [
      f'# {cpu}; jax {jax.__version__}; configs/{FLAGS.config}.py at step '
      f'{step}; {FLAGS.num_samples} samples per row vs the test split',
      '| sampler | num_steps | NFE | classifier FD | x floor | KID | IS | '
      f'class accuracy | sampling s ({FLAGS.num_samples}) |',
      '|---|---|---|---|---|---|---|---|---|',
      f"| real training digits | - | - | {floor['floor_fd_mean']:.2f} +- "
      f"{floor['floor_fd_std']:.2f} | 1.00 | {floor['floor_kid_mean']:.1f} | "
      '- | - | - |']
  for r in rows:
    accuracy = f"{r['accuracy']:.3f}" if 'accuracy' in r else '-'
    lines.append(
        f"| {r['sampler']} | {r['num_steps']} | {r['nfe']} | {r['fd']:.2f} | "
        f"{r['fd'] / floor['floor_fd_mean']:.2f} | {r['kid_mean']:.1f} | "
        f"{r['is_mean']:.2f} | {accuracy} | {r['sample_s']:.1f} |")
  table = '\n'.join(lines)
  print(table)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, 'quality_vs_nfe.md'), 'w') as f:
    f.write(table + '\n')
  series = {}
  for r in rows:
    xs, ys = series.setdefault(r['sampler'], ([], []))
    xs.append(r['nfe'])
    ys.append(r['fd'])
  plot = os.path.join(FLAGS.workdir, 'quality_vs_nfe.png')
  visualization.series_panel(
      series, f'classifier FD vs NFE (floor {floor["floor_fd_mean"]:.1f})',
      'network calls per image', 'FD', logx=True, logy=True).save(plot)
  common.write_json(FLAGS.json_out, dict(cpu=cpu, step=step, floor=floor,
                                         rows=rows, plot=plot,
                                         num_samples=FLAGS.num_samples))


if __name__ == '__main__':
  app.run(main)
