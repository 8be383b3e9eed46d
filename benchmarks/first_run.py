r"""The first run: the main job vs the diffusers tutorial recipe, same clock.

  .venv/bin/python benchmarks/first_run.py            # the main job as is
  .venv/bin/python benchmarks/first_run.py --no-diffusers \
      --candidates='model.ch=64;diffusion.prediction=v'   # a sweep

Ours: each candidate (`;`-separated lists of `key=value` config overrides,
'' = the main job unchanged) is the main job run as `./run.sh train` runs
it, `python -m diffusion_jax.main --config=configs/default.py`, timed from
process start to exit; then `--mode=sample` draws `seeds x num_samples`
images with the default sampler (timed), scored as `seeds` sets.

Diffusers (needs torch and diffusers, requirements-convert.txt): the recipe
of diffusers' training tutorial ("Train a diffusion model") scaled to 8x8
digits: UNet2DModel (block_out_channels (64, 128), attention at the second
level, 2 layers per block: 3,990,017 parameters), DDPMScheduler (1,000 steps,
linear betas), AdamW lr 1e-3 with a 500-step linear warm-up, batch 128,
diffusers' EMAModel (decay 0.999 with its default warm-up). It trains in
this process for as long as our first candidate's whole main job took
(start-up, compilation, grids and checkpoints included), then samples
`num_samples` images with its 1,000-step DDPM sampler (timed).

Every set is scored by the digits' own classifier (diffusion_jax/metrics/
classifier.py) against the 300-image test split: the Frechet distance (FD),
KID and IS of sample_quality, beside the floor of `seeds` draws of
`num_samples` real training digits. Only one run should be timed at a time
on the machine. `--smoke`: 20-step runs, 16 samples, 30 s of diffusers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see vs_diffusers.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from benchmarks import common
from configs import default
from diffusion_jax.data import sources
# pylint: enable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSERS_UNET = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=2,
    block_out_channels=(64, 128),
    down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
    up_block_types=('AttnUpBlock2D', 'UpBlock2D'))


def run_ours(overrides: list[str], workdir: str, num_images: int,
             smoke: bool, sample_overrides: list[str] = ()) -> dict:
  """The main job (unless it already ran in workdir), then sample mode with
  extra `sample_overrides`; wall times and the samples."""
  main = [sys.executable, '-m', 'diffusion_jax.main',
          '--config=configs/default.py', f'--workdir={workdir}']
  flags = [f'--config.{o.strip()}' for o in overrides if o.strip()]
  if smoke:
    flags += [f'--config.model.{k}={v}'.replace(' ', '')
              for k, v in common.SMOKE_MODEL.items()]
    flags += ['--config.num_train_steps=20', '--config.log_every_steps=10',
              '--config.checkpoint_every_steps=10',
              '--config.sample_grid.every_steps=10',
              '--config.sample_quality.every_steps=0']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  train_s = None
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    t0 = time.perf_counter()
    subprocess.run(main + flags, cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  subprocess.run(main + flags + [f'--config.{o.strip()}' for o in
                                 sample_overrides if o.strip()] + [
                                     '--mode=sample',
                                     f'--config.sample.num_images={num_images}'],
                 cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  sample_s = time.perf_counter() - t0
  step_dir = sorted(d for d in os.listdir(os.path.join(workdir, 'samples'))
                    if d.startswith('step_'))[-1]
  with np.load(os.path.join(workdir, 'samples', step_dir,
                            'samples.npz')) as f:
    images = f['images']
  with open(os.path.join(workdir, 'config.json')) as f:
    steps = json.load(f)['num_train_steps']
  return dict(train_s=train_s, sample_s=sample_s, images=images,
              train_steps=steps)


def run_diffusers(seconds: float, num_images: int, sample_steps: int,
                  seed: int = 0) -> dict:
  """The tutorial recipe for `seconds` of training, then DDPM sampling."""
  import diffusers
  from diffusers.training_utils import EMAModel
  import torch
  torch.manual_seed(seed)
  t_start = time.perf_counter()
  data = sources.load_split(default.get_config().data, 'train').images
  x_all = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 127.5 - 1
  model = diffusers.UNet2DModel(**DIFFUSERS_UNET)
  num_params = sum(p.numel() for p in model.parameters())
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  warmup = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: min(1.0, (s + 1) / 500))
  ema = EMAModel(model.parameters(), decay=0.999)
  gen = torch.Generator().manual_seed(seed)
  steps = 0
  model.train()
  while time.perf_counter() - t_start < seconds:
    x0 = x_all[torch.randint(0, len(x_all), (128,), generator=gen)]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (128,), generator=gen)
    loss = torch.nn.functional.mse_loss(
        model(scheduler.add_noise(x0, noise, t), t).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    warmup.step()
    ema.step(model.parameters())
    steps += 1
  train_s = time.perf_counter() - t_start
  ema.copy_to(model.parameters())
  model.eval()
  t0 = time.perf_counter()
  scheduler.set_timesteps(sample_steps)
  x = torch.randn((num_images, 1, 8, 8), generator=gen)
  with torch.inference_mode():
    for t in scheduler.timesteps:
      x = scheduler.step(model(x, t).sample, t, x, generator=gen).prev_sample
  sample_s = time.perf_counter() - t0
  images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
  return dict(train_s=train_s, sample_s=sample_s, train_steps=steps,
              num_params=num_params, final_loss=float(loss),
              images=images.permute(0, 2, 3, 1).numpy())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--candidates', default='',
                      help="';'-separated candidates, each ','-separated "
                      "key=value overrides; '' = the main job as is.")
  parser.add_argument('--samplers', default='',
                      help="';'-separated sampler overrides (e.g. "
                      "'sample.num_steps=25;sample.num_steps=100') also "
                      "scored on the first candidate's checkpoint.")
  parser.add_argument('--num_samples', type=int, default=600)
  parser.add_argument('--seeds', type=int, default=3,
                      help='Sample sets of ours and draws of the floor.')
  parser.add_argument('--diffusers', action=argparse.BooleanOptionalAction,
                      default=True)
  parser.add_argument('--diffusers_seconds', type=float, default=0,
                      help='0: as long as our first candidate took.')
  parser.add_argument('--diffusers_sample_steps', type=int, default=1000)
  parser.add_argument('--workdir', default='',
                      help="Where runs go ('' = a temporary directory).")
  args = common.parse_args(parser, num_samples=16, seeds=2,
                           diffusers_seconds=20, diffusers_sample_steps=5)
  root = args.workdir or tempfile.mkdtemp(prefix='first_run_')
  cpu = common.cpu_model()
  print(f'CPU: {cpu}; {os.cpu_count()} CPUs; jax {jax.__version__}; '
        f'load {common.load()}')
  score, network = common.classifier_scorer(default.get_config().data,
                                            os.path.join(root, 'classifier'))
  floor = score(sources.load_split(default.get_config().data, 'train').images[
      :args.num_samples], floor_seeds=args.seeds)
  print(f'classifier: {network.source}')
  print(f'floor: {args.num_samples} real training digits vs the test split: '
        f'FD {floor["floor_fd_mean"]:.2f} +- {floor["floor_fd_std"]:.2f} '
        f'over {args.seeds} draws')
  report = dict(cpu=cpu, num_samples=args.num_samples, floor=floor, runs={})
  first_s = None
  candidates = args.candidates.split(';')
  # (work directory index, overrides, sampler): sampler variants reuse the
  # first candidate's run directory.
  runs = [(i, cand, '') for i, cand in enumerate(candidates)] + [
      (0, candidates[0], s) for s in args.samplers.split(';') if s]
  for run_index, cand, sampler in runs:
    overrides = [o for o in cand.split(',') if o.strip()]
    name = (cand or 'main job') + (f' + {sampler}' if sampler else '')
    res = run_ours(overrides, os.path.join(
        root, f'ours_{run_index}'),
                   args.num_samples * args.seeds, args.smoke,
                   sampler.split(','))
    first_s = first_s or res['train_s']
    sets = [score(res['images'][k * args.num_samples:
                                (k + 1) * args.num_samples])
            for k in range(args.seeds)]
    fds = [s['fd'] for s in sets]
    row = dict(train_s=res['train_s'], train_steps=res['train_steps'],
               sample_s_per_set=res['sample_s'] / args.seeds,
               fd_mean=float(np.mean(fds)), fd_std=float(np.std(fds)),
               kid_mean=float(np.mean([s['kid_mean'] for s in sets])),
               is_mean=float(np.mean([s['is_mean'] for s in sets])))
    report['runs'][name] = row
    print(f'ours [{name}]: main job {row["train_s"] or 0:.0f} s '
          f'({row["train_steps"]} steps); {args.num_samples} samples in '
          f'{row["sample_s_per_set"]:.0f} s; FD {row["fd_mean"]:.2f} +- '
          f'{row["fd_std"]:.2f} ({row["fd_mean"] / floor["floor_fd_mean"]:.2f}'
          f'x floor), KID {row["kid_mean"]:.1f}, IS {row["is_mean"]:.2f}',
          flush=True)
    common.write_json(args.json_out, report)
  if args.diffusers:
    res = run_diffusers(args.diffusers_seconds or first_s, args.num_samples,
                        args.diffusers_sample_steps)
    s = score(res['images'])
    row = dict(train_s=res['train_s'], train_steps=res['train_steps'],
               sample_s_per_set=res['sample_s'], fd_mean=s['fd'],
               kid_mean=s['kid_mean'], is_mean=s['is_mean'],
               num_params=res['num_params'])
    report['runs']['diffusers tutorial'] = row
    print(f'diffusers tutorial recipe ({res["num_params"]:,} params): '
          f'{row["train_s"]:.0f} s training ({row["train_steps"]} steps); '
          f'{args.num_samples} samples ({args.diffusers_sample_steps} steps) '
          f'in {row["sample_s_per_set"]:.0f} s; FD {row["fd_mean"]:.2f} '
          f'({row["fd_mean"] / floor["floor_fd_mean"]:.2f}x floor), KID '
          f'{row["kid_mean"]:.1f}, IS {row["is_mean"]:.2f}')
  print(f'load {common.load()}')
  common.write_json(args.json_out, report)


if __name__ == '__main__':
  main()
