r"""Our DiT vs diffusers' DiTTransformer2DModel + torch, same weights, batch.

  .venv/bin/python benchmarks/dit_speed.py --json_out=/tmp/dit_speed.json
  .venv/bin/python benchmarks/dit_speed.py --variants=S/2 --dtype=bfloat16

Per variant (default DiT-S/2, DiT-B/2; 32x32x4 latents, 1000 classes, learned
sigma) diffusers' model is built from facebook/DiT-XL-2-256's config with the
variant's sizes, every weight moved off its initialisation (adaLN-Zero's
zeros would hide differences) and imported with convert/diffusers_dit.py.
Before timing, both float32 forwards and first train-step losses must agree
to 1e-4 (max |ours - theirs| / max |theirs|); the script stops otherwise.

Timed alternately in one process (common.alternate) after one untimed call
each; medians of --reps. Forward: ours jitted + block_until_ready, theirs in
torch.inference_mode. Train step: forward + backward + Adam (lr 1e-4, no
weight decay) on the same loss, the MSE of the first C output channels
against a fixed random target for a fixed batch (x, t, y): ours one jitted
call with donated state, theirs torch.optim.Adam(foreach=True) (torch's CPU
ops are synchronous). torch stays in eval mode (train mode's LabelEmbedding
drops 10% of labels); DiT has no dropout. --dtype=bfloat16: our compute
dtype (parameters float32) and torch.autocast(bfloat16) for diffusers.

Figures: ms, images/s, ours / theirs (median of per-repetition ratios; < 1:
ours faster), GFLOP per call from XLA's cost analysis of our lowered
functions (flops.step_flops, as the trainer counts), GFLOP/s for both sides
(diffusers recomputes the time/class embedder in each block and holds a copy
per block: its parameter count is ours + (depth - 1) x the embedder's,
checked) and MFU against --peak_tflops, else flops.device_peak (datasheet
dense bf16; a CPU's measured float32 matmul rate). `--smoke`: a tiny DiT,
8x8 latents, batch 2 (tests/test_benchmarks.py); `--notorch`: ours alone.
"""

import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see vs_diffusers.py
import contextlib
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from diffusion_jax import flops as flops_lib
from diffusion_jax import host_malloc
from diffusion_jax.convert import diffusers_dit as dd
from diffusion_jax.models import dit
# pylint: enable=g-import-not-at-top,wrong-import-position

# (depth, hidden, heads); 'tiny' is --smoke's.
VARIANTS = {**dit.DIT_VARIANTS, 'tiny': (1, 64, 2)}
flags.DEFINE_list('variants', ['S/2', 'B/2'],
                  f'NAME/PATCH, NAME one of {tuple(VARIANTS)}.')
flags.DEFINE_integer('batch', 4, 'Batch size of both sides.')
flags.DEFINE_integer('latent_size', 32, 'Latent height = width.')
flags.DEFINE_integer('channels', 4, 'Latent channels C (output: 2C).')
flags.DEFINE_integer('num_classes', 1000, 'Class labels.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                  'Our compute dtype; bfloat16 runs torch under autocast.')
flags.DEFINE_integer('reps', 5, 'Timed repetitions (after one warm-up).')
flags.DEFINE_bool('torch', True, 'Include diffusers + torch.')
flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s of this device at '
                   '--dtype for MFU; default: diffusion_jax/flops.py\'s '
                   'device_peak (datasheet bf16 table, or a CPU\'s measured '
                   'float32 matmul rate).')
flags.DEFINE_bool('cpu_big_heap', True, 'As main.py: host_malloc on the CPU '
                  '(for both frameworks).')
common.define_smoke_flags()
FLAGS = flags.FLAGS

TOLERANCE = 1e-4  # forward and first loss, float32
THEIRS = 'diffusers+torch'


def parse_variant(name):
  size, _, patch = name.partition('/')
  if size not in VARIANTS or patch not in ('2', '4', '8'):
    raise app.UsageError(f'--variants: {name!r} is not NAME/PATCH with NAME '
                         f'in {tuple(VARIANTS)}, PATCH 2, 4 or 8')
  return (*VARIANTS[size], int(patch))


def diffusers_config(depth, hidden, heads, patch):
  c = FLAGS.channels
  return dict(dd.DIT_XL_2_256, num_layers=depth, num_attention_heads=heads,
              attention_head_dim=hidden // heads, patch_size=patch,
              sample_size=FLAGS.latent_size, in_channels=c,
              out_channels=2 * c, num_embeds_ada_norm=FLAGS.num_classes)


class Theirs:
  """diffusers' DiT (weights perturbed, embedder copies equal) + torch Adam."""

  def __init__(self, hf_config, batch, autocast):
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.c = torch, hf_config['in_channels']
    self.model = diffusers.DiTTransformer2DModel.from_config(hf_config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as tests/test_dit.py's _perturbed_dit
      for p in self.model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) *
               (0.02 if p.ndim > 1 else 0.05))
      emb = self.model.transformer_blocks[0].norm1.emb.state_dict()
      for block in self.model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb)
    self.state_dict = {k: v.detach().numpy().copy()
                       for k, v in self.model.state_dict().items()}
    self.num_params = sum(p.numel() for p in self.model.parameters())
    self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4,
                                betas=(0.9, 0.999), eps=1e-8, foreach=True)
    self.autocast = autocast
    self.batch = {k: torch.from_numpy(v) for k, v in batch.items()}

  def _context(self, autocast=True):
    return (self.torch.autocast('cpu', dtype=self.torch.bfloat16)
            if autocast and self.autocast else contextlib.nullcontext())

  def forward_fp32(self):
    """NHWC float32 output on the batch, for the agreement check."""
    return self.forward(False).numpy().transpose(0, 2, 3, 1)

  def forward(self, autocast=True):
    b = self.batch
    with self.torch.inference_mode(), self._context(autocast):
      return self.model(b['x'], timestep=b['t'], class_labels=b['y']).sample

  def step(self):
    """One Adam step; returns the loss tensor (before the update)."""
    b = self.batch
    with self._context():
      out = self.model(b['x'], timestep=b['t'], class_labels=b['y']).sample
      loss = self.torch.nn.functional.mse_loss(out[:, :self.c].float(),
                                               b['target'])
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss


class Ours:
  """Our DiT's compiled forward and Adam step, with FLOP counts."""

  def __init__(self, hf_config, batch, state_dict, dtype):
    self.c = hf_config['in_channels']
    model_config = dd.model_config_from_diffusers(hf_config, match='diffusers')
    out = 2 * self.c
    self.net = dd.build_model(model_config, out, dtype)
    self.net32 = dd.build_model(model_config, out, jnp.float32)
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    self.args = (nhwc(batch['x']), jnp.asarray(batch['t']),
                 jnp.asarray(batch['y']))
    self.target = nhwc(batch['target'])
    init = jax.jit(lambda rng: self.net32.init(rng, *self.args, train=False))
    if state_dict is None:  # --notorch
      self.params = init(jax.random.key(0))['params']
    else:
      abstract = jax.eval_shape(init, jax.random.key(0))['params']
      self.params = jax.device_put(dd.convert_params(
          state_dict, self.net.depth, abstract))
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    self.num_params = size(self.params)
    self.embedder_params = size(self.params['t_embedder']) + size(
        self.params.get('y_embedder', {}))
    self.tx = optax.adam(1e-4, b1=0.9, b2=0.999, eps=1e-8)

    def loss_fn(params, x, t, y, target):
      out = self.net.apply({'params': params}, x, t, y, train=True)
      return jnp.mean(jnp.square(out[..., :self.c] - target))

    def step(params, opt_state, x, t, y, target):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, t, y, target)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    fwd_of = lambda net: jax.jit(
        lambda p, x, t, y: net.apply({'params': p}, x, t, y, train=False))
    self.state = (jax.tree.map(jnp.copy, self.params),
                  self.tx.init(self.params))  # the step's own (donated)
    t0 = time.perf_counter()
    fwd_lowered = fwd_of(self.net).lower(self.params, *self.args)
    self.fwd = fwd_lowered.compile()
    t1 = time.perf_counter()
    step_lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
        *self.state, *self.args, self.target)
    self.step_c = step_lowered.compile()
    self.compile_s = dict(forward=t1 - t0, train=time.perf_counter() - t1)
    self.fwd32 = (self.fwd if dtype == jnp.float32 else
                  fwd_of(self.net32).lower(self.params, *self.args).compile())
    # The trainer's count (flops.step_flops: the lowered computation's).
    self.flops = {k: flops_lib.step_flops(lowered) or np.nan for k, lowered
                  in (('forward', fwd_lowered), ('train', step_lowered))}

  def forward_fp32(self):
    return np.asarray(self.fwd32(self.params, *self.args))

  def forward(self):
    jax.block_until_ready(self.fwd(self.params, *self.args))

  def step(self):
    """One Adam step; returns the loss (before the update)."""
    params, opt_state, loss = self.step_c(*self.state, *self.args,
                                          self.target)
    self.state = (params, opt_state)
    jax.block_until_ready((params, opt_state, loss))
    return loss


def timed_part(kind, cands, b, flops, label, peak_tflops):
  """alternate() timing of warmed-up candidates; one part's figures."""
  times = common.alternate(cands, FLAGS.reps, f'{label} {kind}')
  part = dict(flops=flops, candidates={})
  for name, t in times.items():
    med = float(np.median(t))
    row = part['candidates'][name] = dict(
        times=t, median_s=med, ms=1e3 * med, images_per_s=b / med,
        gflop_per_s=flops / med / 1e9)
    if peak_tflops:  # PaLM's MFU: achieved / peak FLOP/s
      row['mfu'] = flops / med / (peak_tflops * 1e12)
  if THEIRS in times:
    part['ours_over_theirs'] = common.median_ratio(times['ours'],
                                                   times[THEIRS])
  return part


def run_variant(name, b, dtype, peak_tflops):
  depth, hidden, heads, patch = parse_variant(name)
  label = f'DiT-{name}'
  hf_config = diffusers_config(depth, hidden, heads, patch)
  rng = np.random.default_rng(0)
  size, c = FLAGS.latent_size, FLAGS.channels
  batch = dict(
      x=rng.standard_normal((b, c, size, size)).astype(np.float32),
      t=rng.integers(0, 1000, b), y=rng.integers(0, FLAGS.num_classes, b),
      target=rng.standard_normal((b, c, size, size)).astype(np.float32))
  print(f'\n== {label}: depth {depth}, hidden {hidden}, {heads} heads, '
        f'{(size // patch) ** 2} tokens, batch {b} ==', flush=True)
  t0 = time.perf_counter()
  theirs = (Theirs(hf_config, batch, dtype == jnp.bfloat16) if FLAGS.torch
            else None)
  ours = Ours(hf_config, batch, theirs and theirs.state_dict, dtype)
  if theirs:
    theirs.state_dict = None  # imported; B/2's is 0.5 GB
  print(f'  built in {time.perf_counter() - t0:.1f} s (compiled our forward '
        f'in {ours.compile_s["forward"]:.1f} s, step in '
        f'{ours.compile_s["train"]:.1f} s)', flush=True)
  result = dict(depth=depth, hidden_size=hidden, num_heads=heads,
                patch_size=patch, tokens=(size // patch) ** 2,
                compile_s=ours.compile_s, params=dict(
                    ours=ours.num_params, embedder=ours.embedder_params))
  if theirs:
    want = ours.num_params + (depth - 1) * ours.embedder_params
    if theirs.num_params != want:
      raise AssertionError(f'diffusers has {theirs.num_params:,} parameters, '
                           f'ours + {depth - 1} embedder copies {want:,}: '
                           'not the same model')
    result['params']['diffusers'] = theirs.num_params
    ref = theirs.forward_fp32()
    diff = common.rel_diff(ours.forward_fp32(), ref)
    if diff > TOLERANCE:
      raise AssertionError(f'{label}: our forward differs from diffusers\' '
                           f'by {diff:.2e} > {TOLERANCE} (relative): not the '
                           'same function, not timing it')
    result['agreement'] = dict(max_rel_diff=diff, tolerance=TOLERANCE)
    print(f'  forward agrees with diffusers (float32, the timed batch): '
          f'max |ours - theirs| / max |theirs| = {diff:.1e} <= {TOLERANCE}')
    if dtype == jnp.bfloat16:
      low = common.rel_diff(ours.fwd(ours.params, *ours.args), ref)
      result['agreement']['bf16_max_rel_diff'] = low
      print(f'  our bfloat16 forward vs diffusers float32: {low:.1e}')
  print(f'  parameters: ours {ours.num_params:,}' + (
      f', diffusers {theirs.num_params:,} (+{depth - 1} copies of the '
      f'{ours.embedder_params:,}-parameter embedder)' if theirs else ''))

  # Warm-ups: the first step of each returns the loss at the same weights.
  losses = {'ours': float(ours.step())}
  ours.forward()
  fwd_cands, step_cands = {'ours': ours.forward}, {'ours': ours.step}
  if theirs:
    losses[THEIRS] = float(theirs.step().item())
    theirs.forward()
    fwd_cands[THEIRS], step_cands[THEIRS] = theirs.forward, theirs.step
    rel = losses['rel_diff'] = abs(losses['ours'] - losses[THEIRS]) / abs(
        losses[THEIRS])
    print(f'  first train-step loss: ours {losses["ours"]:.6f}, diffusers '
          f'{losses[THEIRS]:.6f} (relative difference {rel:.1e})')
    if dtype == jnp.float32 and rel > TOLERANCE:
      raise AssertionError(f'{label}: the first losses differ by {rel:.2e}: '
                           'not the same train step')
  result['first_loss'] = losses
  print(f'  XLA cost analysis: forward {ours.flops["forward"] / 1e9:.4g} '
        f'GFLOP, train step {ours.flops["train"] / 1e9:.4g} GFLOP',
        flush=True)
  # alternate() ignores the candidates' return values (a loss, an output).
  result['forward'] = timed_part('forward', fwd_cands, b,
                                 ours.flops['forward'], label, peak_tflops)
  result['train'] = timed_part('train', step_cands, b, ours.flops['train'],
                               label, peak_tflops)
  return result


def table(report):
  """The markdown table of the report's variants."""
  mfu = bool(report['peak_tflops'])
  cols = ['model', 'side', 'params', 'forward ms', 'fwd images/s',
          'fwd GFLOP', 'fwd GFLOP/s', 'train step ms', 'step images/s',
          'step GFLOP', 'step GFLOP/s']
  if mfu:
    cols += ['fwd MFU', 'step MFU']
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + ' --- |' * len(cols)]
  for name, v in report['variants'].items():
    for side in ('ours', THEIRS):
      if side not in v['forward']['candidates']:
        continue
      f, s = (v[k]['candidates'][side] for k in ('forward', 'train'))
      who = f'ours (JAX, {report["dtype"]})' if side == 'ours' else (
          'diffusers + torch (' + ('autocast bf16' if report['dtype'] ==
                                   'bfloat16' else 'float32') + ')')
      n = v['params']['diffusers' if side == THEIRS else 'ours']
      row = [f'DiT-{name}', who, f'{n:,}', f'{f["ms"]:.1f}',
             f'{f["images_per_s"]:.2f}', f'{v["forward"]["flops"] / 1e9:.4g}',
             f'{f["gflop_per_s"]:.1f}', f'{s["ms"]:.1f}',
             f'{s["images_per_s"]:.2f}', f'{v["train"]["flops"] / 1e9:.4g}',
             f'{s["gflop_per_s"]:.1f}']
      if mfu:
        row += [f'{100 * f["mfu"]:.3g}%', f'{100 * s["mfu"]:.3g}%']
      lines.append('| ' + ' | '.join(row) + ' |')
    if 'ours_over_theirs' in v['forward']:
      row = [f'DiT-{name}', '**ours / theirs** (time)', '',
             f'**{v["forward"]["ours_over_theirs"]:.2f}x**', '', '', '',
             f'**{v["train"]["ours_over_theirs"]:.2f}x**']
      lines.append('| ' + ' | '.join(row + [''] * (len(cols) - 8)) + ' |')
  return '\n'.join(lines)


def main(_):
  common.apply_smoke(variants=['tiny/2'], batch=2, latent_size=8, reps=2)
  if FLAGS.cpu_big_heap and jax.default_backend() == 'cpu':
    host_malloc.keep_large_buffers(True)
  start = time.perf_counter()
  dtype = jnp.dtype(FLAGS.dtype)
  report = dict(cpu=common.cpu_model(), jax=jax.__version__,
                backend=jax.default_backend(), variants={}, **{
                    k: FLAGS[k].value for k in (
                        'dtype', 'batch', 'latent_size', 'channels',
                        'num_classes', 'reps')})
  versions = f'jax {jax.__version__} ({jax.default_backend()})'
  if FLAGS.torch:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    report.update(torch=torch.__version__, diffusers=diffusers.__version__,
                  torch_threads=torch.get_num_threads())
    versions += (f', torch {torch.__version__} ({torch.get_num_threads()} '
                 f'threads, OMP_WAIT_POLICY={os.environ["OMP_WAIT_POLICY"]}),'
                 f' diffusers {diffusers.__version__}')
  header = (f'CPU: {report["cpu"]} ({os.cpu_count()} CPUs); {versions}; '
            f'dtype {FLAGS.dtype}; batch {FLAGS.batch}, latents '
            f'{FLAGS.latent_size}x{FLAGS.latent_size}x{FLAGS.channels}, '
            f'{FLAGS.num_classes} classes, learned sigma; median of '
            f'{FLAGS.reps} after a warm-up')
  print(header + f'; load {common.load()}', flush=True)
  peak_tflops, peak_source = ((FLAGS.peak_tflops, '--peak_tflops')
                               if FLAGS.peak_tflops else
                               flops_lib.device_peak())
  report.update(peak_tflops=peak_tflops, peak_source=peak_source)
  print(f'MFU peak: {peak_tflops or float("nan"):.4g} TFLOP/s per device '
        f'({peak_source})', flush=True)
  for name in FLAGS.variants:
    report['variants'][name] = run_variant(name, FLAGS.batch, dtype,
                                           peak_tflops)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  report.update(wall_s=time.perf_counter() - start, peak_rss_gb=rss)
  print(f'\n{header}\n\n{table(report)}\n')
  print(f'GFLOP: per call (batch {FLAGS.batch}), XLA cost analysis of our '
        'lowered functions (flops.step_flops); GFLOP/s: that / median time, '
        'both sides. ours / theirs: median of per-repetition time ratios '
        '(< 1: ours faster).')
  if peak_tflops:
    print(f'MFU: GFLOP/s / {peak_tflops:.4g} TFLOP/s ({peak_source}), the '
          'same peak for both sides and dtypes.')
  else:
    print(f'MFU: not computed ({peak_source}); give --peak_tflops.')
  print(f'wall {report["wall_s"]:.0f} s, peak RSS {report["peak_rss_gb"]:.2f}'
        f' GB, load {common.load()}')
  common.write_json(FLAGS.json_out, report)


if __name__ == '__main__':
  app.run(main)
