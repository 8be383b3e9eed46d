r"""GroupNorm (+ swish), forward and forward+backward: flax's vs ours.

  .venv/bin/python benchmarks/group_norm.py [--reps 9]

At the U-Net's activation shapes, batch 8 and 32, alternating the
candidates in each repetition; prints median milliseconds and the load.
`--smoke` (tests/test_benchmarks.py): one small shape, one repetition.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import numpy as np

from benchmarks import common
from diffusion_jax import host_malloc
from diffusion_jax.models.group_norm import GroupNorm
# pylint: enable=g-import-not-at-top,wrong-import-position

SHAPES = [(8, 32, 128), (8, 32, 384), (8, 16, 512),
          (32, 32, 128), (32, 32, 384), (32, 16, 512)]
SMOKE_SHAPES = [(2, 8, 64)]  # channels: a multiple of the 32 groups


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reps', type=int, default=9)
  args = common.parse_args(parser, reps=1)
  host_malloc.keep_large_buffers()
  report = {}
  for b, size, c in SMOKE_SHAPES if args.smoke else SHAPES:
    x = jax.random.normal(jax.random.key(0), (b, size, size, c)) * 2 + 1
    params = nn.GroupNorm(32).init(jax.random.key(1), x)
    cands = {}
    for name, module in (('flax', nn.GroupNorm(32)), ('ours', GroupNorm(32))):
      f = lambda x, m=module: nn.swish(m.apply(params, x))
      cands[f'{name} fwd'] = jax.jit(f)
      cands[f'{name} fwd+bwd'] = jax.jit(
          lambda x, f=f: jax.vjp(f, x)[1](x)[0])
    times = {n: [] for n in cands}
    for f in cands.values():
      jax.block_until_ready(f(x))
    for _ in range(args.reps):
      for n, f in cands.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times[n].append(time.perf_counter() - t0)
    medians = {n: float(np.median(t)) for n, t in times.items()}
    print(f'batch {b}, {size}x{size}x{c}, load {os.getloadavg()[0]:.2f}: ' +
          ', '.join(f'{n} {m * 1e3:.2f} ms' for n, m in medians.items()),
          flush=True)
    report[f'batch {b}, {size}x{size}x{c}'] = dict(times=times,
                                                    median_s=medians)
  common.write_json(args.json_out, report)


if __name__ == '__main__':
  main()
