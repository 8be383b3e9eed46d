"""Consistency models (Song et al. 2023; iCT, Song & Dhariwal 2023): the
parameterisation, curriculum, noise-level distribution and metric against
their closed forms; the losses and samplers against the exact consistency
function of Gaussian data, x0 ~ N(MU, S^2), whose probability-flow ODE is
solved in closed form (x(sigma) - MU scales as sqrt(S^2 + sigma^2)); and
iCT and CD runs that train, resume bit-exactly and sample through the
loop."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import experiment, teacher
from diffusion_jax.diffusion import denoiser, edm, sigma_grid
from diffusion_jax.errors import ConfigError
from diffusion_jax.methods import consistency as cm
from diffusion_jax.methods import consistency_distillation as cd
from tests.util import run_sample, run_train, tiny_config

MU, S = 0.3, 0.5
D = denoiser.SIGMA_DATA
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
EDM = {'diffusion.process': 'edm', 'diffusion.prediction': 'edm',
       'diffusion.time_sampling': 'log_normal', 'sample.sampler': 'edm',
       'sample.num_steps': 4}


def exact_f(x, sigma):
  """The consistency function of N(MU, S^2) data: the ODE's solution map
  from sigma to SIGMA_MIN."""
  sigma = denoiser.bcast(sigma, x)
  return MU + jnp.sqrt((S ** 2 + SIGMA_MIN ** 2) / (S ** 2 + sigma ** 2)) * (
      x - MU)


def exact_flow(x, sigma_from, sigma_to):
  return MU + jnp.sqrt((S ** 2 + sigma_to ** 2) / (S ** 2 + sigma_from ** 2)
                       ) * (x - MU)


def gaussian_x0(x, sigma):
  """The optimal denoiser E[x0 | x] of N(MU, S^2) data."""
  sigma = denoiser.bcast(sigma, x)
  return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


class GaussianNet(nn.Module):
  """The network F whose consistency function is exact_f (param kind 1) or
  whose EDM denoiser is the optimal one (kind 0, a diffusion teacher)."""

  @nn.compact
  def __call__(self, inp, c_noise, labels=None, train=False):
    kind = self.param('kind', nn.initializers.ones, ())
    sigma = denoiser.bcast(jnp.exp(4.0 * c_noise), inp)
    x = inp * jnp.sqrt(sigma ** 2 + D ** 2)  # undo c_in
    c_skip, c_out, _ = cm.consistency_coefficients(sigma, SIGMA_MIN)
    safe = jnp.where(c_out > 0, c_out, 1.0)
    f_cm = jnp.where(c_out > 0, (exact_f(x, sigma) - c_skip * x) / safe, 0.0)
    e_skip, e_out, _ = denoiser.edm_coefficients(sigma)
    f_edm = (gaussian_x0(x, sigma) - e_skip * x) / e_out
    return jnp.where(kind > 0.5, f_cm, f_edm)


def _config(method='consistency_training', **overrides):
  return tiny_config(**{'method': method, **EDM, **overrides})


def _unet_config(**overrides):
  """The smallest U-Net of the family (one level, no attention): the
  tests that need the real network compile it in seconds."""
  return _config(**{'model.ch_mult': (1,), 'model.attn_resolutions': (),
                    **overrides})


def _mlp_config(method, **overrides):
  """The loop tests' config: the residual MLP compiles several times
  faster than the U-Net (which the tests above run), and the loop is the
  same."""
  return _config(method, **{'model.name': 'mlp', **overrides})


def _gaussian_method(cls, **overrides):
  config = _config(cls.name, **{'diffusion.clip_denoised': False,
                                'distill.teacher_workdir': 'unused',
                                **overrides})
  return cls.from_config(config, network=GaussianNet(), image_shape=(1, 1, 1))


# ------------------------------------------------------------------ math --


def _perturbed(params):
  """The U-Net's output convolution starts at zero (F = 0 whatever its
  input): every weight nudged, so the output depends on the network."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  return jax.tree.unflatten(tree, [
      p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_boundary_condition_holds_for_a_random_network():
  method = experiment.build(_unet_config()).method
  params = _perturbed(jax.jit(method.init_params)(jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  f = jax.jit(lambda x, s: method.consistency_fn(params)(x, s))
  np.testing.assert_array_equal(f(x, jnp.full((4,), SIGMA_MIN)), x)
  # Elsewhere F matters: f differs from x and from c_skip x.
  sigma = jnp.full((4,), 1.0)
  c_skip = cm.consistency_coefficients(1.0, SIGMA_MIN)[0]
  assert float(jnp.abs(f(x, sigma) - c_skip * x).max()) > 1e-2
  sigma = np.array([0.002, 0.1, 1.0, 80.0])
  c_skip, c_out, c_in = cm.consistency_coefficients(jnp.asarray(sigma),
                                                    SIGMA_MIN)
  np.testing.assert_allclose(
      c_skip, D ** 2 / ((sigma - SIGMA_MIN) ** 2 + D ** 2), rtol=1e-6)
  np.testing.assert_allclose(
      c_out, D * (sigma - SIGMA_MIN) / np.sqrt(D ** 2 + sigma ** 2),
      rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma ** 2 + D ** 2),
                             rtol=1e-6)


@pytest.mark.parametrize('total, s0, s1, expected', [
    # iCT's CIFAR-10 run: K' = 400k / 8 = 50k.
    (400_000, 10, 1280, {0: 11, 49_999: 11, 50_000: 21, 100_000: 41,
                         150_000: 81, 200_000: 161, 250_000: 321,
                         300_000: 641, 349_999: 641, 350_000: 1281,
                         399_999: 1281}),
    # digits_ict: K' = 3000 / 8 = 375.
    (3000, 10, 1280, {374: 11, 375: 21, 2624: 641, 2625: 1281}),
    # s1 / s0 = 100: K' = floor(1000 / (log2(100) + 1)) = 130.
    (1000, 10, 1000, {129: 11, 130: 21, 779: 321, 780: 641, 910: 1001}),
    # Shorter than the 8 doublings: one per step.
    (4, 10, 1280, {0: 11, 1: 21, 3: 81}),
])
def test_curriculum_doubles_as_ict_sec_3_4(total, s0, s1, expected):
  for k, n in expected.items():
    assert int(cm.curriculum_levels(k, total, s0, s1)) == n, k


def test_karras_levels_are_edm_eq_5_ascending():
  for n in (11, 18, 1281):
    want = sigma_grid.spaced_sigmas(n, SIGMA_MIN, SIGMA_MAX, 'karras', 7.0)
    got = cm.karras_levels(jnp.int32(n), 1281, SIGMA_MIN, SIGMA_MAX, 7.0)
    np.testing.assert_allclose(got[:n], want[::-1], rtol=2e-5)
    np.testing.assert_allclose(got[n:], SIGMA_MAX, rtol=2e-5)


def test_lognormal_probabilities_are_erf_differences():
  for n in (11, 161, 1281):
    sigmas = cm.karras_levels(n, 1281, SIGMA_MIN, SIGMA_MAX, 7.0)
    probs = np.asarray(cm.lognormal_index_probs(sigmas, n, -1.1, 2.0))
    s = np.asarray(sigmas, np.float64)[:n]
    cdf = np.array([math.erf((math.log(v) + 1.1) / (math.sqrt(2) * 2.0))
                    for v in s])
    want = np.diff(cdf) / (cdf[-1] - cdf[0])
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(probs[:n - 1], want, rtol=2e-3, atol=1e-7)
    assert not probs[n - 1:].any()


def test_ict_draws_levels_with_those_probabilities():
  """20k draws at step 0 (N = 11): the frequency of each pair within 4.5
  standard errors of p(i); the weight is 1 / (sigma_{i+1} - sigma_i)."""
  method = experiment.build(_config(num_train_steps=400_000)).method
  n = 20_000
  xs = method.draw({'images': jnp.zeros((n, 8, 8, 1)), 'step': 0},
                   jax.random.key(0), None)
  sigmas = np.asarray(cm.karras_levels(11, 11, SIGMA_MIN, SIGMA_MAX, 7.0))
  index = np.searchsorted(sigmas, np.asarray(xs['sigma']) * (1 - 1e-6))
  np.testing.assert_allclose(xs['sigma_next'], sigmas[index + 1], rtol=1e-6)
  np.testing.assert_allclose(xs['weights'], 1 / (sigmas[index + 1]
                                                 - sigmas[index]), rtol=1e-4)
  p = np.asarray(cm.lognormal_index_probs(jnp.asarray(sigmas), 11, -1.1, 2.0))
  freq = np.bincount(index, minlength=10) / n
  assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9)


def test_pseudo_huber_is_its_closed_form_and_its_limits():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 4, 4, 1)).astype(np.float32)
  c = 0.00054 * math.sqrt(16)
  for scale in (1e-6, 1e-3, 1.0, 100.0):
    b = (a + scale * rng.normal(size=a.shape)).astype(np.float32)
    diff = a.astype(np.float64) - b  # the float32 inputs' exact difference
    sq = (diff ** 2).reshape(3, -1).sum(axis=1)
    got = np.asarray(cm.pseudo_huber(jnp.asarray(a), jnp.asarray(b), c))
    np.testing.assert_allclose(got, np.sqrt(sq + c * c) - c, rtol=2e-4,
                               atol=1e-12)
    if scale == 1e-6:  # ||a - b|| << c: ~||a - b||^2 / (2c)
      np.testing.assert_allclose(got, sq / (2 * c), rtol=1e-3)
    if scale == 100.0:  # >> c: ~||a - b|| - c
      np.testing.assert_allclose(got, np.sqrt(sq) - c, rtol=1e-6)
  method = experiment.build(_config()).method
  assert method.settings.huber_c == pytest.approx(0.00054 * 8)


# ----------------------------------------------------- losses on Gaussians --


def test_heun_teacher_step_is_one_step_of_edm_sample():
  """heun_step to sigma_n, then D there, is edm_sample over the grid
  (sigma_{n+1}, sigma_n) (a Heun step, then Euler to 0 = D)."""
  process = edm.EDMProcess()
  d = lambda x, t: denoiser.Denoised(gaussian_x0(x, t), jnp.zeros_like(x))
  z = jax.random.normal(jax.random.key(0), (8, 2, 2, 1))
  levels = sigma_grid.spaced_sigmas(18, SIGMA_MIN, SIGMA_MAX)
  for n in (0, 5, 16):
    hi, lo = levels[n], levels[n + 1]
    grid = sigma_grid.grid_at_sigmas(process, [hi, lo])
    want = edm.edm_sample(d, process, grid, z, jax.random.key(1))
    x = cd.heun_step(lambda x, s: d(x, s).x0, hi * z, jnp.full((8,), hi),
                     jnp.full((8,), lo))
    # float32 rounding of x ~ sigma z: atol ~ a few ulp of hi.
    np.testing.assert_allclose(gaussian_x0(x, lo), want, rtol=1e-5,
                               atol=2e-6 * max(hi, 1.0))


def test_cd_loss_vanishes_for_the_exact_consistency_function():
  """On the exact trajectory the loss is 0; with the teacher's Heun step it
  is Heun's local error, O(h^3) per pair (O(h^6) squared), so it falls
  ~2^6 per doubling of N; a network that is not consistent (the diffusion
  teacher's F) is far off."""
  x0 = MU + S * jax.random.normal(jax.random.key(0), (4096, 1, 1, 1))
  exact, student = {'kind': 0.0}, {'kind': 1.0}
  losses = []
  for n in (18, 36, 72):
    method = _gaussian_method(cd.ConsistencyDistillation, **{
        'consistency.num_levels': n, 'consistency.metric': 'l2'})
    xs = method.draw(x0, jax.random.key(1), {'teacher': exact,
                                             'target': student})
    losses.append(float(method.loss(student, xs, jax.random.key(2))[0]))
    if n == 18:
      sigmas = method.levels()
      index = jnp.searchsorted(sigmas, xs['sigma'] * (1 - 1e-6))
      on_path = dict(xs, target=exact_f(exact_flow(
          xs['x'], denoiser.bcast(xs['sigma'], xs['x']),
          denoiser.bcast(sigmas[index - 1], xs['x'])), sigmas[index - 1]))
      rng = jax.random.key(2)
      assert float(method.loss(student, on_path, rng)[0]) < 1e-12
      wrong = float(method.loss(exact, xs, rng)[0])
  assert losses[0] < 1e-4 and wrong > 1e3 * losses[0], (losses, wrong)
  # Measured: 1.2e-5, 1.4e-7, 1.9e-9 (~2^6 per doubling); 2^5 allows for
  # the random levels drawn.
  assert losses[1] < losses[0] / 32 and losses[2] < losses[1] / 32, losses


def _ict_inputs(shape, sigma, sigma_next, weight):
  x0 = jax.random.normal(jax.random.key(1), shape)
  n = shape[0]
  return dict(x0=x0, noise=jax.random.normal(jax.random.key(2), shape),
              sigma=jnp.full((n,), sigma), sigma_next=jnp.full((n,),
                                                           sigma_next),
              weights=jnp.full((n,), weight))


def test_ict_online_and_target_share_dropout_masks():
  """With sigma_i = sigma_{i+1} the pair is one input: the loss is exactly
  0 under dropout 0.5 only if both calls draw the same masks (while two
  rngs do give different outputs: dropout is on)."""
  method = experiment.build(_unet_config(**{'model.dropout': 0.5})).method
  params = _perturbed(method.init_params(jax.random.key(0)))
  xs = _ict_inputs((4, 8, 8, 1), 0.5, 0.5, 1.0)
  rng = jax.random.key(3)
  assert float(method.loss(params, xs, rng)[0]) == 0.0
  f = lambda r: method.consistency_fn(params, train=True, dropout_rng=r)(
      xs['x0'], xs['sigma'])
  assert float(jnp.abs(f(rng) - f(jax.random.key(4))).max()) > 1e-3


def test_ict_target_is_the_stopped_current_network():
  """The gradient flows through the online call only: the target is the
  current parameters under stop_gradient (no EMA teacher, iCT sec. 3.2)."""
  method = experiment.build(_mlp_config('consistency_training')).method
  params = method.init_params(jax.random.key(0))
  xs = _ict_inputs((4, 8, 8, 1), 0.5, 0.7, 5.0)
  rng = jax.random.key(3)
  x0, z = xs['x0'], xs['noise']
  target = method.consistency_fn(params)(x0 + 0.5 * z, xs['sigma'])

  def online_only(p):
    out = method.consistency_fn(p)(x0 + 0.7 * z, xs['sigma_next'])
    return jnp.mean(5.0 * cm.pseudo_huber(out, target,
                                          method.settings.huber_c))
  loss, _ = method.loss(params, xs, rng)
  assert float(loss) == pytest.approx(float(online_only(params)), rel=1e-5)
  got = jax.grad(lambda p: method.loss(p, xs, rng)[0])(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               got, jax.grad(online_only)(params))


@pytest.mark.parametrize('sample_sigmas', [(), (80.0, 0.821)])
def test_one_and_two_step_sampling_reproduce_the_data(sample_sigmas):
  """Algorithm 1 with the exact consistency function: N(MU, S^2) up to
  O(S / sigma_max) and O(sigma_min); 20k draws (standard errors of mean
  and std 0.0035 and 0.0025)."""
  method = _gaussian_method(cm.ConsistencyTraining, **{
      'consistency.sample_sigmas': sample_sigmas})
  noise = jax.random.normal(jax.random.key(0), (20_000, 1, 1, 1))
  out = np.asarray(jax.jit(method.sample)({'kind': 1.0}, noise,
                                          jax.random.key(1)))
  assert out.mean() == pytest.approx(MU, abs=0.015)
  assert out.std() == pytest.approx(S, abs=0.0125)
  one = method.settings.sample_sigmas == (SIGMA_MAX,)
  assert one == (not sample_sigmas)


# ------------------------------------------------------------ the loop --


def test_ict_trains_resumes_exactly_and_samples(tmp_path):
  config = _mlp_config('consistency_training', **{
      'consistency.sample_sigmas': (80.0, 0.821)})
  straight = run_train(config, str(tmp_path / 'straight'))
  assert int(straight.step) == 4
  config.num_train_steps = 2  # K' = 1 at K = 2 and 4: one curriculum
  run_train(config, str(tmp_path / 'resumed'))
  config.num_train_steps = 4
  resumed = run_train(config, str(tmp_path / 'resumed'))
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.ema_params,
               straight.ema_params)
  out = run_sample(config, str(tmp_path / 'straight'))
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape[0] == 12 and np.isfinite(images).all()


def test_cd_trains_resumes_exactly_and_samples(tmp_path):
  teacher_dir = tmp_path / 'teacher'
  run_train(_mlp_config('diffusion', num_train_steps=2), str(teacher_dir))
  config = _mlp_config('consistency_distillation', **{
      'distill.teacher_workdir': str(teacher_dir),
      'consistency.num_levels': 6})
  straight = run_train(config, str(tmp_path / 'straight'))
  t = teacher.load(config)
  aux = straight.loss_history
  jax.tree.map(np.testing.assert_array_equal, aux['teacher'], t.params)
  # The target is the EMA (mu = 0.95) of a student that started as the
  # teacher and moved: between the two.
  leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0])
  assert not np.allclose(leaf(straight.params), leaf(t.params))
  assert not np.allclose(leaf(aux['target']), leaf(straight.params))
  config.num_train_steps = 2
  run_train(config, str(tmp_path / 'resumed'))
  config.num_train_steps = 4
  resumed = run_train(config, str(tmp_path / 'resumed'))
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.loss_history, aux)
  out = run_sample(config, str(tmp_path / 'straight'))
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape[0] == 12 and np.isfinite(images).all()


@pytest.mark.parametrize('overrides, error, match', [
    ({'consistency.sample_sigmas': (1.0, 2.0)}, ConfigError,
     r'consistency.sample_sigmas=\(1.0, 2.0\) must be strictly decreasing'),
    ({'consistency.sample_sigmas': (100.0,)}, ConfigError,
     r'sample_sigmas=\(100.0,\).*\(0.002, 80.0\]'),
    ({'consistency.metric': 'lpips'}, ConfigError,
     "config.consistency.metric='lpips'"),
    ({'consistency.curriculum_s0': 2000}, ConfigError,
     'curriculum_s0=2000 is above config.consistency.curriculum_s1'),
    ({'consistency.target_ema': 1.0}, ConfigError,
     r'config.consistency.target_ema=1.0 must be in \[0.0, 1.0\)'),
    ({'diffusion.process': 'vp', 'diffusion.prediction': 'eps',
      'sample.sampler': 'euler'}, cm.ConsistencyError,
     "set config.diffusion.process='edm'"),
    ({'model.num_classes': 10}, cm.ConsistencyError,
     'set config.model.num_classes=0'),
])
def test_bad_settings_name_the_key(overrides, error, match):
  with pytest.raises(error, match=match):
    experiment.build(_config(**overrides))


def test_a_missing_teacher_names_the_key(tmp_path):
  with pytest.raises(teacher.TeacherError,
                     match='set config.distill.teacher_workdir'):
    experiment.build(_config('consistency_distillation'))
  config = _config('consistency_distillation', **{
      'distill.teacher_workdir': str(tmp_path)})
  with pytest.raises(teacher.TeacherError, match='config.json does not exist'):
    experiment.build(config).init_state()
  with pytest.raises(cm.ConsistencyError, match='num_levels=1'):
    experiment.build(_config('consistency_distillation', **{
        'distill.teacher_workdir': str(tmp_path),
        'consistency.num_levels': 1}))
