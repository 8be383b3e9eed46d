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
             XLA_FLAGS='--xla_backend_optimization_level=0 '
             '--xla_llvm_disable_expensive_passes=true')
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
