r"""One convolution's forward and gradients: XLA vs per-tap vs PyTorch.

  .venv/bin/python benchmarks/conv_grad.py [--reps 9] [--shapes all]

For each shape (default: the paper U-Net's 3x3 conv at 32x32, 128 -> 128,
batch 8; --shapes all adds the other conv shapes of the U-Net) it times,
alternating the candidates in each repetition so they share the machine's
load:
  xla fwd / dx / dw   lax.conv_general_dilated and XLA's own gradients
  taps dw             diffusion_jax.models.conv.tap_weight_grad
  chunks dw           diffusion_jax.models.conv.chunked_weight_grad
  xla fwd+grads       y and both gradients in one jit (what a train step does)
  taps / chunks fwd+grads   the same through conv.conv2d (custom VJP)
  torch fwd+grads     torch.nn.functional.conv2d forward + backward (NCHW)
and prints medians with the load average. To time XLA's convolutions without
YNNPACK (BENCHMARKS.md, issue 7), run it with
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution.
`--smoke` (tests/test_benchmarks.py): two tiny shapes, one repetition.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax import lax
import numpy as np

from benchmarks import common
from diffusion_jax.models import conv
# pylint: enable=g-import-not-at-top,wrong-import-position

NHWC = ('NHWC', 'HWIO', 'NHWC')

# (batch, size, cin, cout, kernel, stride): the paper U-Net's convolutions.
MAIN = (8, 32, 128, 128, 3, 1)
ALL = [MAIN, (8, 32, 256, 128, 3, 1), (8, 16, 256, 256, 3, 1),
       (8, 8, 256, 256, 3, 1), (8, 4, 256, 256, 3, 1), (8, 32, 128, 128, 3, 2),
       (8, 32, 256, 128, 1, 1), (8, 32, 3, 128, 3, 1)]
SMOKE = [(2, 8, 16, 16, 3, 1), (2, 8, 16, 8, 3, 2)]  # --shapes smoke


def make_candidates(b, size, cin, cout, k, s):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (b, size, size, cin))
  w = jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)
  pads = tuple(lax.padtype_to_pads((size, size), (k, k), (s, s), 'SAME'))
  xla = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pads,
                                              dimension_numbers=NHWC)
  taps = lambda x, w: conv.conv2d(x, w, (s, s), pads, None, 'taps')
  chunks = lambda x, w: conv.conv2d(x, w, (s, s), pads, None, 'chunks')
  g = jax.random.normal(keys[2], jax.eval_shape(xla, x, w).shape)

  def fwd_and_grads(fn):
    def f(x, w, g):
      y, vjp = jax.vjp(fn, x, w)
      return (y, *vjp(g))
    return jax.jit(f)

  cands = {
      'xla fwd': (jax.jit(xla), (x, w)),
      'xla dx': (jax.jit(lambda x, w, g: jax.vjp(lambda x: xla(x, w), x)[1](g)),
                 (x, w, g)),
      'xla dw': (jax.jit(lambda x, w, g: jax.vjp(lambda w: xla(x, w), w)[1](g)),
                 (x, w, g)),
      'taps dw': (jax.jit(lambda x, g: conv.tap_weight_grad(
          x, g, (k, k), (s, s), pads)), (x, g)),
      'chunks dw': (jax.jit(lambda x, w, g: conv.chunked_weight_grad(
          x, w, g, (s, s), pads)), (x, w, g)),
      'xla fwd+grads': (fwd_and_grads(xla), (x, w, g)),
      'taps fwd+grads': (fwd_and_grads(taps), (x, w, g)),
      'chunks fwd+grads': (fwd_and_grads(chunks), (x, w, g)),
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tx.requires_grad_(True)
    tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
    tw.requires_grad_(True)
    tg = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    (pt, pb), (pl, pr) = pads
    def torch_step():
      xin = torch.nn.functional.pad(tx, (pl, pr, pt, pb))
      y = torch.nn.functional.conv2d(xin, tw, stride=s)
      y.backward(tg)
      tx.grad = tw.grad = None
      return None
    cands['torch fwd+grads'] = (torch_step, None)
  except ImportError:
    pass
  return cands


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reps', type=int, default=9)
  parser.add_argument('--shapes', choices=('main', 'all', 'smoke'),
                      default='main')
  parser.add_argument('--batch', type=int, default=8)
  args = common.parse_args(parser, reps=1, shapes='smoke', batch=2)
  report = {}
  for shape in dict(main=[MAIN], all=ALL, smoke=SMOKE)[args.shapes]:
    shape = (args.batch, *shape[1:])
    b, size, cin, cout, k, s = shape
    flop = 2 * b * (size // s) ** 2 * k * k * cin * cout
    cands = make_candidates(*shape)
    run = lambda fn, a: fn() if a is None else jax.block_until_ready(fn(*a))
    for fn, a in cands.values():
      run(fn, a)  # compile / warm up
    times = {name: [] for name in cands}
    for _ in range(args.reps):
      for name, (fn, a) in cands.items():
        t0 = time.perf_counter()
        run(fn, a)
        times[name].append(time.perf_counter() - t0)
    title = f'batch {b}, {size}x{size}, {cin}->{cout}, {k}x{k} stride {s}'
    print(f'{title}: {flop / 1e9:.2f} GFLOP per pass; '
          f'load {os.getloadavg()[0]:.2f}')
    rows = report[title] = dict(flop=flop, candidates={})
    for name, t in times.items():
      med = float(np.median(t))
      passes = 3 if 'grads' in name else 1
      rows['candidates'][name] = dict(times=t, median_s=med, passes=passes,
                                      gflop_per_s=passes * flop / med / 1e9)
      print(f'  {name:16s} {med * 1e3:7.1f} ms  '
            f'{passes * flop / med / 1e9:5.0f} GFLOP/s')
  common.write_json(args.json_out, report)


if __name__ == '__main__':
  main()
