"""Throughput of the train input pipeline (images/s), on a 1-device mesh.

Usage: .venv/bin/python benchmarks/input_pipeline.py [--batches 300]

Two cases: the digits default config, and a synthetic CIFAR-10 stand-in
(50,000 random 32x32x3 uint8 images in an .npz, random flips on). Each runs
with prefetch 0 (all work on the calling thread) and prefetch 2 (the default:
a background thread), after a warm-up, and blocks on every batch so the
device transfer is counted. `--smoke` (tests/test_benchmarks.py): a few
small batches from a small .npz.
"""

import argparse
import pathlib
import sys
import tempfile
import time

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
from configs import default
from diffusion_jax.data import pipeline as input_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position


def seconds(data_config, sharding, batch_size, num_batches):
  """Seconds for num_batches batches, after a warm-up."""
  it = input_pipeline.create_train_iterator(
      data_config, global_batch_size=batch_size, seed=0, sharding=sharding)
  for _ in range(10):  # Warm-up: open the source, start the thread.
    next(it).block_until_ready()
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it).block_until_ready()
  elapsed = time.perf_counter() - start
  it.close()
  return elapsed


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', type=int, default=300)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--synthetic_images', type=int, default=50_000)
  args = common.parse_args(parser, batches=2, batch_size=8,
                           synthetic_images=256)
  report = {}
  sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ('data',)),
                           P('data'))
  digits = default.get_config().data
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'synthetic_cifar.npz'
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(
        0, 256, (args.synthetic_images, 32, 32, 3), np.uint8))
    cifar = default.get_config().data
    cifar.update(source='npz', data_dir=str(path), image_size=32, channels=3,
                 random_flip=True)
    for name, config in (('digits 8x8x1', digits),
                         ('synthetic 32x32x3 + flips', cifar)):
      for prefetch in (0, 2):
        config.prefetch = prefetch
        s = seconds(config, sharding, args.batch_size, args.batches)
        rate = args.batches * args.batch_size / s
        print(f'{name:28s} batch {args.batch_size} prefetch {prefetch}: '
              f'{rate:9,.0f} images/s')
        report[f'{name}, prefetch {prefetch}'] = dict(
            images=args.batches * args.batch_size, seconds=s,
            images_per_s=rate)
  common.write_json(args.json_out, report)


if __name__ == '__main__':
  main()
