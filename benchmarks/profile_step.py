r"""Per-op time of our compiled train step (or forward), from a JAX trace.

  .venv/bin/python benchmarks/profile_step.py --batch_size=8 --steps=3 \
      [--config=configs/cifar10_ddpm.py] \
      [--weight_grad=auto] [--ynn_conv=off] [--forward] [--top=30]

Runs a few steps under jax.profiler, reads the trace back with
jax.profiler.ProfileData and sums the time of every XLA op (thunk) by name
and by what it does (convolution forward / input grad / weight grad, dots,
elementwise), read from the op_name metadata of the compiled HLO. Times are
summed over threads, and ops running concurrently (XLA's thunk executor
overlaps independent ones) each count their whole span: use it to rank ops,
not to add up to the wall time. The op names are those of
the optimised HLO, so `--dump_hlo=DIR` writes it for looking up what a
fusion contains. `--smoke`: a tiny U-Net, batch 2, one profiled step
(tests/test_benchmarks.py).
"""

import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp

from benchmarks import common
from diffusion_jax import host_malloc, parallel
from diffusion_jax.models import conv
# pylint: enable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', 'configs/cifar10_ddpm.py',
                                'Config whose model and step are profiled.')
flags.DEFINE_integer('batch_size', 8, 'Batch size.')
flags.DEFINE_integer('steps', 3, 'Profiled steps (after 2 warm-up steps).')
flags.DEFINE_string('weight_grad', 'auto', 'conv.WEIGHT_GRAD.')
flags.DEFINE_bool('forward', False, 'Profile the eval forward instead.')
flags.DEFINE_integer('top', 30, 'Ops to list.')
flags.DEFINE_string('dump_hlo', None, 'Write the optimised HLO text here.')
flags.DEFINE_enum('ynn_conv', 'on', ['on', 'off'],
                  'off: compile with conv.NO_YNN_CONV.')
flags.DEFINE_bool('cpu_big_heap', True,
                  'As main.py: diffusion_jax/host_malloc.py on the CPU.')
common.define_smoke_flags()
FLAGS = flags.FLAGS


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, op_name metadata) of the HLO."""
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) ', line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      ops[m.group(1)] = (m.group(2), op.group(1) if op else '')
  return ops


def category(name: str, ops) -> str:
  """What a thunk does, from its JAX op_name: conv forward / input grad /
  weight grad, dots, or the last JAX op of an elementwise fusion."""
  shape, op = ops.get(name, ('', ''))
  # A kernel-shaped result ([Cin, kh, kw, Cout] or [kh, kw, Cin, Cout]) is a
  # weight gradient, XLA's (no metadata) or conv.chunked_weight_grad's.
  kernel_shaped = re.match(
      r'\w+\[(\d+,[13],[13],\d+|[13],[13],\d+,\d+)\]', shape)
  if kernel_shaped and (not op or 'conv_general_dilated' in op):
    return 'conv weight grad'
  if 'conv_general_dilated' in op:
    return 'conv input grad' if 'transpose(' in op else 'conv forward'
  if 'dot_general' in op:
    return 'dot (taps / dense / attention)'
  if not op:
    return 'other: ' + name.split('.')[0]
  return 'other: ' + op.split('/')[-1]


def main(_):
  common.apply_smoke(batch_size=2, steps=1, top=5)
  if FLAGS.cpu_big_heap and jax.default_backend() == 'cpu':
    host_malloc.keep_large_buffers()
  config = FLAGS.config
  if FLAGS.smoke:
    common.smoke_model(config)
  conv.WEIGHT_GRAD = FLAGS.weight_grad
  mesh = parallel.create_mesh()
  b = FLAGS.batch_size
  exp, state, images = common.experiment_state_and_images(config, b, mesh)
  model = exp.method.network
  options = conv.NO_YNN_CONV if FLAGS.ynn_conv == 'off' else {}
  if FLAGS.forward:
    t = jnp.full((b,), 500, jnp.int32)
    fwd = jax.jit(lambda p, x: model.apply({'params': p}, x, t, train=False))
    compiled = fwd.lower(state.params, images).compile(
        compiler_options=options)
    run = lambda: compiled(state.params, images).block_until_ready()
  else:
    compiled = exp.jit_train_step().lower(state, images).compile(
        compiler_options=options)
    holder = {'state': state}

    def run():
      holder['state'], metrics = compiled(holder['state'], images)
      jax.block_until_ready(metrics)
  if FLAGS.dump_hlo:
    os.makedirs(FLAGS.dump_hlo, exist_ok=True)
    with open(os.path.join(FLAGS.dump_hlo, 'optimized.hlo.txt'), 'w') as f:
      f.write(compiled.as_text())
  run()
  run()
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp):
      for _ in range(FLAGS.steps):
        run()
    wall = (time.perf_counter() - t0) / FLAGS.steps
    path, = glob.glob(os.path.join(tmp, '**', '*.xplane.pb'), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  by_name = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        name = event.name
        # XLA:CPU thunks carry the HLO instruction name; skip Python/TraceMe
        # frames and the whole-program events.
        if (not name or name.startswith(('$', 'Thunk', 'PjRt', 'Execute')) or
            ' ' in name or '/' in name or name.startswith('jit_')):
          continue
        by_name[(plane.name, line.name, name)] += event.duration_ns / 1e9
  # Keep the line with the most op time (the thunk executor's).
  per_line = collections.Counter()
  for (plane, line, _), sec in by_name.items():
    per_line[(plane, line)] += sec
  print('lines:', ', '.join(f'{p}/{l}: {s / FLAGS.steps:.3f} s' for (p, l), s in
                            per_line.most_common(6)))
  ops = collections.Counter()
  for (plane, line, name), sec in by_name.items():
    if plane.startswith('/host:CPU') or 'CPU' in plane:
      ops[name] += sec / FLAGS.steps
  instrs = hlo_ops(compiled.as_text())
  kinds = collections.Counter()
  for name, sec in ops.items():
    kinds[category(name, instrs)] += sec
  total = sum(ops.values())
  print(f'wall {wall:.3f} s per call, op time {total:.3f} s, '
        f'load {os.getloadavg()[0]:.1f}')
  print('by kind:')
  for kind, sec in kinds.most_common(16):
    print(f'  {kind:32s} {sec:7.3f} s  {sec / total:5.1%}')
  print(f'top {FLAGS.top} ops:')
  for name, sec in ops.most_common(FLAGS.top):
    shape, op = instrs.get(name, ('', ''))
    print(f'  {name:28s} {sec * 1e3:8.1f} ms  {shape:24s} {op[-70:]}')
  common.write_json(FLAGS.json_out, dict(
      wall_s=wall, op_s=total, kinds=dict(kinds),
      top_ops=dict(ops.most_common(FLAGS.top))))


if __name__ == '__main__':
  app.run(main)
