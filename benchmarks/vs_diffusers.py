r"""Our U-Net vs diffusers' UNet2DModel + torch Adam, on this machine.

  .venv/bin/python benchmarks/vs_diffusers.py --batch_sizes=8,32 --reps=5
  .venv/bin/python benchmarks/vs_diffusers.py --model=default \
      --batch_sizes=64,128 --step_ynn_conv=on,off

--model=paper: the DDPM paper's CIFAR-10 U-Net (configs/cifar10_ddpm.py);
--model=default: the main job's small digits U-Net (configs/default.py);
diffusers gets the UNet2DModel of the same architecture and parameter count
(checked before timing).

Needs torch and diffusers (requirements-convert.txt; benchmark-only). The
machine may be shared, so every figure is measured alternately in one process
(ours, theirs, theirs, ours, ...: the order reverses every repetition) and
each line carries the load average; ratios are medians of per-repetition
ratios of neighbouring measurements. `--notorch` times only our variants
(--weight_grad x --step_ynn_conv), e.g. to measure one change. `--smoke`
runs every part on a tiny U-Net (tests/test_benchmarks.py).

What it prints, per batch size:
  train step   ours (one compiled call: dropout 0.1, Adam, clipping at 1.0,
               EMA; WEIGHT_GRAD variants from --weight_grad) vs diffusers'
               UNet2DModel (the paper's CIFAR-10 config, dropout 0.1) with
               torch Adam (foreach), clip_grad_norm_ and a foreach EMA
               update -- the loop of diffusers' train_unconditional example.
  forward      eval mode, ours jitted vs torch.inference_mode().
  FLOPs, MFU   XLA's cost analysis of our step with XLA's own convolutions
               (the model's FLOPs), against fp32 matmul peaks measured in
               the same run: torch.mm (MKL) and a jitted XLA dot.
  sampling     one step of ddpm_sample's lax.scan (T steps in one jit) vs a
               bare jitted forward at the same batch: the loop's overhead.
  memory       XLA's memory analysis of our compiled step; peak RSS.
--malloc=big (the default, as main.py on CPU) raises glibc's mmap threshold
first, for both frameworks; --malloc=ab times every candidate both ways (see
--help, diffusion_jax/host_malloc.py and BENCHMARKS.md, issue 7).

OMP_WAIT_POLICY=PASSIVE is set for torch's OpenMP threads unless already set:
with the default (spinning) policy, diffusers' forward took 4.0 s instead of
0.9 s when other jobs held one of the two cores (one thread: 0.8 s), because
the threads spin at every barrier waiting for a descheduled peer. XLA's
thread pool does not suffer this way, so spinning would make the comparison
unfair to torch on a shared machine.
"""

import math
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import cifar10_ddpm, default
from diffusion_jax import experiment, host_malloc, parallel
from diffusion_jax.diffusion import denoiser, samplers, schedules
from diffusion_jax.models import conv
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_enum('model', 'paper', ['paper', 'default'],
                  'paper: the CIFAR-10 U-Net; default: the digits U-Net.')
flags.DEFINE_list('batch_sizes', ['8', '32'], 'Batch sizes.')
flags.DEFINE_integer('reps', 5, 'Timed repetitions of each candidate.')
flags.DEFINE_list('weight_grad', ['auto'],
                  'conv.WEIGHT_GRAD settings to compile our step with '
                  '(xla = the plain port, auto = the default: chunked on '
                  'CPU, see models/conv.py).')
flags.DEFINE_list('step_ynn_conv', ['on'],
                  'on: XLA:CPU default (YNNPACK convolutions; what the '
                  'trainer uses); off: compile with conv.NO_YNN_CONV '
                  '(YNNPACK for dots only). Each WEIGHT_GRAD x step_ynn_conv '
                  'pair is a variant of our step.')
flags.DEFINE_list('ynn_conv', ['on', 'off'],
                  'The same for the forward and the sampling loop; off is '
                  'what sampling and evaluation use on CPU '
                  '(conv.inference_compiler_options).')
flags.DEFINE_list('what', ['peaks', 'train', 'forward', 'sample'],
                  'Parts to run.')
flags.DEFINE_integer('sample_steps', 20, 'T of the timed sampling loop.')
flags.DEFINE_enum('malloc', 'big', ['default', 'big', 'ab'],
                  'big (what main.py does on CPU): glibc '
                  'mallopt(M_MMAP_THRESHOLD=1 GiB, no trimming) so that large '
                  'buffers are reused instead of mmap-ed and page-faulted on '
                  'every call (diffusion_jax/host_malloc.py); default: '
                  "glibc's own; ab: alternate both for every candidate.")
flags.DEFINE_bool('torch', True, 'Include diffusers + torch.')
common.define_smoke_flags()
FLAGS = flags.FLAGS

# google/ddpm-cifar10-32's UNet2DModel config (as tests/test_convert_diffusers).
CIFAR10_UNET = dict(
    act_fn='silu', attention_head_dim=None,
    block_out_channels=[128, 256, 256, 256], center_input_sample=False,
    down_block_types=['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D',
                      'DownBlock2D'],
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-06,
    norm_num_groups=32, out_channels=3, sample_size=32,
    time_embedding_type='positional',
    up_block_types=['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'])
# configs/default.py's U-Net: ch 32, ch_mult (1, 2), attention at 4x4, 8
# groups, one 8x8 grey channel.
DIGITS_UNET = dict(
    CIFAR10_UNET, block_out_channels=[32, 64], in_channels=1, out_channels=1,
    norm_num_groups=8, sample_size=8,
    down_block_types=['DownBlock2D', 'AttnDownBlock2D'],
    up_block_types=['AttnUpBlock2D', 'UpBlock2D'])
MODELS = {'paper': (cifar10_ddpm, CIFAR10_UNET),
          'default': (default, DIGITS_UNET)}
# --smoke: the shape of common.SMOKE_MODEL.
SMOKE_UNET = dict(CIFAR10_UNET, block_out_channels=[16], layers_per_block=1,
                  norm_num_groups=4, down_block_types=['DownBlock2D'],
                  up_block_types=['UpBlock2D'])


def time_cands(cands, reps, label):
  """common.alternate(), each candidate timed both ways in 'ab' malloc mode."""
  if FLAGS.malloc == 'ab':
    cands = common.with_malloc_variants(cands)
  return common.alternate(cands, reps, label)


def summarize(times, b, flops=None, peaks=None, ref=None):
  """Prints a line per candidate; returns its figures, with the times."""
  rows = {}
  for name, t in times.items():
    med = float(np.median(t))
    row = rows[name] = dict(times=t, median_s=med, images_per_s=b / med)
    line = f'  {name:28s} {med:7.3f} s  {b / med:7.1f} images/s'
    if flops and peaks:
      row['mfu'] = {k: flops / med / p for k, p in peaks.items()}
      line += '  MFU ' + ', '.join(f'{v:.0%} of {k}'
                                   for k, v in row['mfu'].items())
    if ref and ref in times and name != ref:
      row['speedup_vs_ref'] = common.median_ratio(times[ref], t)
      line += f'  speed-up vs {ref}: {row["speedup_vs_ref"]:.2f}x'
    print(line)
  return dict(ref=ref, flops=flops, candidates=rows)


def matmul_peaks(reps, sizes=(2048, 4096)):
  """fp32 matmul FLOP/s: torch.mm (MKL) and a jitted XLA dot, alternating."""
  peaks = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n))
    xla_dot = jax.jit(jnp.matmul)
    xla_dot(a, a).block_until_ready()
    cands = {f'xla dot {n}': lambda: xla_dot(a, a).block_until_ready()}
    if FLAGS.torch:
      import torch  # pylint: disable=g-import-not-at-top
      ta = torch.randn(n, n)
      torch.mm(ta, ta)
      cands[f'torch mm {n}'] = lambda: torch.mm(ta, ta)
    times = common.alternate(cands, reps, 'peak')
    for name, t in times.items():
      rate = 2 * n ** 3 / float(np.median(t))
      print(f'  {name}: {rate / 1e9:.0f} GFLOP/s')
      kind = name.split()[0]
      peaks[kind] = max(peaks.get(kind, 0.0), rate)
  return peaks


def options(ynn_conv: str) -> dict:
  return {} if ynn_conv == 'on' else dict(conv.NO_YNN_CONV)


class Ours:
  """Our jitted train step (one per WEIGHT_GRAD setting) and forward."""

  def __init__(self, config, b):
    self.b = b
    self.mesh = parallel.create_mesh()
    config = config.copy_and_resolve_references()
    config.batch_size = b
    exp = experiment.build(config, self.mesh)
    self.model = exp.method.network
    self.images = jax.device_put(
        jax.random.uniform(jax.random.key(1), (b, *exp.method.image_shape),
                           minval=-1), parallel.batch_sharded(mesh=self.mesh))
    self.state = exp.init_state(jax.random.key(0))
    self.steps, self.flops, self.memory = {}, {}, {}
    variants = [(m, y) for m in FLAGS.weight_grad
                for y in FLAGS.step_ynn_conv]
    if ('xla', 'on') not in variants:  # the plain port: the model's FLOPs
      variants.append(('xla', 'on'))
    for mode, ynn in variants:
      name = f'{mode},ynn_conv={ynn}'
      conv.WEIGHT_GRAD = mode  # read while tracing
      # jit_train_step traces a new function each time (WEIGHT_GRAD is read
      # while tracing).
      t0 = time.perf_counter()
      compiled = exp.jit_train_step().lower(
          self.state, self.images).compile(compiler_options=options(ynn))
      print(f'  compiled our step ({name}) in '
            f'{time.perf_counter() - t0:.1f} s')
      self.flops[name] = compiled.cost_analysis().get('flops', math.nan)
      self.memory[name] = compiled.memory_analysis()
      if mode in FLAGS.weight_grad and ynn in FLAGS.step_ynn_conv:
        self.steps[name] = compiled
    conv.WEIGHT_GRAD = 'auto'
    self.t = jnp.full((b,), 500, jnp.int32)
    self.fwds = {}
    for ynn in FLAGS.ynn_conv:
      fwd = jax.jit(lambda p, x, t: self.model.apply({'params': p}, x, t,
                                                     train=False))
      self.fwds[ynn] = fwd.lower(self.state.params, self.images,
                                 self.t).compile(compiler_options=options(ynn))
    self.fwd_flops = next(iter(self.fwds.values())).cost_analysis().get(
        'flops', math.nan)

  def step(self, mode):
    def run():
      self.state, metrics = self.steps[mode](self.state, self.images)
      jax.block_until_ready(metrics)
    run()
    return run

  def forward(self, ynn):
    fwd = self.fwds[ynn]
    run = lambda: fwd(self.state.params, self.images, self.t).block_until_ready()
    run()
    return run

  def sampler(self, num_steps, ynn):
    """T = num_steps ancestral steps in one jit (same loop body as T=1000)."""
    config = cifar10_ddpm.get_config()  # the same diffusion for both models
    config.diffusion.num_timesteps = num_steps
    schedule = schedules.schedule_from_config(config.diffusion)
    denoise_fn_of = lambda p: denoiser.make_denoiser(
        lambda x, t: self.model.apply({'params': p}, x, t, train=False),
        schedule, 'eps')
    sample = jax.jit(lambda p, x, rng: samplers.ddpm_sample(
        denoise_fn_of(p), schedule, x, rng))
    compiled = sample.lower(self.state.params, self.images,
                            jax.random.key(2)).compile(
                                compiler_options=options(ynn))
    run = lambda: compiled(self.state.params, self.images,
                           jax.random.key(2)).block_until_ready()
    run()
    return run


class Theirs:
  """diffusers UNet2DModel + torch Adam, as diffusers' training example."""

  def __init__(self, b, unet_config, num_params):
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.manual_seed(0)
    self.model = diffusers.UNet2DModel(**unet_config, dropout=0.1)
    theirs = sum(p.numel() for p in self.model.parameters())
    if num_params is not None and theirs != num_params:
      raise AssertionError(f'diffusers UNet2DModel has {theirs:,} '
                           f'parameters, ours {num_params:,}: not the same '
                           'model')
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.opt = torch.optim.Adam(self.params, lr=2e-4, foreach=True)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    self.sqrt_abar = abar.sqrt().float()
    self.sqrt_1m_abar = (1 - abar).sqrt().float()
    size, channels = unet_config['sample_size'], unet_config['in_channels']
    self.images = torch.rand(b, channels, size, size) * 2 - 1
    self.b = b

  def step(self):
    torch = self.torch
    model = self.model.train()

    def run():
      x0 = self.images
      t = torch.randint(0, 1000, (self.b,))
      noise = torch.randn_like(x0)
      x_t = (self.sqrt_abar[t].view(-1, 1, 1, 1) * x0 +
             self.sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise)
      loss = torch.nn.functional.mse_loss(model(x_t, t).sample, noise)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.params, 1.0)
      self.opt.step()
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, self.params, 1 - 0.9999)  # pylint: disable=protected-access
      return loss.item()
    run()
    return run

  def forward(self):
    torch = self.torch
    model = self.model.eval()
    t = torch.full((self.b,), 500)

    def run():
      with torch.inference_mode():
        return model(self.images, t).sample
    run()
    return run


def main(_):
  common.apply_smoke(batch_sizes=['2'], reps=2, sample_steps=2)
  if FLAGS.malloc == 'big':
    host_malloc.keep_large_buffers(True)
  versions = f'jax {jax.__version__}'
  if FLAGS.torch:
    import torch  # pylint: disable=g-import-not-at-top
    versions += (f', torch {torch.__version__} ({torch.get_num_threads()} '
                 f'threads, OMP_WAIT_POLICY={os.environ["OMP_WAIT_POLICY"]})')
  print(f'CPU: {common.cpu_model()}; {jax.device_count()} x '
        f'{jax.devices()[0].platform}, '
        f'{os.cpu_count()} CPUs, {versions}, malloc={FLAGS.malloc}, '
        f'load {common.load()}')
  sizes = (64, 128) if FLAGS.smoke else (2048, 4096)
  peaks = matmul_peaks(3, sizes) if 'peaks' in FLAGS.what else {}
  print('peaks (GFLOP/s): ' + ', '.join(f'{k} {v / 1e9:.0f}'
                                        for k, v in peaks.items()))
  config_module, unet_config = MODELS[FLAGS.model]
  config = config_module.get_config()
  if FLAGS.smoke:
    common.smoke_model(config)
    unet_config = SMOKE_UNET
  report = dict(model=FLAGS.model, peaks=peaks, batches={})
  for b in map(int, FLAGS.batch_sizes):
    print(f'\n== batch {b} ==')
    ours = Ours(config, b)
    num_params = sum(x.size for x in jax.tree.leaves(ours.state.params))
    print(f'  {FLAGS.model} U-Net: {num_params:,} parameters')
    # --smoke's two tiny U-Nets differ (only the code paths are checked).
    theirs = Theirs(b, unet_config, None if FLAGS.smoke else num_params) \
        if FLAGS.torch else None
    flops = ours.flops['xla,ynn_conv=on']
    print(f'  model FLOPs (XLA cost analysis, XLA convs): '
          f'{flops / b / 1e9:.1f} GFLOP/image train step, '
          f'{ours.fwd_flops / b / 1e9:.1f} forward')
    for mode, m in ours.memory.items():
      print(f'  our step memory ({mode}): temp '
            f'{m.temp_size_in_bytes / 2 ** 30:.2f} GiB, arguments '
            f'{m.argument_size_in_bytes / 2 ** 30:.2f} GiB, output '
            f'{m.output_size_in_bytes / 2 ** 30:.2f} GiB, aliased '
            f'{m.alias_size_in_bytes / 2 ** 30:.2f} GiB')
    parts = report['batches'][b] = {}

    def versus_diffusers(title, label, cands, theirs_fn, model_flops):
      if theirs:
        cands['diffusers+torch'] = theirs_fn()
      print(title)
      times = time_cands(cands, FLAGS.reps, label)
      return summarize(times, b, model_flops, peaks,
                       'diffusers+torch' if theirs else None)

    if 'train' in FLAGS.what:
      parts['train'] = versus_diffusers(
          'train step:', f'train b={b}',
          {f'ours[{mode}]': ours.step(mode) for mode in ours.steps},
          lambda: theirs.step(), flops)
    if 'forward' in FLAGS.what:
      parts['forward'] = versus_diffusers(
          'forward (eval):', f'fwd b={b}',
          {f'ours[ynn_conv={y}]': ours.forward(y) for y in FLAGS.ynn_conv},
          lambda: theirs.forward(), ours.fwd_flops)
    if 'sample' in FLAGS.what:
      n, ynn = FLAGS.sample_steps, FLAGS.ynn_conv[-1]
      fwd, loop = ours.forward(ynn), ours.sampler(n, ynn)
      times = common.alternate({'forward': fwd, f'sampler x{n}': loop},
                               FLAGS.reps, f'sample b={b}')
      per_step = np.asarray(times[f'sampler x{n}']) / n
      overhead = common.median_ratio(per_step, times['forward']) - 1
      print(f'sampling: {np.median(per_step):.3f} s/step vs forward '
            f'{np.median(times["forward"]):.3f} s: loop overhead '
            f'{overhead:+.1%} per step (ynn_conv={ynn})')
      parts['sample'] = dict(times=times, num_steps=n, overhead=overhead)
    del ours, theirs
  print(f'\npeak RSS of this process: '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} '
        f'GB; load {common.load()}')
  common.write_json(FLAGS.json_out, report)


if __name__ == '__main__':
  app.run(main)
