r"""Objective x sampler x steps on the embedded digits at a fixed CPU budget.

  .venv/bin/python benchmarks/objectives_digits.py [--steps=1500] \
      [--only=ddpm_eps,rectified_flow] [--workdir=/tmp/objectives_digits]

Each objective trains its digits config (configs/digits_*.py; the default
config for plain DDPM) for the same number of steps with the trainer
(train.train_and_evaluate), then every listed sampler draws 300 images from
the EMA params. Printed per row: the Frechet distance (FD) in the features
of the digits' own classifier (diffusion_jax/metrics/classifier.py), sliced
Wasserstein-1 distance and RBF-MMD^2 (median-heuristic bandwidth) in pixel
space, all to the 300-image test split, next to the same figures for 300
training images ("data vs data", the floor; FD over 3 draws), and the
sampling time of the 300 images. FID's Inception features mean little on
8x8 digits (and no Inception weights ship here). `--smoke` (tests/test_benchmarks.py): a tiny U-Net, 2
steps, samplers cut to 2 steps, ddpm_eps only unless --only says otherwise.
"""

import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from benchmarks import common
from diffusion_jax import checkpointing, experiment, parallel, trainer
from diffusion_jax import visualization
from diffusion_jax.data import sources
from diffusion_jax.metrics import distances

flags.DEFINE_integer('steps', 1500, 'Training steps per objective.')
flags.DEFINE_string('only', '', 'Comma-separated objective names.')
flags.DEFINE_string('workdir', '/tmp/objectives_digits',
                    'Where runs are written (reused: finished runs resume).')
common.define_smoke_flags()
FLAGS = flags.FLAGS

NUM = 300  # the size of the digits test split
SMOKE_SAMPLER_STEPS = 2

# name -> (config module, overrides, [(sampler, num_steps, extra), ...])
OBJECTIVES = {
    'ddpm_eps': ('default', {}, [('ddpm', 1000, {}), ('ddpm', 100, {}),
                                 ('ddim', 50, {}), ('ddim', 20, {})]),
    'ddpm_v_cosine': ('default', {'diffusion.prediction': 'v',
                                  'diffusion.beta_schedule': 'cosine'},
                      [('ddim', 50, {}), ('ddpm', 100, {})]),
    'iddpm_hybrid': ('digits_iddpm', {}, [('ddpm', 100, {}),
                                          ('ddpm', 25, {})]),
    'rectified_flow': ('digits_rectified_flow', {},
                       [('euler', 50, {}), ('euler', 10, {}),
                        ('heun', 25, {}), ('heun', 5, {})]),
    'vp_sde': ('digits_vp_sde', {}, [('pc', 250, {}),
                                      ('euler_maruyama', 250, {}),
                                      ('heun', 50, {})]),
    've_sde': ('digits_ve_sde', {}, [('pc', 250, {}),
                                      ('euler_maruyama', 500, {}),
                                      ('heun', 100, {})]),
    'cfg': ('digits_cfg', {}, [('ddim', 50, {'guidance_scale': 0.0}),
                               ('ddim', 50, {'guidance_scale': 1.0}),
                               ('ddim', 50, {'guidance_scale': 3.0})]),
}


def load_config(module: str, overrides: dict, steps: int):
  config = importlib.import_module(f'configs.{module}').get_config()
  config.num_train_steps = steps
  config.sample_grid.every_steps = steps
  config.checkpoint_every_steps = steps
  config.sample_quality.every_steps = 0  # scored here, after training
  config.update_from_flattened_dict(overrides)
  if FLAGS.smoke:
    common.smoke_model(config)
    config.sample.num_steps = SMOKE_SAMPLER_STEPS  # also the training grid's
  return config


def sample_images(config, params, mesh, seed: int = 0):
  exp = experiment.build(config, mesh, mode='sample')
  fn = exp.jit_sample_fn()
  x_T = exp.sample_noise(NUM, 5000 + seed)
  rng = jax.random.key(seed)
  jax.block_until_ready(fn(params, x_T, rng))  # compile
  start = time.perf_counter()
  images = parallel.gather(fn(params, x_T, rng))
  return images, time.perf_counter() - start


def to_pixels(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> the 8-bit grid the data live on, back in [-1, 1]."""
  return np.round((np.clip(images, -1, 1) + 1) * 127.5) / 127.5 - 1


def scores(samples, reference) -> dict:
  return dict(swd=distances.sliced_wasserstein(samples, reference),
              mmd=distances.mmd_rbf(samples, reference))


def data_floor(config) -> tuple[np.ndarray, dict]:
  test = sources.load_split(config.data, 'test').images
  train_images = sources.load_split(config.data, 'train').images
  pick = np.random.default_rng(0).choice(len(train_images), NUM, replace=False)
  as_float = lambda x: x.astype(np.float64) / 127.5 - 1
  return as_float(test), scores(as_float(train_images[pick]), as_float(test))


def run(names, steps: int, workdir: str, fd_score):
  mesh = parallel.create_mesh()
  rows = []
  for name in names:
    module, overrides, sampler_list = OBJECTIVES[name]
    config = load_config(module, overrides, steps)
    run_dir = os.path.join(workdir, name)
    start = time.perf_counter()
    state = trainer.train_and_evaluate(experiment.build(config, mesh),
                                       run_dir)
    train_s = time.perf_counter() - start
    for sampler, num_steps, extra in sampler_list:
      if FLAGS.smoke:
        num_steps = min(num_steps, SMOKE_SAMPLER_STEPS)
      config.sample.sampler, config.sample.num_steps = sampler, num_steps
      for key, value in extra.items():
        config.sample[key] = value
      images, sample_s = sample_images(config, state.ema_params, mesh)
      reference, _ = data_floor(config)
      rows.append(dict(objective=name, sampler=sampler, num_steps=num_steps,
                       extra=extra, train_s=train_s, sample_s=sample_s,
                       fd=fd_score(visualization.to_uint8(images))['fd'],
                       **scores(to_pixels(images), reference)))
      logging.info('%s', rows[-1])
  return rows


def main(_):
  common.apply_smoke(steps=2, only='ddpm_eps',
                     workdir='/tmp/objectives_digits_smoke')
  names = FLAGS.only.split(',') if FLAGS.only else list(OBJECTIVES)
  data = load_config('default', {}, FLAGS.steps).data
  fd_score, _ = common.classifier_scorer(
      data, os.path.join(FLAGS.workdir, 'classifier'))
  rows = run(names, FLAGS.steps, FLAGS.workdir, fd_score)
  _, floor = data_floor(load_config('default', {}, FLAGS.steps))
  fd_floor = fd_score(sources.load_split(data, 'train').images[:NUM],
                      floor_seeds=3)
  floor.update(fd=fd_floor['floor_fd_mean'], fd_std=fd_floor['floor_fd_std'])
  print(f'# jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform}'
        f' device(s), load {os.getloadavg()[0]:.1f}; {FLAGS.steps} training '
        f'steps per objective, {NUM} samples vs the {NUM}-image test split')
  print('| objective | sampler | steps | classifier FD | SWD | MMD^2 | '
        'sampling s (300 images) |')
  print('|---|---|---|---|---|---|---|')
  print(f"| data: 300 train images | - | - | {floor['fd']:.2f} +- "
        f"{floor['fd_std']:.2f} | {floor['swd']:.4f} | {floor['mmd']:.5f} | - |")
  for r in rows:
    extra = ''.join(f', {k}={v}' for k, v in r['extra'].items())
    print(f"| {r['objective']} | {r['sampler']}{extra} | {r['num_steps']} | "
          f"{r['fd']:.2f} | {r['swd']:.4f} | {r['mmd']:.5f} | "
          f"{r['sample_s']:.1f} |")
  print('# training seconds: ' + ', '.join(
      f"{name} {next(r['train_s'] for r in rows if r['objective'] == name):.0f}"
      for name in names))
  common.write_json(FLAGS.json_out, dict(objectives=names, floor=floor,
                                         rows=rows))


if __name__ == '__main__':
  app.run(main)
