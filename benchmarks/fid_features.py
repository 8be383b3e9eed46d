r"""Inception feature extraction speed, and FIDs with the random network.

  .venv/bin/python benchmarks/fid_features.py --num_timed=32 --num_fid=128

1. Times feature extraction of 32x32 RGB images at the real 299x299 input
   (after one compile) and extrapolates to 10k images when fewer are timed.
2. FIDs against the digits test split (300 images), with RANDOM Inception
   weights (none exist offline), so only the ordering means anything:
   digits train images (real data: should be lowest), EMA samples of the
   run in --workdir if it has a checkpoint (via compute_sample_quality), and
   uniform noise (should be highest). FIDs from so few images are strongly
   biased upwards; they are no published-comparable numbers.
`--smoke` (tests/test_benchmarks.py): Inception's smallest input, 16 images
per set, no checkpoint.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from benchmarks import common
from configs import default
from diffusion_jax import experiment, generate, parallel
from diffusion_jax.data import sources
from diffusion_jax.metrics import distances, feature_stats, inception
from diffusion_jax.metrics import networks
from diffusion_jax.metrics import sample_quality

flags.DEFINE_integer('num_timed', 32, 'Images timed for the 10k estimate.')
flags.DEFINE_integer('batch_size', 16, 'Inception batch (global).')
flags.DEFINE_integer('num_fid', 128, 'Images per FID set.')
flags.DEFINE_integer('num_ref', 0, 'Reference images (0: the whole test '
                     'split).')
flags.DEFINE_integer('resize_to', inception.INPUT_SIZE, 'Inception input.')
flags.DEFINE_string('workdir', 'workdir/digits', 'Run with a digits '
                    'checkpoint (configs/default.py) to sample from; '
                    'skipped if absent.')
common.define_smoke_flags()
FLAGS = flags.FLAGS


def _features(fn, variables, mesh, images_u8, batch):
  """uint8 NHWC -> FeatureStats, padded to whole batches."""
  stats = feature_stats.FeatureStats(max_kid_features=0)
  x = images_u8.astype(np.float32) / 127.5 - 1.0
  pad = -len(x) % batch
  x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)])
  sharding = parallel.batch_sharded(mesh)
  batches = ((jax.device_put(x[i:i + batch], sharding), None)
             for i in range(0, len(x), batch))
  return sample_quality.accumulate_features(stats, fn, variables, batches,
                                            num=len(images_u8))


def main(_):
  common.apply_smoke(num_timed=8, batch_size=8, num_fid=16, num_ref=16,
                     resize_to=inception.MIN_INPUT_SIZE, workdir='')
  mesh = parallel.create_mesh()
  params = inception.random_params(0)
  network = networks.inception_network(params, FLAGS.resize_to)
  variables = sample_quality.replicate(network, mesh)
  fn = sample_quality.make_feature_fn(mesh, network.features)
  b = FLAGS.batch_size
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32),
                     parallel.batch_sharded(mesh))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(variables, x))
  compile_s = time.perf_counter() - t0
  n_batches = max(1, FLAGS.num_timed // b)
  t0 = time.perf_counter()
  for _ in range(n_batches):
    jax.block_until_ready(fn(variables, x))
  per_image = (time.perf_counter() - t0) / (n_batches * b)
  print(f'Inception features at {FLAGS.resize_to}x{FLAGS.resize_to}, '
        f'{jax.device_count()} device(s), batch {b}: compile+first batch '
        f'{compile_s:.1f} s; {per_image * 1e3:.0f} ms/image over '
        f'{n_batches * b} timed images -> 10k images ~ '
        f'{per_image * 1e4 / 60:.1f} min (extrapolated, not run).')
  report = dict(compile_s=compile_s, timed_images=n_batches * b,
                per_image_s=per_image, fid={})

  config = default.get_config()
  n = FLAGS.num_fid
  test = sources.load_split(config.data, 'test').images
  test = test[:FLAGS.num_ref or len(test)]
  train_imgs = sources.load_split(config.data, 'train').images[:n]
  noise = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  ref = _features(fn, variables, mesh, test, b)
  print(f'RANDOM-network FID vs digits test ({ref.count} images), '
        f'{n} images each, {FLAGS.resize_to}px input:')
  for name, imgs in (('digits train images', train_imgs),
                     ('uniform noise', noise)):
    s = _features(fn, variables, mesh, imgs, b)
    fid = distances.frechet_distance(ref.mu, ref.sigma, s.mu, s.sigma)
    print(f'  {name:22s} FID {fid:10.4f}')
    report['fid'][name] = fid
  common.write_json(FLAGS.json_out, report)  # rewritten if samples follow
  if os.path.isdir(os.path.join(FLAGS.workdir, 'checkpoints')):
    config.sample.batch_size = 64
    t0 = time.perf_counter()
    try:
      exp = experiment.build(config, mesh, mode='sample')
      ema, step = generate.load_sample_params(exp, FLAGS.workdir)
    except Exception as e:  # pylint: disable=broad-except
      print(f'  (no samples: {FLAGS.workdir} does not restore with '
            f'configs/default.py: {e})')
      return
    out = sample_quality.compute_sample_quality(
        exp.sample_batch_fn(ema, config.sample.batch_size),  # sample mode's x_T
        data_config=config.data, mesh=mesh,
        batch_size=config.sample.batch_size, num_samples=n,
        network=network, seed=config.seed, kid_subsets=10, reference='eval',
        cache_dir=tempfile.mkdtemp(prefix='fid_stats_'))  # not the run's dir
    print(f'  {"EMA samples, step " + str(step):22s} FID {out["fid"]:10.4f} '
          f'IS {out["is_mean"]:.3f} KID {out["kid_mean"]:.4f} '
          f'(compute_sample_quality, {time.perf_counter() - t0:.0f} s incl. '
          f'1000-step sampling)')
    report['fid'][f'EMA samples, step {step}'] = out['fid']
    common.write_json(FLAGS.json_out, report)


if __name__ == '__main__':
  logging.set_verbosity(logging.ERROR)
  app.run(main)
