r"""Train-step throughput, MFU and memory on this machine's accelerator.

  .venv/bin/python benchmarks/accelerator_check.py [--steps=20] \
      [--unet_batch=128] [--dit_batch=128] [--dtype=bfloat16] [--notorch] \
      [--smoke] [--json_out=F]
  bash benchmarks/accelerator_check.sh  # installs the matching jax first

Rows (issue 17), each the trainer's own jitted train step
(experiment.jit_train_step: loss, gradients, clipping, Adam and EMA in one
call) on one device, fed a fixed random batch:
  unet       the DDPM paper's 35.7M CIFAR-10 U-Net (configs/cifar10_ddpm.py)
             at --unet_batch.
  dit        DiT-B/2 on 32x32x4 latents (the ImageNet-256 DiT config's
             network without the VAE, unconditional) at --dit_batch.
  diffusers  when torch and diffusers import (and not --notorch): diffusers'
             UNet2DModel of the U-Net's architecture (built from the same
             config; parameter counts printed side by side) with torch Adam
             (foreach), clip_grad_norm_ and a foreach EMA update, the loop
             of diffusers' train_unconditional example, on cuda if torch
             sees a GPU else the CPU, at --unet_batch; bfloat16 (--dtype,
             by default on cuda) runs it under torch.autocast, parameters
             float32 as in the JAX rows. It runs first, before JAX takes the
             device (and, on a GPU, most of its memory); torch's cache is
             emptied afterwards.
Each JAX row: lower and compile (timed), one untimed call, then --steps calls
timed together up to block_until_ready on the last (steps overlap as in
training: the state is donated from one call to the next). Printed: steps/s,
images/s, the model TFLOP/s per device and MFU (diffusion_jax/flops.py: XLA's
cost analysis of the lowered step; datasheet peaks, a CPU's measured matmul
rate), the device's peak_bytes_in_use (memory_stats(): the process's peak so
far, so a later row shows at least an earlier row's peak; n/a on CPU) and XLA's
memory analysis of the compiled step (temp bytes: activations and scratch).
The diffusers row gets the U-Net's XLA FLOPs when the parameter counts agree
(the same model) and torch runs on JAX's kind of device (the same peak),
torch.cuda.max_memory_allocated on a GPU, and its first call
(cuDNN's autotuning, allocations) in the compile column.

--dtype: the models' compute dtype (parameters stay float32); default
bfloat16 on GPU and TPU, float32 on CPU. `--smoke`: the smoke U-Net
(common.smoke_model, temb_dim 4 ch as diffusers'), a 2-block DiT on 8x8 latents, batch 2, 2 steps
(tests/test_benchmarks.py).
"""

import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see vs_diffusers.py
import contextlib
import importlib.util
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
import numpy as np

from benchmarks import common
from configs import cifar10_ddpm, default
from diffusion_jax import flops as flops_lib
from diffusion_jax import parallel
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer('steps', 20, 'Timed steps per row (after one warm-up).')
flags.DEFINE_integer('unet_batch', 128, 'Batch of the U-Net rows.')
flags.DEFINE_integer('dit_batch', 128, 'Batch of the DiT row.')
flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                  'Compute dtype; default bfloat16 on GPU/TPU, float32 on CPU.')
flags.DEFINE_list('models', ['unet', 'dit'], 'JAX rows: unet and/or dit.')
flags.DEFINE_bool('torch', True, "diffusers' UNet2DModel row, when torch and "
                  'diffusers import.')
common.define_smoke_flags()
FLAGS = flags.FLAGS

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'diffusers'))


def unet_config(smoke: bool):
  """The paper's CIFAR-10 U-Net (--smoke: the smoke U-Net with diffusers'
  time embedding width, 4 ch, so that both sides are the same model),
  data-free."""
  if smoke:
    config = common.smoke_model(default.get_config())
    config.model.temb_dim = 4 * config.model.ch
  else:
    config = cifar10_ddpm.get_config()
  return _data_free(config)


def dit_config(smoke: bool):
  """DiT-B/2 on 32x32x4 latents (common.dit_b2_config), data-free."""
  return _data_free(common.dit_b2_config(smoke))


def _data_free(config):
  config.sample_grid.every_steps = config.sample_quality.every_steps = 0
  config.posthoc_ema.sigma_rels = ()
  config.steps_per_call = config.grad_accum_steps = 1
  return config


def unet2d_config(config) -> dict:
  """diffusers.UNet2DModel's arguments for the config's U-Net (for the
  paper's: google/ddpm-cifar10-32's config, as vs_diffusers.CIFAR10_UNET)."""
  m, size = config.model, config.data.image_size
  attn = [size // 2 ** i in m.attn_resolutions for i in range(len(m.ch_mult))]
  return dict(
      act_fn='silu', attention_head_dim=None,
      block_out_channels=[m.ch * k for k in m.ch_mult],
      center_input_sample=False,
      down_block_types=['AttnDownBlock2D' if a else 'DownBlock2D'
                        for a in attn],
      up_block_types=['AttnUpBlock2D' if a else 'UpBlock2D'
                      for a in attn[::-1]],
      downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
      in_channels=config.data.channels, out_channels=config.data.channels,
      layers_per_block=m.num_res_blocks, mid_block_scale_factor=1,
      norm_eps=1e-6, norm_num_groups=m.num_groups, sample_size=size,
      time_embedding_type='positional', dropout=m.dropout)


def jax_row(name, config, batch, dtype, mesh) -> dict:
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  exp, state, images = common.experiment_state_and_images(config, batch, mesh)
  num_params = sum(int(np.prod(x.shape))
                   for x in jax.tree.leaves(state.params))
  start = time.perf_counter()
  lowered = exp.jit_train_step().lower(state, images)
  flops = flops_lib.step_flops(lowered)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  state, metrics = compiled(state, images)  # untimed: warms the allocator
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = compiled(state, images)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  stats = jax.devices()[0].memory_stats() or {}
  del state, metrics, images
  return dict(model=name, framework=f'jax {jax.__version__}', dtype=dtype,
              batch=batch, params=num_params, compile_s=compile_s,
              seconds=seconds, flops=flops,
              peak_bytes=stats.get('peak_bytes_in_use'),
              xla_temp_bytes=(int(memory.temp_size_in_bytes) if memory
                              else None))


def torch_row(config, batch, dtype: str | None) -> dict:
  """diffusers' UNet2DModel + torch Adam, clipping and EMA (vs_diffusers.py's
  Theirs.step), on cuda if available (dtype None: bfloat16 there, else
  float32); its steps are not synchronised until the last, like the JAX
  rows'."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  cuda = device == 'cuda'
  dtype = dtype or ('bfloat16' if cuda else 'float32')  # as the JAX rows'
  sync = torch.cuda.synchronize if cuda else lambda: None
  torch.manual_seed(0)
  model = diffusers.UNet2DModel(**unet2d_config(config)).to(device).train()
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=2e-4, foreach=True)
  d = config.diffusion
  betas = torch.linspace(d.beta_start, d.beta_end, d.num_timesteps,
                         dtype=torch.float64)
  abar = torch.cumprod(1 - betas, 0)
  sqrt_abar = abar.sqrt().float().to(device)
  sqrt_1m_abar = (1 - abar).sqrt().float().to(device)
  size, channels = config.data.image_size, config.data.channels
  images = torch.rand(batch, channels, size, size, device=device) * 2 - 1
  autocast = (torch.autocast(device, dtype=torch.bfloat16)
              if dtype == 'bfloat16' else contextlib.nullcontext())

  def step():
    t = torch.randint(0, d.num_timesteps, (batch,), device=device)
    noise = torch.randn_like(images)
    x_t = (sqrt_abar[t].view(-1, 1, 1, 1) * images +
           sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise)
    with autocast:
      pred = model(x_t, t).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip_norm)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1 - config.optim.ema_decay)  # pylint: disable=protected-access

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  step()
  sync()
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    step()
  sync()
  seconds = time.perf_counter() - start
  row = dict(model='diffusers UNet2DModel',
             framework=f'torch {torch.__version__} ({device})',
             device=device, dtype=dtype,
             batch=batch, params=sum(p.numel() for p in params),
             compile_s=first_s, seconds=seconds, flops=None,
             peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
             xla_temp_bytes=None)
  del model, params, ema, opt, images
  if cuda:
    torch.cuda.empty_cache()  # leave the GPU to JAX
  return row


def finish(row, peak_tflops) -> dict:
  """Adds steps/s, images/s, TFLOP/s per device and MFU to a row."""
  row['steps_per_sec'] = FLAGS.steps / row['seconds']
  row['images_per_sec'] = row['batch'] * row['steps_per_sec']
  row.update(flops_lib.throughput(row['flops'], row['steps_per_sec'], 1,
                                  peak_tflops))
  return row


def _fmt(x, spec, scale=1.0):
  return 'n/a' if x is None else format(x / scale, spec)


def print_table(report) -> None:
  print(f'\n# {report["device_kind"]} ({report["platform"]}); jax '
        f'{report["jax_version"]}; {report["date"]}; {report["steps"]} timed '
        f'steps after 1 warm-up; peak {_fmt(report["peak_tflops"], ".4g")} '
        f'TFLOP/s per device ({report["peak_source"]})\n')
  print('| model | framework | dtype | batch | params | compile s | steps/s '
        '| images/s | TFLOP/s per device | MFU | peak memory GiB '
        '| XLA temp GiB |\n| --- | --- | --- | ---: | ---: | ---: | ---: '
        '| ---: | ---: | ---: | ---: | ---: |')
  for r in report['rows'].values():
    if 'error' in r:
      print(f'| {r["model"]} | {r["framework"]} | failed: {r["error"]} |')
      continue
    print(f'| {r["model"]} | {r["framework"]} | {r["dtype"]} | {r["batch"]} '
          f'| {r["params"] / 1e6:.2f}M | {r["compile_s"]:.1f} '
          f'| {r["steps_per_sec"]:.3g} | {r["images_per_sec"]:.4g} '
          f'| {_fmt(r.get("tflops_per_device"), ".3g")} '
          f'| {_fmt(r.get("mfu"), ".1%")} '
          f'| {_fmt(r["peak_bytes"], ".2f", 2 ** 30)} '
          f'| {_fmt(r["xla_temp_bytes"], ".2f", 2 ** 30)} |')
  print('\ncompile s: lowering + XLA compilation (the diffusers row: its '
        'first call). peak memory: the device\'s peak_bytes_in_use so far in '
        'this process (JAX rows, in order) or torch.cuda.max_memory_allocated.')


def main(argv):
  del argv
  common.apply_smoke(steps=2, unet_batch=2, dit_batch=2)
  unknown = set(FLAGS.models) - {'unet', 'dit'}
  if unknown:
    raise app.UsageError(f'--models: unknown {sorted(unknown)} (unet, dit)')
  configs = {'unet': unet_config(FLAGS.smoke), 'dit': dit_config(FLAGS.smoke)}
  batches = {'unet': FLAGS.unet_batch, 'dit': FLAGS.dit_batch}
  names = {'unet': 'DDPM CIFAR-10 U-Net', 'dit': 'DiT-B/2 32x32x4'}
  if FLAGS.smoke:
    names = {'unet': 'smoke U-Net', 'dit': 'DiT 2-block 8x8x4'}
  rows = {}
  # First: before JAX's backend starts (on a GPU it takes 75% of the memory).
  if FLAGS.torch and HAVE_TORCH:
    print('diffusers UNet2DModel (torch) ...', flush=True)
    try:
      rows['diffusers'] = torch_row(configs['unet'], FLAGS.unet_batch,
                                    FLAGS.dtype)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()  # the JAX rows still run
      rows['diffusers'] = dict(model='diffusers UNet2DModel',
                               framework='torch', error=repr(e)[:200])
  platform = jax.default_backend()
  dtype = FLAGS.dtype or ('float32' if platform == 'cpu' else 'bfloat16')
  mesh = parallel.create_mesh(jax.devices()[:1])
  for key in FLAGS.models:
    print(f'{names[key]} (jax) ...', flush=True)
    rows[key] = jax_row(names[key], configs[key], batches[key], dtype, mesh)
  peak_tflops, peak_source = flops_lib.device_peak(jax.devices()[0])
  unet = rows.get('unet')
  theirs = rows.get('diffusers')
  if unet and theirs and 'error' not in theirs:
    same_device = theirs['device'] == {'gpu': 'cuda'}.get(platform, platform)
    if theirs['params'] != unet['params']:
      print(f'note: diffusers UNet2DModel has {theirs["params"]:,} '
            f'parameters, ours {unet["params"]:,}: no FLOPs for its row')
    elif same_device:  # the same model: the same FLOPs, the same peak
      theirs['flops'] = unet['flops']
  for r in rows.values():
    if 'error' not in r:
      finish(r, peak_tflops)
  order = [k for k in ('unet', 'diffusers', 'dit') if k in rows]
  report = dict(device_kind=jax.devices()[0].device_kind, platform=platform,
                jax_version=jax.__version__,
                date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                steps=FLAGS.steps, dtype=dtype, peak_tflops=peak_tflops,
                peak_source=peak_source, have_torch=HAVE_TORCH,
                rows={k: rows[k] for k in order})
  print_table(report)
  common.write_json(FLAGS.json_out, report)


if __name__ == '__main__':
  app.run(main)
