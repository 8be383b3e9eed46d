r"""Post-hoc EMA: choose the EMA length after training (EDM2: Karras et al.
2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
sec. 3 and Appendix C).

Training tracks K power-function EMAs of the parameters
(config.posthoc_ema.sigma_rels; OneOptimizerMethod.train_step) and saves them
every config.posthoc_ema.snapshot_every_steps steps to
<workdir>/ema_snapshots/<step>.npz. Afterwards

  python -m diffusion_jax.posthoc_ema --workdir=RUN --sigma_rel=0.08 \
      --out_workdir=OUT [--step=N]

writes OUT, a run directory whose checkpoint is RUN's at step N with
ema_params replaced by the EMA of relative width sigma_rel, reconstructed
from the snapshots: --mode=sample and --mode=eval then use it.

Why a reconstruction is possible. The power-function EMA with exponent
gamma averages the trajectory theta(tau) over [0, t] with the profile
(eq. 121)
  p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),  0 <= tau <= t,
of relative standard deviation sigma_rel (eq. 123). Its update (eq. 127)
  ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,  beta_t = (1 - 1/t)^(gamma+1)
gives theta_i the weight (1 - beta_i) prod_{j>i} beta_j
= (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), the profile's integral over
(i - 1, i]: the discrete EMA is the profile applied to the trajectory that
holds theta_i on (i - 1, i], exactly. Every snapshot is thus an inner product
<p_i, theta>, and a profile p* is approximated by sum_i x_i p_i with x the
least-squares fit in L2 (Appendix C.3, Algorithm 3): the normal equations
A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p*>, with the inner products in
closed form (eq. 151). The same x applied to the snapshots gives the EMA.
"""

import json
import os
import re

from absl import app, flags, logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import errors, run_config
from diffusion_jax.config_checks import POSTHOC_SIGMA_REL_MAX

SNAPSHOT_DIR = 'ema_snapshots'
_SNAPSHOT_NAME = re.compile(r'^(\d+)\.npz$')
_PARAMS = 'params/'  # key prefix of the (K, ...) stacked tensors in a snapshot


class PostHocEMAError(errors.UserError, ValueError):
  """A reconstruction that cannot be done; the message says why and what to
  do."""


# ----------------------------------------------------------------- math --

def sigma_rel_from_gamma(gamma):
  """Eq. 123: the profile's standard deviation of tau over t,
  sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))."""
  gamma = np.float64(gamma)
  return np.sqrt(gamma + 1.0) / ((gamma + 2.0) * np.sqrt(gamma + 3.0))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
  """The inverse of eq. 123 (eq. 126, Algorithm 2).

  Squared and multiplied out, eq. 123 is the cubic
  gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2.
  sigma_rel(gamma) rises from 0 at gamma = -1 to 0.3003 at
  gamma = (sqrt(5) - 3) / 2 and falls back to 0 as gamma grows, so the cubic
  has two roots above -1; the largest is the one of the decreasing branch.
  sigma_rel must be in (0, POSTHOC_SIGMA_REL_MAX] (gamma >= 0, see
  check_sigma_rel).
  """
  check_sigma_rel(sigma_rel)
  s = float(sigma_rel) ** -2
  roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
  return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def check_sigma_rel(sigma_rel, what: str = '--sigma_rel') -> None:
  """gamma >= 0, i.e. 0 < sigma_rel <= 1 / (2 sqrt(3)) ~ 0.2887 (gamma = 0,
  the plain average of the whole run): below gamma = 0 the profile weights
  the first steps most, which is no moving average."""
  if (isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float))
      or not 0.0 < sigma_rel <= POSTHOC_SIGMA_REL_MAX):
    raise PostHocEMAError(
        f'{what}={sigma_rel!r} is outside (0, {POSTHOC_SIGMA_REL_MAX:.6f}]: '
        'sigma_rel is the EMA length relative to training time; '
        f'{POSTHOC_SIGMA_REL_MAX:.6f} averages the whole run uniformly '
        '(EDM2 tracks 0.05 and 0.10).')


def power_ema_beta(step, gamma: float) -> jax.Array:
  """Eq. 127, beta_t = (1 - 1/t)^(gamma + 1) at the 1-based update count t
  (0 at t = 1: the EMA starts at the first updated params). As
  exp((gamma + 1) log1p(-1/t)): 1 - 1/t in float32 loses 1/t's digits at
  millions of steps, log1p keeps them."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def power_ema_update(emas, params, step, gammas):
  """One update of each tracked EMA (a tuple of param trees, one per gamma)
  after the `step`-th optimizer update; None (tracking off) stays None."""
  if emas is None:
    return None
  def one(ema, gamma):
    beta = power_ema_beta(step, gamma)
    return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema, params)
  return tuple(one(e, g) for e, g in zip(emas, gammas))


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
  """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral over [0, min(t_a, t_b)] of
  (gamma_a+1)(gamma_b+1) tau^(gamma_a+gamma_b) / (t_a^(gamma_a+1)
  t_b^(gamma_b+1)) dtau (eq. 151), broadcast; in logs, since t^gamma
  overflows float64 for long runs and narrow profiles."""
  t_a, g_a, t_b, g_b = np.broadcast_arrays(
      *(np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
  log = (np.log((g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0))
         + (g_a + g_b + 1.0) * np.log(np.minimum(t_a, t_b))
         - (g_a + 1.0) * np.log(t_a) - (g_b + 1.0) * np.log(t_b))
  return np.exp(log)


def solve_weights(steps, gammas, step: float, gamma: float) -> np.ndarray:
  """x with sum_i x_i snapshot_i ~ the gamma-EMA at `step` (Algorithm 3).

  steps, gammas: each snapshot's step and exponent (n,). Least squares
  (lstsq: nearly equal profiles make A ill-conditioned), then x / sum(x):
  every profile integrates to 1, so an exact fit's weights sum to 1, and
  renormalising keeps a constant parameter constant when the fit is not.
  """
  steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
  a = profile_inner_product(steps[:, None], gammas[:, None], steps[None],
                            gammas[None])
  b = profile_inner_product(steps, gammas, step, gamma)
  x = np.linalg.lstsq(a, b, rcond=None)[0]
  return x / np.sum(x)


# ------------------------------------------------------------ snapshots --

def flatten(tree) -> tuple[dict[str, np.ndarray], object]:
  """({'conv_in/kernel': array, ...}, treedef) of a param tree, on host. A
  replicated array is read from this process's copy (no collective)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  def host(x):
    return np.asarray(x.addressable_data(0) if hasattr(
        x, 'addressable_data') else x)
  return ({jax.tree_util.keystr(p, simple=True, separator='/'): host(x)
           for p, x in flat}, treedef)


def write_snapshot(workdir, step: int, emas, gammas, sigma_rels) -> str:
  """<workdir>/ema_snapshots/<step>.npz: each tensor's K EMAs stacked
  (K, ...), the gammas, sigma_rels and step. Written under a temporary
  name, then renamed: a killed write is never listed (list_snapshots takes
  only <int>.npz). On gs:// the rename is a copy, still after the write."""
  directory = epath.Path(workdir) / SNAPSHOT_DIR
  directory.mkdir(parents=True, exist_ok=True)
  flats = [flatten(e)[0] for e in emas]
  arrays = {_PARAMS + k: np.stack([f[k] for f in flats]) for k in flats[0]}
  tmp = directory / f'.{step}.npz.tmp{os.getpid()}'
  with tmp.open('wb') as f:
    np.savez(f, step=np.int64(step), gammas=np.float64(gammas),
             sigma_rels=np.float64(sigma_rels), **arrays)
  final = directory / f'{step}.npz'
  tmp.replace(final)
  return os.fspath(final)


def list_snapshots(workdir) -> dict[int, epath.Path]:
  """step -> path of every complete snapshot of a run."""
  directory = epath.Path(workdir) / SNAPSHOT_DIR
  if not directory.exists():
    return {}
  return {int(m.group(1)): p for p in directory.iterdir()
          if (m := _SNAPSHOT_NAME.match(p.name))}


class SnapshotWriter:
  """What the training loop calls after each compiled call (process 0
  writes; a synchronous write of K param copies)."""

  def __init__(self, workdir, every_steps: int, gammas, sigma_rels):
    self.workdir, self.every_steps = workdir, every_steps
    self.gammas, self.sigma_rels = tuple(gammas), tuple(sigma_rels)

  @classmethod
  def create(cls, exp, workdir) -> 'SnapshotWriter | None':
    """None unless the method tracks power EMAs."""
    sigma_rels = getattr(exp.method, 'power_ema_sigma_rels', ())
    if not sigma_rels:
      return None
    return cls(workdir, exp.loop.ema_snapshot_every_steps,
               exp.method.power_ema_gammas, sigma_rels)

  def after_step(self, state, step: int, is_last: bool) -> None:
    """Every every_steps steps and at the last: the reconstruction needs
    snapshots spread over the run, and the last step's."""
    if step % self.every_steps and not is_last:
      return
    if jax.process_index() == 0:
      path = write_snapshot(self.workdir, step, state.power_ema, self.gammas,
                            self.sigma_rels)
      logging.info('Power EMA snapshot at step %d: %s', step, path)


# ------------------------------------------------------- reconstruction --

def load_run_config(workdir):
  """The ConfigDict a run wrote to <workdir>/config.json (run_config.py)."""
  try:
    return run_config.load(workdir, '--workdir')
  except run_config.RunConfigError as e:
    raise PostHocEMAError(str(e)) from e


def _check_out_workdir(out_workdir) -> None:
  out = epath.Path(out_workdir) / 'checkpoints'
  if out.exists() and any(out.iterdir()):
    raise PostHocEMAError(
        f'{out} already holds checkpoints; the reconstruction never '
        'overwrites a run: pass a new --out_workdir.')


def _gammas(path) -> np.ndarray:
  with path.open('rb') as f, np.load(f) as snapshot:  # local or gs://
    return np.float64(snapshot['gammas'])


def _weighted_sum(acc, weights, stacked: dict, names, source) -> None:
  """acc[name] += sum_k weights[k] stacked[name][k], in float64."""
  for name in names:
    key = _PARAMS + name
    if key not in stacked:
      raise PostHocEMAError(f'{source} has no tensor {name}: it was written '
                            'by another model; move it out of the run.')
    acc[name] += np.tensordot(weights, np.asarray(stacked[key], np.float64),
                              axes=1)


def reconstruct_run(workdir, sigma_rel: float, out_workdir,
                    step: int | None = None) -> dict:
  """Writes out_workdir (config.json, checkpoints/<step>, posthoc_ema.json)
  from run `workdir` at `step` (default: its newest checkpoint); returns
  what posthoc_ema.json records. Snapshot files before `step` and the power
  EMAs inside the checkpoint at `step` are the snapshots."""
  from diffusion_jax import checkpointing, experiment, parallel  # pylint: disable=g-import-not-at-top
  gamma = gamma_from_sigma_rel(sigma_rel)
  _check_out_workdir(out_workdir)
  config = load_run_config(workdir)
  files = list_snapshots(workdir)
  if not files:
    raise PostHocEMAError(
        f'{epath.Path(workdir) / SNAPSHOT_DIR} holds no snapshots: train with '
        '--config.posthoc_ema.sigma_rels="(0.05, 0.1)" and '
        '--config.posthoc_ema.snapshot_every_steps=N (e.g. num_train_steps '
        '/ 20) to reconstruct afterwards.')
  # One device: the sums run on the host; any machine can reconstruct.
  try:
    exp = experiment.build(config, parallel.create_mesh(jax.devices()[:1]),
                           mode='sample')
  except ValueError as e:  # the run's config, as main.py reports it
    raise errors.ConfigError(str(e)) from e
  ckpt_dir = epath.Path(workdir) / 'checkpoints'
  if not ckpt_dir.exists():
    raise checkpointing.CheckpointError(f'{ckpt_dir} does not exist.')
  ckpt = checkpointing.Checkpointer(os.fspath(ckpt_dir))
  try:
    steps = ckpt.all_steps()
    step = max(steps, default=None) if step is None else step
    if step not in steps:
      raise PostHocEMAError(
          f'no checkpoint at step {step} in {ckpt_dir} (it holds '
          f'{sorted(steps)}): pass one of those as --step.')
    state, data_state = ckpt.restore(exp.abstract_state(), step)
  finally:
    ckpt.close()
  if state.power_ema is None:
    raise PostHocEMAError(f'the checkpoint at step {step} in {ckpt_dir} '
                          'holds no power EMAs (config.posthoc_ema.sigma_rels '
                          'was empty).')
  earlier = sorted(s for s in files if s < step)
  gammas = [_gammas(files[s]) for s in earlier]
  gammas.append(np.float64(exp.method.power_ema_gammas))
  all_steps = np.concatenate([np.full(len(g), s, np.float64) for s, g in zip(
      earlier + [step], gammas)])
  all_gammas = np.concatenate(gammas)
  weights = solve_weights(all_steps, all_gammas, step, gamma)
  template, treedef = flatten(state.ema_params)
  acc = {k: np.zeros(v.shape, np.float64) for k, v in template.items()}
  i = 0
  for s, g in zip(earlier, gammas):
    with files[s].open('rb') as f, np.load(f) as snapshot:
      _weighted_sum(acc, weights[i:i + len(g)], snapshot, template, files[s])
    i += len(g)
  flats = [flatten(e)[0] for e in state.power_ema]
  stacked = {_PARAMS + k: np.stack([f[k] for f in flats]) for k in template}
  _weighted_sum(acc, weights[i:], stacked, template, f'step {step}')
  ema = jax.tree_util.tree_unflatten(treedef, [
      jnp.asarray(acc[k].astype(v.dtype)) for k, v in template.items()])
  experiment.write_config(config, os.fspath(out_workdir))
  out = checkpointing.Checkpointer(
      os.fspath(epath.Path(out_workdir) / 'checkpoints'), asynchronous=False)
  try:
    out.save(step, state.replace(ema_params=ema), data_state)
    out.wait_until_finished()
  finally:
    out.close()
  record = dict(source=os.fspath(workdir), step=step, sigma_rel=sigma_rel,
                gamma=gamma, snapshot_steps=all_steps.tolist(),
                snapshot_gammas=all_gammas.tolist(), weights=weights.tolist())
  (epath.Path(out_workdir) / 'posthoc_ema.json').write_text(
      json.dumps(record, indent=2))
  return record


# --------------------------------------------------------- command line --

def _define_flags() -> None:
  """Only when run as a script: main.py, which imports this module through
  the methods, defines --workdir too."""
  flags.DEFINE_string('workdir', None, 'Run directory trained with '
                      'config.posthoc_ema.sigma_rels set.')
  flags.DEFINE_float('sigma_rel', None, 'EMA length relative to training '
                     f'time, in (0, {POSTHOC_SIGMA_REL_MAX:.6f}].')
  flags.DEFINE_string('out_workdir', None, 'New run directory for the '
                      'reconstruction (never overwritten).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the newest.')
  flags.mark_flags_as_required(['workdir', 'sigma_rel', 'out_workdir'])


def _main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    record = reconstruct_run(f.workdir, f.sigma_rel, f.out_workdir, f.step)
  except errors.UserError as e:
    errors.exit_on_user_error(e)
  logging.info('EMA sigma_rel=%g (gamma %.3f) at step %d from %d snapshots: '
               '%s; sample it with --mode=sample --workdir=%s and the run\'s '
               'config.', record['sigma_rel'], record['gamma'],
               record['step'], len(record['weights']), f.out_workdir,
               f.out_workdir)


if __name__ == '__main__':
  _define_flags()
  app.run(_main)
