"""Every script in benchmarks/ runs, and reports figures that agree.

Issue 12: benchmarks must not rot silently. Each script runs once as a user
runs it (a subprocess from the repo root) with --smoke (tiny sizes) and
--json_out, and the figures it printed are checked against each other:
times positive and finite, rates = amount / seconds, ratios = the quotients
of the reported times. A new script without a smoke case fails
test_every_script_has_a_smoke_case.

The scripts that compile a U-Net (even the tiny smoke one: ~15-30 s each on
2 cores) or run Inception are marked slow; run everything with
  pytest tests/test_benchmarks.py -m 'slow or not slow'
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.compile_flags import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELPERS = {'common'}  # modules of benchmarks/ that are not scripts
HAVE_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'diffusers'))

# script -> (extra arguments of its smoke run, slow?)
SMOKE = {
    'conv_grad': ([], False),
    'group_norm': ([], False),
    'input_pipeline': ([], False),
    'train_step': ([], False),
    'profile_step': ([], True),
    'toy2d': ([], True),
    'fid_features': ([], True),
    'objectives_digits': ([], True),
    'scaling': ([], True),
    'sharding_memory': ([], True),
    'caption_control': ([], True),
    'remat_memory': ([], True),
    'families': ([], True),
    'accelerator_check': ([], True),
    'first_run': ([] if HAVE_TORCH else ['--no-diffusers'], True),
    # Class-conditional, so guidance weights and class accuracy run too.
    'quality_vs_nfe': (['--config=digits_cfg', '--guidance_scales=0,2'],
                       True),
    # --malloc=ab: every candidate through with_malloc_variants (SelfTimed).
    'vs_diffusers': (['--malloc=ab'] + ([] if HAVE_TORCH else ['--notorch']),
                     True),
    # bfloat16: its float32 agreement check compiles a forward of its own,
    # and torch runs under autocast.
    'dit_speed': (['--dtype=bfloat16'] + ([] if HAVE_TORCH else
                                          ['--notorch']), True),
}


def close(a, b):
  return math.isclose(a, b, rel_tol=1e-6)


def positive(*xs):
  for x in xs:
    assert math.isfinite(x) and x > 0, xs


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  """One persistent XLA cache for the module's runs: train_step,
  profile_step and vs_diffusers compile the same step."""
  return str(tmp_path_factory.mktemp('xla_cache'))


def run_smoke(name, tmp_path, compile_cache) -> dict:
  out = tmp_path / f'{name}.json'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
             TMPDIR=str(tmp_path), JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             # Not conftest's 8 devices (scaling.py sets its own); LLVM
             # without its optimisations halves the tiny U-Net's compile.
             XLA_FLAGS=FAST_COMPILE)
  cmd = [sys.executable, f'benchmarks/{name}.py', '--smoke',
         f'--json_out={out}', *SMOKE[name][0]]
  if name == 'objectives_digits':
    cmd.append(f'--workdir={tmp_path / "runs"}')
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1200)
  if proc.returncode:  # the whole traceback: it says what broke
    pytest.fail(f'{" ".join(cmd)} exited with {proc.returncode}:\n'
                f'{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}', pytrace=False)
  return json.loads(out.read_text())


def check_first_run(report):
  floor = report['floor']
  positive(floor['floor_fd_mean'], floor['floor_fd_std'] + 1)
  assert report['num_samples'] == 16 and report['cpu']
  ours = report['runs']['main job']
  positive(ours['train_s'], ours['sample_s_per_set'], ours['fd_mean'])
  assert ours['train_steps'] == 20
  if HAVE_TORCH:
    theirs = report['runs']['diffusers tutorial']
    assert theirs['num_params'] == 3_990_017 and theirs['train_steps'] > 0
    positive(theirs['train_s'], theirs['fd_mean'])


def check_quality_vs_nfe(report):
  """Every sampler of the class-conditional ddpm checkpoint ran within its
  NFE budget of 3 (EDM's Heun: 2 levels, 3 calls) at w = 0 and, with two
  evaluations per call under guidance, at w = 2, plus the 4-step ancestral
  reference; class accuracies are fractions."""
  rows = {(r['sampler'], r['nfe']) for r in report['rows']}
  samplers = [('ddim', 3), ('edm', 3), ('dpm_solver_pp', 3), ('unipc', 3),
              ('ddpm', 3), ('ddpm', 4)]
  # The last rows: the run itself through --run, with its own DDIM 100 at
  # its config's w = 1 (two evaluations per call), and with an override.
  assert rows == {*[(f'{s} w=0', n) for s, n in samplers],
                  *[(f'{s} w=2', 2 * n) for s, n in samplers],
                  ('quality_vs_nfe_smoke', 200),
                  ('quality_vs_nfe_smoke sample.num_steps=4', 8)}, rows
  assert report['num_samples'] == 16 and report['cpu']
  for r in report['rows']:
    positive(r['fd'], r['sample_s'])
    assert 0.0 <= r['accuracy'] <= 1.0
  positive(report['floor']['floor_fd_mean'])
  assert os.path.exists(report['plot'])


def check_conv_grad(report):
  assert len(report) == 2  # the smoke shapes
  for shape in report.values():
    cands = shape['candidates']
    assert {'xla fwd', 'taps dw', 'chunks dw', 'xla fwd+grads',
            'chunks fwd+grads'} <= set(cands)
    for c in cands.values():
      positive(*c['times'], shape['flop'])
      assert close(c['median_s'], np.median(c['times']))
      assert close(c['gflop_per_s'],
                   c['passes'] * shape['flop'] / c['median_s'] / 1e9)


def check_sharding_memory(report):
  for model in ('unet256', 'dit_xl2'):
    one, eight = report[f'{model} fsdp 1'], report[f'{model} fsdp 8']
    state = lambda r: sum(r['state'][k] for k in ('params', 'ema',
                                                  'optimizer'))
    assert state(eight) < state(one) / 4  # vectors stay replicated
    assert eight['xla']['argument'] < one['xla']['argument']
    assert one['collectives']['all-gather'][0] == 0
    assert eight['collectives']['all-gather'][0] > 0


def check_caption_control(report):
  # 20 captions ("a thick 3") x the smoke's two guidance weights.
  assert len(report['captions']) == 20
  assert len(report['rows']) == 2 * 20
  for row in report['rows']:
    assert 0 <= row['digit_accuracy'] <= 1
    assert 0 <= row['weight_accuracy'] <= 1
  assert set(report['means']) == {'0', '2'}
  assert all(os.path.exists(p) for p in report['plots'].values())


def check_remat_memory(report):
  # At smoke sizes scratch, not activations, fills the temporaries (that
  # 'full' keeps fewer is tests/test_remat.py's): every policy compiled,
  # ran, and kept the same parameters. bfloat16 parameters with a float32
  # master copy: the state grows by exactly 2 bytes per parameter (18 bytes
  # against params + EMA + Adam's 16).
  assert report['policies'] == ['none', 'dots_saveable', 'full']
  assert report['precisions'] == ['float32', 'bfloat16']
  for model in report['models']:
    rows = [report[f'{model} {p} {q}'] for p in report['policies']
            for q in report['precisions']]
    assert all(r['temp'] > 0 and r['grad_temp'] > 0
               and r['seconds_per_step'] > 0 for r in rows)
    assert len({r['num_params'] for r in rows}) == 1
    f32, bf16 = (report[f'{model} none {q}'] for q in report['precisions'])
    assert bf16['argument'] - f32['argument'] == 2 * f32['num_params']


def check_accelerator_check(report):
  # Both JAX rows, and diffusers' iff torch and diffusers import; rates from
  # the timed seconds; TFLOP/s and MFU from XLA's FLOPs and the peak.
  rows = report['rows']
  assert set(rows) == {'unet', 'dit', *(['diffusers'] if HAVE_TORCH else [])}
  for r in rows.values():
    assert 'error' not in r, r
    positive(r['steps_per_sec'], r['compile_s'], r['params'])
    assert close(r['steps_per_sec'], report['steps'] / r['seconds'])
    assert close(r['images_per_sec'], r['batch'] * r['steps_per_sec'])
  for r in (rows['unet'], rows['dit']):
    assert r['batch'] == 2 and r['dtype'] == 'float32'
    positive(r['flops'], r['xla_temp_bytes'], report['peak_tflops'])
    assert close(r['tflops_per_device'],
                 r['flops'] * r['steps_per_sec'] / 1e12)
    assert close(r['mfu'], r['tflops_per_device'] / report['peak_tflops'])
  assert report['platform'] == 'cpu' and report['steps'] == 2
  if HAVE_TORCH:  # the same model as the U-Net row: its FLOPs, the CPU peak
    theirs = rows['diffusers']
    assert theirs['params'] == rows['unet']['params']
    assert theirs['flops'] == rows['unet']['flops']
    assert close(theirs['mfu'], theirs['flops'] * theirs['steps_per_sec']
                 / 1e12 / report['peak_tflops'])


def check_families(report):
  # Every family trained, was evaluated and sampled; bits/dim where the
  # family defines them (none for the GAN).
  rows = report['rows']
  assert [r['family'] for r in rows] == ['ddpm', 'iddpm', 'glow', 'vae',
                                         'gan', 'pixelcnn']
  for r in rows:
    assert r['params'] > 0 and 1 <= r['train_steps'] <= 3
    positive(r['train_seconds'], r['samples_per_sec'], r['fd'], r['is'])
    if r['family'] == 'gan':
      assert r['bits_per_dim'] is None
    else:
      positive(r['bits_per_dim'], r['bpd_stderr'] + 1)
      assert r['bpd_images'] == 8
  positive(report['floor']['floor_fd_mean'])
  assert os.path.exists(report['png'])


def check_group_norm(report):
  for shape in report.values():
    assert set(shape['times']) == {'flax fwd', 'flax fwd+bwd', 'ours fwd',
                                   'ours fwd+bwd'}
    for name, times in shape['times'].items():
      positive(*times)
      assert close(shape['median_s'][name], np.median(times))


def check_input_pipeline(report):
  assert len(report) == 4  # 2 data sets x 2 prefetch settings
  for case in report.values():
    positive(case['seconds'], case['images'])
    assert close(case['images_per_s'], case['images'] / case['seconds'])


def check_train_step(report):
  positive(report['compile_s'], report['step_min_s'], report['step_flops'],
           report['forward_median_s'], report['forward_flops'])
  assert report['step_min_s'] <= report['step_median_s']
  b = report['batch_size']
  assert close(report['step_images_per_s'], b / report['step_median_s'])
  assert close(report['forward_images_per_s'], b / report['forward_median_s'])
  assert report['forward_flops'] < report['step_flops']


def check_profile_step(report):
  positive(report['wall_s'], report['op_s'])
  assert close(sum(report['kinds'].values()), report['op_s'])
  top = list(report['top_ops'].values())
  assert top == sorted(top, reverse=True) and top[0] <= report['op_s']
  assert any(k.startswith('conv') for k in report['kinds'])


def check_samples_table(report, rows_per_objective):
  rows, floor, names = report['rows'], report['floor'], report['objectives']
  assert [r['objective'] for r in rows] == [
      n for n in names for _ in range(rows_per_objective)]
  for r in rows + [floor]:
    assert math.isfinite(r['swd']) and math.isfinite(r['mmd'])
  for r in rows:
    positive(r['train_s'], r['sample_s'])


def check_toy2d(report):
  assert len(report['objectives']) == 8  # all of them, one sampler each
  check_samples_table(report, 1)


def check_objectives_digits(report):
  assert report['objectives'] == ['ddpm_eps']  # 4 samplers
  check_samples_table(report, 4)
  # The digits classifier's FD: 2-step samples of a 2-step model are far
  # from the test split, real training digits near it.
  positive(report['floor']['fd'], *[r['fd'] for r in report['rows']])
  assert all(r['fd'] > report['floor']['fd'] for r in report['rows'])


def check_fid_features(report):
  positive(report['compile_s'], report['per_image_s'])
  fid = report['fid']
  assert all(math.isfinite(v) and v > -1e-3 for v in fid.values())
  # Even a random network puts real digits nearer the test split than noise.
  assert fid['digits train images'] < fid['uniform noise']


def check_scaling(report):
  meshes = report['meshes']
  for m in meshes.values():
    positive(m['steps_per_s'], m['param_bytes'])
  assert not meshes['1-device mesh']['collectives']
  for name in ('8-device mesh', '8-device mesh, grad_accum_steps=4'):
    reduced = sum(b for op, b, _ in meshes[name]['collectives']
                  if op == 'all-reduce')
    assert reduced >= meshes[name]['param_bytes']  # the gradients
  assert close(report['eight_vs_one'],
               meshes['8-device mesh']['steps_per_s'] /
               meshes['1-device mesh']['steps_per_s'])
  assert len(report['processes']) == 2
  positive(*report['processes'].values())


def check_vs_diffusers(report):
  positive(*report['peaks'].values())
  assert report['batches']
  for b, parts in report['batches'].items():
    b = int(b)
    assert set(parts) == {'train', 'forward', 'sample'}
    for part in (parts['train'], parts['forward']):
      cands = part['candidates']
      assert any(n.endswith('+bigheap') for n in cands)  # --malloc=ab
      assert ('diffusers+torch+bigheap' in cands) == HAVE_TORCH
      for name, c in cands.items():
        positive(*c['times'])
        assert close(c['median_s'], np.median(c['times']))
        assert close(c['images_per_s'], b / c['median_s'])
        if part['ref'] and name != part['ref']:
          assert close(c['speedup_vs_ref'], np.median(
              np.array(cands[part['ref']]['times']) / c['times']))
    sample, n = parts['sample'], parts['sample']['num_steps']
    loop, fwd = sample['times'][f'sampler x{n}'], sample['times']['forward']
    positive(*loop, *fwd)
    assert close(sample['overhead'],
                 np.median(np.array(loop) / n / fwd) - 1)


def check_dit_speed(report):
  b = report['batch']
  assert report['cpu'] and report['dtype'] == 'bfloat16'
  assert list(report['variants']) == ['tiny/2']
  for v in report['variants'].values():
    params = v['params']
    positive(params['ours'], params['embedder'], *v['compile_s'].values())
    for kind in ('forward', 'train'):
      part = v[kind]
      positive(part['flops'])
      cands = part['candidates']
      assert set(cands) == ({'ours', 'diffusers+torch'} if HAVE_TORCH
                            else {'ours'})
      for c in cands.values():
        positive(*c['times'])
        assert close(c['median_s'], np.median(c['times']))
        assert close(c['ms'], 1e3 * c['median_s'])
        assert close(c['images_per_s'], b / c['median_s'])
        assert close(c['gflop_per_s'], part['flops'] / c['median_s'] / 1e9)
      if HAVE_TORCH:
        assert close(part['ours_over_theirs'], np.median(
            np.array(cands['ours']['times']) /
            cands['diffusers+torch']['times']))
    assert v['forward']['flops'] < v['train']['flops']
    if HAVE_TORCH:
      # One embedder copy per diffusers block; the same function (float32)
      # and, in bfloat16, nearly the same first loss.
      assert params['diffusers'] == params['ours'] + (
          v['depth'] - 1) * params['embedder']
      assert v['agreement']['max_rel_diff'] <= 1e-4
      assert v['agreement']['bf16_max_rel_diff'] < 0.05
      loss = v['first_loss']
      assert close(loss['rel_diff'], abs(loss['ours'] - loss['diffusers+torch'])
                   / abs(loss['diffusers+torch']))
      assert loss['rel_diff'] < 0.01


CHECKS = {name[len('check_'):]: fn for name, fn in globals().items()
          if name.startswith('check_') and name != 'check_samples_table'}


def test_every_script_has_a_smoke_case():
  scripts = {p.stem for p in (ROOT / 'benchmarks').glob('*.py')} - HELPERS
  assert set(SMOKE) == scripts
  assert set(CHECKS) == scripts


@pytest.mark.parametrize('name', [
    pytest.param(name, marks=[pytest.mark.slow] if slow else [])
    for name, (_, slow) in SMOKE.items()])
def test_smoke(name, tmp_path, compile_cache):
  CHECKS[name](run_smoke(name, tmp_path, compile_cache))


def test_accelerator_check_sh_dry_run_prints_the_cpu_plan(tmp_path):
  """accelerator_check.sh --dry_run with no nvidia-smi on PATH: the CPU plan
  (a new venv from requirements.txt, no other jax build) and the smoke
  command, creating and installing nothing; ACCELERATOR=gpu pins the jax of
  requirements.txt. Only bash runs (well under a second)."""
  if list(pathlib.Path('/dev').glob('accel*')):
    pytest.skip('a TPU host: its plan is not the CPU one')
  path = os.pathsep.join(
      d for d in os.environ['PATH'].split(os.pathsep)
      if not os.path.exists(os.path.join(d, 'nvidia-smi')))
  venv = tmp_path / 'venv'
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('TPU_') and k != 'ACCELERATOR'}
  env.update(PATH=path, VENV=str(venv))
  run = lambda **extra: subprocess.run(
      ['bash', 'benchmarks/accelerator_check.sh', '--dry_run', '--steps=3'],
      cwd=ROOT, env=dict(env, **extra), capture_output=True, text=True,
      timeout=30)
  proc = run()
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert out.startswith('platform: cpu'), out
  assert f'python3 -m venv {venv}\n' in out
  assert f'{venv}/bin/python -m pip install --quiet -r requirements.txt' in out
  assert 'jax[' not in out
  assert (f'timeout 540 {venv}/bin/python benchmarks/accelerator_check.py '
          '--steps=3 --smoke') in out
  assert not venv.exists()  # nothing created, nothing installed

  pin = next(line.split('==')[1].strip() for line in
             (ROOT / 'requirements.txt').read_text().splitlines()
             if line.startswith('jax=='))
  proc = run(ACCELERATOR='gpu')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('platform: gpu')
  assert f"pip install -U 'jax[cuda12]=={pin}'" in proc.stdout
  assert not venv.exists()


def test_alternate_never_takes_a_returned_loss_for_a_time(monkeypatch):
  """The bug of 3e2a2b4: diffusers' step returns its loss (a float), which
  alternate() took for a self-measured time (~0.6 s/step instead of ~4 s)."""
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  def step():
    time.sleep(0.05)
    return 0.0012  # the loss
  times = common.alternate({'step': step}, 2, 'test')
  assert min(times['step']) >= 0.05

  # --malloc=ab: each variant times only its second call (a SelfTimed).
  monkeypatch.setattr(common.host_malloc, 'keep_large_buffers',
                      lambda on=True: None)  # leave pytest's malloc alone
  calls = []

  def settles_slowly():
    time.sleep(0.5 if len(calls) % 2 == 0 else 0.05)  # untimed, timed
    calls.append(1)
    return 0.0012
  times = common.alternate(
      common.with_malloc_variants({'step': settles_slowly}), 1, 'test')
  assert set(times) == {'step', 'step+bigheap'}
  for t in times.values():
    assert 0.05 <= t[0] < 0.5


@pytest.mark.slow  # compiles a DiT forward and step, as test_smoke's
def test_dit_speed_table_has_mfu_and_dtype_labelled_rows(tmp_path):
  """dit_speed.py's printed table (one repetition of the tiny DiT, bfloat16):
  its columns, rows labelled with the dtype of each side, and MFU cells
  that are the JSON's GFLOP/s over the reported peak (flops.device_peak:
  the measured CPU peak here)."""
  out = tmp_path / 'dit_speed.json'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
             TMPDIR=str(tmp_path),
             XLA_FLAGS=FAST_COMPILE)
  cmd = [sys.executable, 'benchmarks/dit_speed.py', '--smoke', '--reps=1',
         '--dtype=bfloat16', f'--json_out={out}',
         *([] if HAVE_TORCH else ['--notorch'])]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  report = json.loads(out.read_text())
  table = [line for line in proc.stdout.splitlines() if line.startswith('|')]
  cols = [c.strip() for c in table[0].strip('|').split('|')]
  assert cols == ['model', 'side', 'params', 'forward ms', 'fwd images/s',
                  'fwd GFLOP', 'fwd GFLOP/s', 'train step ms',
                  'step images/s', 'step GFLOP', 'step GFLOP/s', 'fwd MFU',
                  'step MFU']
  rows = [dict(zip(cols, (c.strip() for c in line.strip('|').split('|'))))
          for line in table[2:]]
  sides = {'ours': 'ours (JAX, bfloat16)',
           'diffusers+torch': 'diffusers + torch (autocast bf16)'}
  want = ['ours', 'diffusers+torch'] if HAVE_TORCH else ['ours']
  assert [r['side'] for r in rows[:len(want)]] == [sides[w] for w in want]
  assert len(rows) == len(want) + HAVE_TORCH  # + the ours / theirs row
  assert report['reps'] == 1 and 'measured' in report['peak_source']
  peak = report['peak_tflops']
  positive(peak)
  v = report['variants']['tiny/2']
  for side, row in zip(want, rows):
    assert row['model'] == 'DiT-tiny/2'
    for kind, col in (('forward', 'fwd MFU'), ('train', 'step MFU')):
      c = v[kind]['candidates'][side]
      assert len(c['times']) == 1
      assert close(c['mfu'], c['gflop_per_s'] / 1e3 / peak)
      assert row[col].endswith('%')
      assert math.isclose(float(row[col][:-1]), 100 * c['mfu'], rel_tol=5e-3)


def test_hlo_collectives_count_every_element_of_a_combined_op():
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  # XLA:CPU all-reduces every gradient in one tuple op: its bytes are the
  # sum of the elements (the sharding table once took the largest alone);
  # an async -start op's tuple is (operands..., results...): results count.
  hlo = '\n'.join([
      'ENTRY %main (p: f32[8]) -> f32[8] {',
      '  %all-reduce.43 = (f32[32,32]{1,0}, f32[96]{0}, bf16[4,4]{1,0}) '
      'all-reduce(%a, %b, %c), replica_groups={}, to_apply=%add',
      '  %ag = f32[16,32]{0,1} all-gather(%x), dimensions={1}',
      '  %ags = (f32[4]{0}, f32[32]{0}) all-gather-start(%y), dimensions={0}',
      '}'])
  assert common.hlo_collectives(hlo) == [
      ('all-reduce', 4 * 32 * 32 + 4 * 96 + 2 * 16, 'main'),
      ('all-gather', 4 * 16 * 32, 'main'), ('all-gather', 4 * 32, 'main')]
