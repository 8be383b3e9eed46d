r"""Every objective and sampler on a 2-D toy distribution, in minutes on a CPU.

  .venv/bin/python benchmarks/toy2d.py [--steps=3000] [--num_samples=2000]

Data: a ring of 8 Gaussians (radius 0.7, std 0.05). For each objective the
trainer's own train step (DiffusionMethod.train_step) trains a residual MLP
(models/mlp.py), then each listed sampler draws `num_samples` points from the
EMA params. Printed per row: sliced Wasserstein-1 and RBF-MMD^2 against
held-out data, next to the same figures for a second held-out draw of the
data ("data vs data": the floor set by sampling error), and the sampling
time. tests/test_objectives.py (slow) asserts on the same numbers.
`--smoke` (tests/test_benchmarks.py): every objective with its first sampler,
2 training steps, sampling cut to 2 steps, 64 samples.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from benchmarks import common
from configs import default
from diffusion_jax import experiment, methods, parallel
from diffusion_jax.metrics import distances
from diffusion_jax.models.mlp import MLP

flags.DEFINE_integer('steps', 3000, 'Training steps per objective.')
flags.DEFINE_integer('num_samples', 2000, 'Samples per sampler.')
flags.DEFINE_string('only', '', 'Comma-separated objective names to run.')
common.define_smoke_flags()
FLAGS = flags.FLAGS
SMOKE_SAMPLER_STEPS = 2

# name -> (config overrides, [(sampler, num_steps), ...])
OBJECTIVES = {
    'ddpm_eps': ({}, [('ddpm', 1000), ('ddpm', 100), ('ddim', 50)]),
    'ddpm_x0': ({'diffusion.prediction': 'x0'}, [('ddim', 50)]),
    'ddpm_v_cosine': ({'diffusion.prediction': 'v',
                       'diffusion.beta_schedule': 'cosine'},
                      [('ddim', 50), ('ddpm', 100)]),
    'iddpm_hybrid': ({'diffusion.loss': 'hybrid',
                      'diffusion.beta_schedule': 'cosine',
                      'diffusion.sampler_variance': 'learned'},
                     [('ddpm', 1000), ('ddpm', 100), ('ddpm', 25)]),
    'iddpm_vlb_importance': ({'diffusion.loss': 'vlb',
                              'diffusion.beta_schedule': 'cosine',
                              'diffusion.sampler_variance': 'learned',
                              'diffusion.time_sampling': 'importance'},
                             [('ddpm', 100)]),
    'vp_eps': ({'diffusion.process': 'vp'},
               [('heun', 50), ('euler_maruyama', 500), ('pc', 500)]),
    've_eps': ({'diffusion.process': 've', 'diffusion.ve_sigma_max': 2.0},
               [('heun', 100), ('euler_maruyama', 1000), ('pc', 500)]),
    'rf_velocity': ({'diffusion.process': 'rectified_flow',
                     'diffusion.prediction': 'velocity',
                     'diffusion.time_sampling': 'logit_normal'},
                    [('euler', 50), ('heun', 25)]),
}


def ring_data(n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  angles = 2 * np.pi * rng.integers(0, 8, n) / 8
  centers = 0.7 * np.stack([np.cos(angles), np.sin(angles)], 1)
  return (centers + 0.05 * rng.normal(size=(n, 2))).astype(np.float32)


def make_config(overrides: dict, steps: int):
  config = default.get_config()
  config.batch_size = 256
  config.num_train_steps = steps
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995
  config.diffusion.clip_denoised = True  # the data lie in [-1, 1]
  config.update_from_flattened_dict(overrides)
  return config


def make_method(config, network):
  """The diffusion method of config with the MLP on 2-D points."""
  return methods.DiffusionMethod.from_config(config, network=network,
                                             image_shape=(2,))


def train_objective(overrides: dict, sampler: str, steps: int, seed: int = 0):
  """Trains the MLP with the trainer's step; returns (config, method, EMA
  params, seconds)."""
  config = make_config(overrides, steps)
  config.sample.sampler = sampler
  learned = config.diffusion.sampler_variance == 'learned'
  method = make_method(config, MLP(out_channels=2 * (2 if learned else 1)))
  state = method.init(jax.random.key(seed))
  step = jax.jit(method.train_step)
  data = ring_data(steps * config.batch_size, seed=1 + seed)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, data[i * config.batch_size:
                                      (i + 1) * config.batch_size])
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'{overrides}: loss {loss}')
  return config, method, state.ema_params, time.perf_counter() - start


def draw(config, method, params, sampler: str, num_steps: int, num: int,
         seed: int = 0):
  config.sample.sampler = sampler
  config.sample.num_steps = num_steps
  mesh = parallel.create_mesh(jax.devices()[:1])
  fn = experiment.build(config, mesh, mode='sample',
                        method=make_method(config, method.network)
                        ).jit_sample_fn()
  z = jax.random.normal(jax.random.key(100 + seed), (num, 2))
  jax.block_until_ready(fn(params, z, jax.random.key(seed)))  # compile
  start = time.perf_counter()
  out = np.asarray(fn(params, z, jax.random.key(seed)))
  return out, time.perf_counter() - start


def scores(samples: np.ndarray, heldout: np.ndarray) -> dict:
  return dict(swd=distances.sliced_wasserstein(samples, heldout),
              mmd=distances.mmd_rbf(samples, heldout, bandwidth=0.1))


def run(names, steps: int, num: int, smoke: bool = False):
  """(floor, rows); a library function (tests/test_objectives.py calls it
  without parsed flags), so --smoke arrives as an argument."""
  heldout = ring_data(num, seed=1000)
  floor = scores(ring_data(num, seed=2000), heldout)
  rows = []
  for name in names:
    overrides, sampler_list = OBJECTIVES[name]
    config, method, params, train_s = train_objective(
        overrides, sampler_list[0][0], steps)
    if smoke:
      sampler_list = [(sampler_list[0][0], SMOKE_SAMPLER_STEPS)]
    for sampler, num_steps in sampler_list:
      samples, sample_s = draw(config, method, params, sampler, num_steps,
                               num)
      rows.append(dict(objective=name, sampler=sampler, num_steps=num_steps,
                       train_s=train_s, sample_s=sample_s,
                       **scores(samples, heldout)))
  return floor, rows


def main(_):
  common.apply_smoke(steps=2, num_samples=64)
  names = FLAGS.only.split(',') if FLAGS.only else list(OBJECTIVES)
  floor, rows = run(names, FLAGS.steps, FLAGS.num_samples, FLAGS.smoke)
  print(f'# jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'load {os.getloadavg()[0]:.1f}; {FLAGS.steps} steps at batch 256, '
        f'{FLAGS.num_samples} samples')
  print('| objective | sampler | steps | SWD | MMD^2 | sampling s |')
  print('|---|---|---|---|---|---|')
  print(f"| data vs data | - | - | {floor['swd']:.4f} | {floor['mmd']:.5f} | - |")
  for r in rows:
    print(f"| {r['objective']} | {r['sampler']} | {r['num_steps']} | "
          f"{r['swd']:.4f} | {r['mmd']:.5f} | {r['sample_s']:.2f} |")
  common.write_json(FLAGS.json_out, dict(objectives=names, floor=floor,
                                         rows=rows))


if __name__ == '__main__':
  app.run(main)
