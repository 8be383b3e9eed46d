"""Post-hoc EMA (EDM2, Karras et al. 2024): the profile math against
quadrature and brute force, the reconstruction against EMAs run directly,
and the run-directory round trip (snapshots, resume, reconstruction, bad
input)."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffusion_jax import checkpointing, config_checks, errors, experiment
from diffusion_jax import generate, posthoc_ema, train_state
from tests.util import run_train, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _profile(t, gamma):
  """EDM2 eq. 121 written out: the power-function EMA's weight density."""
  return lambda tau: (gamma + 1) * tau**gamma / t**(gamma + 1) * (tau <= t)


# ------------------------------------------------------------------ math --

def test_sigma_rel_is_the_profiles_relative_std_and_inverts():
  for gamma in (0.0, 1.0, 6.94, 16.97, 50.0):
    density = _profile(1.0, gamma)
    mean = integrate.quad(lambda x: x * density(x), 0, 1)[0]
    second = integrate.quad(lambda x: x * x * density(x), 0, 1)[0]
    np.testing.assert_allclose(posthoc_ema.sigma_rel_from_gamma(gamma),
                               np.sqrt(second - mean**2), rtol=1e-7)
  # Known points: gamma = 0 is the uniform average, std 1 / sqrt(12).
  assert posthoc_ema.sigma_rel_from_gamma(1.0) == pytest.approx(
      np.sqrt(2) / (3 * 2))
  assert posthoc_ema.sigma_rel_from_gamma(0.0) == pytest.approx(
      config_checks.POSTHOC_SIGMA_REL_MAX, abs=1e-15)
  assert config_checks.POSTHOC_SIGMA_REL_MAX == pytest.approx(12**-0.5)
  for sigma_rel in (0.01, 0.05, 0.07, 0.1, 0.2, 0.28):
    gamma = posthoc_ema.gamma_from_sigma_rel(sigma_rel)
    assert gamma > 0
    np.testing.assert_allclose(posthoc_ema.sigma_rel_from_gamma(gamma),
                               sigma_rel, rtol=1e-12)
  # EDM2's tracked pair (sec. 3: gamma 16.97 and 6.94).
  assert posthoc_ema.gamma_from_sigma_rel(0.05) == pytest.approx(16.97,
                                                                 abs=5e-3)
  assert posthoc_ema.gamma_from_sigma_rel(0.10) == pytest.approx(6.94,
                                                                 abs=5e-3)


def test_power_ema_update_is_the_continuous_profile_over_each_step():
  """After t updates, params i carries the profile's mass on (i - 1, i]."""
  gamma, t_end = 3.7, 40
  params = np.random.default_rng(0).normal(size=(t_end, 3))
  update = jax.jit(lambda e, p, t: posthoc_ema.power_ema_update(
      e, p, t, (gamma,)))
  emas = (jnp.full((3,), 1e6, jnp.float32),)  # forgotten: beta_1 = 0
  for t in range(1, t_end + 1):
    emas = update(emas, jnp.float32(params[t - 1]), jnp.int32(t))
  density = _profile(float(t_end), gamma)
  weights = np.array([integrate.quad(density, i - 1, i)[0]
                      for i in range(1, t_end + 1)])
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-10)
  np.testing.assert_allclose(np.asarray(emas[0]), weights @ params,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('t_a,gamma_a,t_b,gamma_b', [
    (100.0, 6.94, 100.0, 16.97), (40.0, 16.97, 100.0, 6.94),
    (100.0, 2.0, 30.0, 0.0), (7.0, 11.2, 7.0, 11.2)])
def test_inner_products_match_quadrature(t_a, gamma_a, t_b, gamma_b):
  p_a, p_b = _profile(t_a, gamma_a), _profile(t_b, gamma_b)
  numeric = integrate.quad(lambda x: p_a(x) * p_b(x), 0, min(t_a, t_b),
                           epsrel=1e-11, limit=200)[0]
  np.testing.assert_allclose(
      posthoc_ema.profile_inner_product(t_a, gamma_a, t_b, gamma_b), numeric,
      rtol=1e-8)
  # Long runs and narrow profiles: t^gamma alone overflows float64.
  big = posthoc_ema.profile_inner_product(1e7, 100.0, 2e7, 60.0)
  assert np.isfinite(big) and big > 0


def test_reconstruction_matches_an_ema_run_with_that_profile():
  """A random walk of 2,000 steps, profiles 0.05 and 0.10 snapshotted every
  100 steps; 0.07 (between) and 0.12 (outside) are also run directly."""
  sigma_rels = (0.05, 0.10, 0.07, 0.12)
  gammas = tuple(map(posthoc_ema.gamma_from_sigma_rel, sigma_rels))
  walk = np.cumsum(np.random.default_rng(1).normal(size=(2000, 16)), axis=0)
  update = jax.jit(lambda e, p, t: posthoc_ema.power_ema_update(
      e, p, t, gammas))
  emas = tuple(jnp.zeros((16,), jnp.float32) for _ in gammas)
  snapshots = {}
  for t in range(1, 2001):
    emas = update(emas, jnp.float32(walk[t - 1]), jnp.int32(t))
    if t % 100 == 0:
      snapshots[t] = np.asarray(emas, np.float64)
  steps = np.repeat(sorted(snapshots), 2).astype(np.float64)
  tracked = np.tile(gammas[:2], len(snapshots))
  values = np.concatenate([snapshots[t][:2] for t in sorted(snapshots)])
  spread = walk.std(axis=0).mean()
  for k in (2, 3):
    weights = posthoc_ema.solve_weights(steps, tracked, 2000, gammas[k])
    error = np.abs(weights @ values - snapshots[2000][k]).max()
    assert error < 2e-3 * spread, (sigma_rels[k], error / spread)
  # A tracked profile at a snapshot step is that snapshot.
  weights = posthoc_ema.solve_weights(steps, tracked, 1500, gammas[0])
  np.testing.assert_allclose(weights @ values, snapshots[1500][0],
                             rtol=1e-6, atol=1e-6 * spread)


# ------------------------------------------------------ run directories --

# The residual MLP on one device: the run's plumbing, compiled in seconds.
TRACKED = {'posthoc_ema.sigma_rels': (0.05, 0.1),
           'posthoc_ema.snapshot_every_steps': 2, 'model.name': 'mlp'}


def _mesh():
  return experiment.parallel.create_mesh(jax.devices()[:1])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A 6-step run, and one stopped at step 3 and resumed to 6."""
  root = tmp_path_factory.mktemp('runs')
  full = jax.device_get(run_train(
      tiny_config(num_train_steps=6, **TRACKED), str(root / 'full'), _mesh()))
  run_train(tiny_config(num_train_steps=3, **TRACKED), str(root / 'resumed'),
            _mesh())
  resumed = jax.device_get(run_train(
      tiny_config(num_train_steps=6, **TRACKED), str(root / 'resumed'),
      _mesh()))
  return root, full, resumed


def test_snapshots_are_written_and_resume_is_bit_exact(runs):
  root, full, resumed = runs
  assert sorted(posthoc_ema.list_snapshots(root / 'full')) == [2, 4, 6]
  assert sorted(posthoc_ema.list_snapshots(root / 'resumed')) == [2, 3, 4, 6]
  assert len(full.power_ema) == 2
  jax.tree.map(np.testing.assert_array_equal, resumed.power_ema,
               full.power_ema)
  jax.tree.map(np.testing.assert_array_equal, resumed.ema_params,
               full.ema_params)
  flat = [posthoc_ema.flatten(e)[0] for e in full.power_ema]
  for run in ('full', 'resumed'):
    with np.load(root / run / 'ema_snapshots' / '6.npz') as snap:
      assert int(snap['step']) == 6
      np.testing.assert_allclose(snap['sigma_rels'], (0.05, 0.1))
      for name in flat[0]:
        np.testing.assert_array_equal(snap['params/' + name],
                                      np.stack([f[name] for f in flat]))
  assert not [p for p in os.listdir(root / 'full' / 'ema_snapshots')
              if 'tmp' in p]


def _load(workdir, **overrides):
  exp = experiment.build(tiny_config(num_train_steps=6, **overrides),
                         _mesh(), mode='sample')
  return generate.load_sample_params(exp, str(workdir))


def test_reconstruction_writes_a_run_that_sample_mode_loads(runs, tmp_path):
  root, full, _ = runs
  out = tmp_path / 'out'
  record = posthoc_ema.reconstruct_run(root / 'full', 0.07, out)
  assert record['step'] == 6 and len(record['weights']) == 6
  # Independently: the weighted sum of the snapshot files 2, 4 and 6.
  names = posthoc_ema.flatten(full.ema_params)[0]
  want = {n: 0.0 for n in names}
  for i, step in enumerate((2, 4, 6)):
    with np.load(root / 'full' / 'ema_snapshots' / f'{step}.npz') as snap:
      for n in names:
        want[n] = want[n] + np.tensordot(
            record['weights'][2 * i:2 * i + 2], snap['params/' + n], axes=1)
  params, step = _load(out, **TRACKED)
  assert step == 6
  got = posthoc_ema.flatten(params)[0]
  for n in names:
    np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-7)
  # The rest of the state is the source run's.
  abstract = experiment.build(tiny_config(num_train_steps=6, **TRACKED),
                              _mesh()).abstract_state()
  ckpt = checkpointing.Checkpointer(str(out / 'checkpoints'))
  state, _ = ckpt.restore(abstract)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               full.params)
  assert (out / 'config.json').exists() and (out / 'posthoc_ema.json').exists()


def test_cli_reconstructs_a_tracked_profile_as_itself(runs, tmp_path):
  root, full, _ = runs
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'diffusion_jax.posthoc_ema',
       f'--workdir={root / "full"}', '--sigma_rel=0.1', f'--out_workdir={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  params, _ = _load(out, **TRACKED)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               jax.device_get(params), full.power_ema[1])


# ----------------------------------------------------------- bad input --

def test_bad_reconstruction_requests_fail_with_the_fix(runs, tmp_path):
  root, _, _ = runs
  run = root / 'full'
  for sigma_rel in (0.0, -0.1, 0.3):
    with pytest.raises(posthoc_ema.PostHocEMAError, match='outside'):
      posthoc_ema.reconstruct_run(run, sigma_rel, tmp_path / 'a')
  with pytest.raises(posthoc_ema.PostHocEMAError,
                     match=r'no checkpoint at step 5.*\[2, 4, 6\]'):
    posthoc_ema.reconstruct_run(run, 0.07, tmp_path / 'b', step=5)
  with pytest.raises(posthoc_ema.PostHocEMAError, match='already holds'):
    posthoc_ema.reconstruct_run(run, 0.07, run)
  bare = tmp_path / 'bare'
  shutil.copytree(run, bare, ignore=shutil.ignore_patterns('ema_snapshots'))
  with pytest.raises(posthoc_ema.PostHocEMAError, match='no snapshots'):
    posthoc_ema.reconstruct_run(bare, 0.07, tmp_path / 'c')
  with pytest.raises(posthoc_ema.PostHocEMAError, match='config.json'):
    posthoc_ema.reconstruct_run(tmp_path / 'nothing', 0.07, tmp_path / 'd')
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'c').exists()
  # The command line: one 'error:' line, exit code 2.
  result = subprocess.run(
      [sys.executable, '-m', 'diffusion_jax.posthoc_ema', f'--workdir={run}',
       '--sigma_rel=0.5', f'--out_workdir={tmp_path / "e"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: --sigma_rel=0.5 is outside')


@pytest.mark.parametrize('overrides,match', [
    ({'posthoc_ema.sigma_rels': (0.05, 0.3)}, r'sigma_rels.*\(0, 0.288675\]'),
    ({'posthoc_ema.sigma_rels': (0.0,)}, r'sigma_rels.*\(0, 0.288675\]'),
    ({'posthoc_ema.sigma_rels': (0.05,)}, 'snapshot_every_steps=0 must'),
    ({'posthoc_ema.sigma_rels': (0.05,), 'steps_per_call': 2,
      'posthoc_ema.snapshot_every_steps': 3}, 'multiple of'),
])
def test_bad_config_fails_naming_the_key(overrides, match):
  with pytest.raises(errors.ConfigError, match=match):
    config_checks.check(tiny_config(**overrides))


def test_off_by_default_and_old_checkpoints_restore(tmp_path):
  """Default: no power EMA in the state. A checkpoint written before the
  power_ema field existed (with loss_history) restores with it None."""
  exp = experiment.build(tiny_config(**{'model.name': 'mlp'}), _mesh())
  state = exp.init_state(jax.random.key(1))
  assert state.power_ema is None
  old = {k: v for k, v in vars(state).items() if k != 'power_ema'}
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(7, old, {'step': 7})
  ckpt.wait_until_finished()
  restored, _ = ckpt.restore(exp.abstract_state(), 7)
  ckpt.close()
  assert isinstance(restored, train_state.TrainState)
  assert restored.power_ema is None
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
