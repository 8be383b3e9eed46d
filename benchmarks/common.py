"""Set-up, the timing loop and --smoke / --json_out, shared by the benchmark
scripts (tests/test_benchmarks.py runs each with --smoke)."""

import dataclasses
import json
import os
import re
import time

from absl import flags
import jax
import numpy as np

from diffusion_jax import host_malloc  # ctypes only: cheap to import

# A script's --smoke network (tests/test_benchmarks.py): one resolution
# level (plus the middle block's attention) compiles ~3x faster than
# tests/util.py's two-level tiny U-Net, and compiling dominates a smoke run.
SMOKE_MODEL = dict(ch=16, ch_mult=(1,), num_res_blocks=1, num_groups=4,
                   temb_dim=32)


def smoke_model(config):
  """config with the smoke network (in place; returned for chaining)."""
  config.model.update(SMOKE_MODEL)
  return config


def write_json(path, report: dict) -> None:
  """The figures a script printed (--json_out), for tests/test_benchmarks.py;
  nothing without a path. numpy scalars are written as floats."""
  if path:
    with open(path, 'w') as f:
      json.dump(report, f, indent=1, default=float)


def experiment_state_and_images(config, batch_size: int, mesh):
  """(experiment, fresh replicated train state, a random batch-sharded image
  batch in [-1, 1]) for timing a config's step: exp.jit_train_step() is the
  trainer's step, exp.method.network the model."""
  # Imported here so that the scripts without a model (conv_grad, group_norm,
  # input_pipeline) need none of the trainer to write their JSON.
  from diffusion_jax import experiment, parallel  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  exp = experiment.build(config, mesh)
  state = exp.init_state(jax.random.key(0))
  images = jax.device_put(
      jax.random.uniform(jax.random.key(1),
                         (batch_size, *exp.method.image_shape), minval=-1),
      parallel.batch_sharded(mesh))
  return exp, state, images


def classifier_scorer(data_config, cache_dir: str, batch_size: int = 100):
  """(score, network): score(images uint8 (N, H, W, C), floor_seeds=0) ->
  {fd, kid_mean, is_mean (, floor_fd_mean, floor_fd_std, floor_kid_mean)}
  against the eval split, in the features of the data set's own classifier
  (diffusion_jax/metrics/classifier.py), on one device."""
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import classifier, sample_quality  # pylint: disable=g-import-not-at-top
  network = classifier.load_or_train(data_config, cache_dir=cache_dir)
  mesh = parallel.create_mesh(jax.devices()[:1])

  def score(images: np.ndarray, floor_seeds: int = 0) -> dict:
    n = len(images)
    x = np.concatenate([images, np.zeros_like(images[:-n % batch_size])])
    x = x.astype(np.float32) / 127.5 - 1.0
    out = sample_quality.compute_sample_quality(
        lambda i: jax.device_put(x[i * batch_size:(i + 1) * batch_size]),
        data_config=data_config, mesh=mesh, batch_size=batch_size,
        num_samples=n, network=network, reference='eval',
        cache_dir=cache_dir, floor_seeds=floor_seeds, kid_subsets=50)
    return {k: out[k] for k in ('fd', 'kid_mean', 'is_mean', 'floor_fd_mean',
                                'floor_fd_std', 'floor_kid_mean') if k in out}

  return score, network


def define_smoke_flags() -> None:
  """--smoke and --json_out, for the absl scripts (see apply_smoke)."""
  flags.DEFINE_bool('smoke', False, 'Tiny sizes, to check that the script '
                    'runs (tests/test_benchmarks.py); the figures mean '
                    'nothing.')
  flags.DEFINE_string('json_out', None, 'Also write the figures as JSON here.')


def apply_smoke(**tiny) -> None:
  """With --smoke, gives the absl flags not set on the command line the tiny
  values `tiny` (flag name -> value)."""
  if flags.FLAGS.smoke:
    for name, value in tiny.items():
      if not flags.FLAGS[name].present:
        flags.FLAGS[name].value = value


def parse_args(parser, **tiny):
  """argparse's parse_args plus --smoke and --json_out: with --smoke, the
  options not given take the tiny values `tiny` (dest -> value)."""
  parser.add_argument('--smoke', action='store_true',
                      help='Tiny sizes, for tests/test_benchmarks.py.')
  parser.add_argument('--json_out', help='Also write the figures as JSON here.')
  args = parser.parse_args()
  if args.smoke:
    parser.set_defaults(**tiny)
    args = parser.parse_args()
  return args


@dataclasses.dataclass(frozen=True)
class SelfTimed:
  """A candidate's own time (with_malloc_variants): a type of its own, so
  that no other return value (vs_diffusers' diffusers step returns its loss,
  a float) is taken for a time."""
  seconds: float


def cpu_model() -> str:
  """The CPU's model name (lscpu's), printed beside every figure: kernels
  and ratios differ between machines."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown CPU'


def load() -> str:
  return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def alternate(cands: dict, reps: int, label: str):
  """Times each candidate once per repetition, in turn (the order reversed
  every other repetition, so no candidate always follows the same one);
  returns the lists of seconds. A candidate returning a SelfTimed has timed
  itself; any other return value is ignored."""
  times = {name: [] for name in cands}
  for r in range(reps):
    line = []
    order = list(cands.items())
    for name, fn in order if r % 2 == 0 else order[::-1]:
      t0 = time.perf_counter()
      own = fn()
      elapsed = time.perf_counter() - t0
      times[name].append(own.seconds if isinstance(own, SelfTimed)
                          else elapsed)
      line.append(f'{name} {times[name][-1]:.3f}')
    print(f'  [{label} rep {r}] ' + ', '.join(line) + f'  load {load()}',
          flush=True)
  return times


def with_malloc_variants(cands: dict) -> dict:
  """Each candidate with glibc's malloc settings and with host_malloc's big
  heap (name + '+bigheap'), each timing only its second call."""
  out = {}
  for name, fn in cands.items():
    for on in (False, True):
      def run(fn=fn, on=on):
        host_malloc.keep_large_buffers(on)
        fn()  # untimed: lets the allocator settle in this mode
        t0 = time.perf_counter()
        fn()
        return SelfTimed(time.perf_counter() - t0)
      out[f'{name}{"+bigheap" if on else ""}'] = run
  return out


def median_ratio(num, den):
  return float(np.median(np.asarray(num) / np.asarray(den)))


def rel_diff(got, want) -> float:
  """max |got - want| / max |want|, in float64."""
  want = np.asarray(want, np.float64)
  return float(np.abs(np.asarray(got, np.float64) - want).max() /
               np.abs(want).max())


def dit_b2_config(smoke: bool):
  """DiT-B/2 on 32x32x4 latents, unconditional, no autoencoder (the network
  on latents alone, digits standing in for data); --smoke: a 2-block,
  width-32 DiT on 8x8x4."""
  from configs import imagenet256_dit_xl2  # pylint: disable=g-import-not-at-top
  config = imagenet256_dit_xl2.get_config()
  config.latent.autoencoder = ''
  config.data.source, config.data.data_dir = 'digits', ''
  config.data.image_size, config.data.channels = 32, 4
  config.model.update(dit_variant='B', num_classes=0)
  config.sample.guidance_scale = 0.0
  if smoke:
    config.data.image_size = 8
    config.model.update(dit_variant='custom', dit_depth=2,
                        dit_hidden_size=32, dit_num_heads=4)
  return config


# ------------------------------------------------- compiled HLO collectives --

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter',
               'collective-permute', 'all-to-all')
_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 's64': 8, 'u64': 8,
          's32': 4, 'u32': 4, 's16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1}
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(' +
                 '|'.join(COLLECTIVES) + r')(-start)?\(')
_SHAPE = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]')
_COMPUTATION = re.compile(
    r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$')


def hlo_collectives(hlo: str) -> list[tuple[str, int, str]]:
  """[(op, bytes of its results, computation)] for every collective in
  compiled HLO text. A combined op's tuple result counts every element
  (XLA:CPU all-reduces all gradients in one tuple op); an async -start op's
  tuple holds its operands and then its results: the results count."""
  out, computation = [], None
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _OP.match(line)
    if match:
      shape, op, is_start = match.groups()
      sizes = [_BYTES[t] * int(np.prod([int(d) for d in dims.split(',') if d]
                                       or [1]))
               for t, dims in _SHAPE.findall(shape)]
      if is_start and len(sizes) > 1:
        sizes = sizes[len(sizes) // 2:]
      out.append((op, sum(sizes), computation))
  return out
