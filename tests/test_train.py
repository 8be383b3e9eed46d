"""The trainer: paper model size, 8-device equality, resume, bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_ddpm, default
from diffusion_jax import checkpointing, experiment, methods, parallel
from diffusion_jax import train_state, trainer
from diffusion_jax.data.sources import DataError
from tests.util import run_sample, run_train, tiny_config


def count_params(config):
  method = methods.create_method(config)
  shapes = jax.eval_shape(method.init_params, jax.random.key(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_paper_model_has_35_746_307_parameters():
  assert count_params(cifar10_ddpm.get_config()) == 35_746_307


def test_paper_config_carries_every_paper_hyperparameter():
  c = cifar10_ddpm.get_config()
  assert (c.batch_size, c.num_train_steps) == (128, 800_000)
  assert (c.optim.learning_rate, c.optim.warmup_steps) == (2e-4, 5000)
  assert (c.optim.grad_clip_norm, c.optim.ema_decay) == (1.0, 0.9999)
  assert not c.optim.ema_warmup  # the paper's EMA has a constant decay
  assert c.model.dropout == 0.1 and c.data.random_flip
  assert (c.diffusion.num_timesteps, c.diffusion.beta_schedule) == (1000, 'linear')
  assert (c.diffusion.beta_start, c.diffusion.beta_end) == (1e-4, 0.02)
  assert (c.data.image_size, c.data.channels) == (32, 3)


def test_learning_rate_warmup_and_clipping():
  c = cifar10_ddpm.get_config()
  lr = train_state.learning_rate_schedule(c.optim)
  np.testing.assert_allclose([lr(0), lr(2500), lr(5000), lr(10 ** 6)],
                             [0.0, 1e-4, 2e-4, 2e-4], rtol=1e-6)
  # Clipping: a gradient of norm 10 enters Adam as norm 1, so the first Adam
  # step (which normalises) is unchanged but the second moment sees 1/10.
  opt = train_state.create_optimizer(c.optim)
  params = {'w': jnp.zeros(4)}
  state = opt.init(params)
  _, state = opt.update({'w': jnp.full(4, 5.0)}, state, params)
  nu = state[1][0].nu['w']
  np.testing.assert_allclose(nu, (1 - 0.999) * 0.5 ** 2, rtol=1e-5)


def test_config_is_locked_against_misspelt_keys():
  config = default.get_config()
  with pytest.raises(AttributeError):
    config.model.chanels = 3  # pylint: disable=attribute-defined-outside-init


def _one_step(config, mesh, images):
  exp = experiment.build(config, mesh)
  state = exp.init_state(jax.random.key(0))
  step = exp.jit_train_step()
  images = jax.device_put(images, parallel.batch_sharded(mesh))
  state, m1 = step(state, images)
  state, m2 = step(state, images)
  return jax.device_get((state, m1, m2))


def test_eight_devices_match_one_device():
  assert jax.device_count() == 8
  # No warm-up: with zero-initialised output layers, the first step only
  # moves conv_out; the second moves everything.
  config = tiny_config(**{'model.dropout': 0.1, 'optim.warmup_steps': 0})
  images = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
  s8, a8, b8 = _one_step(config, parallel.create_mesh(), images)
  s1, a1, b1 = _one_step(config, parallel.create_mesh(jax.devices()[:1]), images)
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(a8[key], a1[key], rtol=1e-5)
    np.testing.assert_allclose(b8[key], b1[key], rtol=1e-5)
  # Adam divides by sqrt(v): where a gradient entry is ~0, float reordering
  # of the all-reduce can move the update by a fraction of lr (1e-3) per step.
  close = lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5)
  jax.tree.map(close, s8.params, s1.params)
  jax.tree.map(close, s8.ema_params, s1.ema_params)
  # The step changed something: the comparison is not between two inits.
  init8 = _one_step(tiny_config(**{'optim.learning_rate': 0.0,
                                    'optim.warmup_steps': 0}),
                    parallel.create_mesh(), images)[0]
  assert not np.allclose(init8.params['conv_in']['kernel'],
                         s8.params['conv_in']['kernel'])


def test_ema_warmup_is_tfs_num_updates_schedule():
  """decay_n = min(decay, (1 + n) / (10 + n)): after two steps from init
  p0 -> p1 -> p2, ema = d1 (d0 p0 + (1 - d0) p1) + (1 - d1) p2."""
  images = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype(
      np.float32)
  mesh = parallel.create_mesh(jax.devices()[:1])
  config = tiny_config(**{'optim.warmup_steps': 0, 'model.dropout': 0.0})
  exp = experiment.build(config, mesh)
  assert exp.method.ema_warmup
  decays = [float(exp.method._ema_decay_at(jnp.asarray(n)))  # pylint: disable=protected-access
            for n in (0, 1, 90, 10_000)]
  np.testing.assert_allclose(decays, [0.1, 2 / 11, 91 / 100, 0.995],
                             rtol=1e-6)
  init = jax.device_get(exp.init_state(jax.random.key(0)).params)
  step = exp.jit_train_step()
  state = exp.init_state(jax.random.key(0))
  x = jax.device_put(images, parallel.batch_sharded(mesh))
  state, _ = step(state, x)
  p1 = jax.device_get(state.params)
  state, _ = step(state, x)
  p2, ema = jax.device_get((state.params, state.ema_params))
  want = jax.tree.map(lambda a, b, c: (2 / 11) * (0.1 * a + 0.9 * b) +
                      (9 / 11) * c, init, p1, p2)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6),
               ema, want)
  constant = experiment.build(tiny_config(**{'optim.ema_warmup': False}),
                              mesh).method
  assert float(constant._ema_decay_at(jnp.asarray(0))) == 0.995  # pylint: disable=protected-access


# Improved DDPM with importance sampling (its loss history lives in the
# checkpoint) and a class-conditional model with label dropout.
IDDPM_CONDITIONAL = {'diffusion.loss': 'hybrid',
                     'diffusion.sampler_variance': 'learned',
                     'diffusion.time_sampling': 'importance',
                     'model.num_classes': 10, 'grad_accum_steps': 2}


# The plain DDPM state resumes bitwise in tests/test_preemption.py (SIGKILL
# at several points); this variant adds the loss history, labels and
# gradient accumulation. The plain variant runs with the slow tests.
@pytest.mark.parametrize('extra', [
    pytest.param({}, marks=pytest.mark.slow), IDDPM_CONDITIONAL],
                         ids=['ddpm', 'iddpm_conditional'])
def test_resume_gives_the_same_params_as_an_uninterrupted_run(tmp_path, extra):
  config = tiny_config(**{'num_train_steps': 6}, **extra)
  full = jax.device_get(run_train(config, str(tmp_path / 'a')))
  workdir = str(tmp_path / 'b')
  run_train(tiny_config(**{'num_train_steps': 3}, **extra),
                           workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.all_steps() == [2, 3]
  ckpt.close()
  resumed = jax.device_get(run_train(config, workdir))
  assert int(resumed.step) == int(full.step) == 6
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.ema_params,
               full.ema_params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, full.opt_state)
  jax.tree.map(np.testing.assert_array_equal, resumed.loss_history,
               full.loss_history)
  if extra:  # 6 steps x 16 examples spread over the 20 timesteps' histories
    assert int(full.loss_history.counts.sum()) == 6 * 16
  assert os.path.exists(os.path.join(workdir, 'config.json'))


def test_sample_mode_writes_png_and_npz_deterministically(tmp_path):
  config = tiny_config()
  workdir = str(tmp_path)
  run_train(config, workdir)
  out = run_sample(config, workdir)
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
  assert os.path.getsize(os.path.join(out, 'samples.png')) > 0
  assert images.std() > 0
  # Again, with the progressive-generation figure: the same samples.
  progressive = tiny_config(**{'sample.progressive_timesteps': (19, 10, 0),
                               'sample.progressive_num_images': 4})
  again = run_sample(progressive, workdir)
  np.testing.assert_array_equal(
      np.load(os.path.join(again, 'samples.npz'))['images'], images)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fig = np.asarray(Image.open(os.path.join(again, 'progressive.png')))
  # 4 rows x (3 predictions + final) columns of 8x8 tiles with 1px padding,
  # upscaled by an integer factor to >= 256 px.
  scale = fig.shape[1] // (4 * 9 + 1)
  assert fig.shape[:2] == ((4 * 9 + 1) * scale, (4 * 9 + 1) * scale)


@pytest.mark.parametrize('extra', [
    {'diffusion.process': 'rectified_flow', 'diffusion.prediction': 'velocity',
     'diffusion.time_sampling': 'logit_normal', 'sample.sampler': 'heun',
     'sample.num_steps': 3, 'model.num_classes': 10,
     'sample.guidance_scale': 2.0},
    # The VE/PC path is covered by tests/test_sde.py's known answers; this
    # end-to-end variant is only run with the slow tests.
    pytest.param({'diffusion.process': 've', 'diffusion.ve_sigma_max': 10.0,
                  'sample.sampler': 'pc', 'sample.num_steps': 3},
                 marks=pytest.mark.slow),
], ids=['rectified_flow_guided', 've_pc'])
def test_continuous_process_trains_and_samples_the_same_on_any_mesh(tmp_path,
                                                                    extra):
  config = tiny_config(num_train_steps=2, **extra)
  workdir = str(tmp_path)
  run_train(config, workdir)
  read = lambda out: np.load(os.path.join(out, 'samples.npz'))['images']
  on_8 = read(run_sample(config, workdir))
  on_1 = read(run_sample(
      config, workdir, mesh=parallel.create_mesh(jax.devices()[:1])))
  assert on_8.shape == (12, 8, 8, 1) and on_8.std() > 0
  # Same images (uint8, up to one level of float rounding).
  assert np.abs(on_8.astype(int) - on_1.astype(int)).max() <= 1


def test_sample_mode_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='train first'):
    run_sample(tiny_config(), str(tmp_path))


def test_periodic_samples_are_upscaled_pngs_tensorboard_images_and_a_report(
    tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{'sample_grid.every_steps': 2})
  run_train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'samples')) == [
      'ema_step_00000002.png', 'ema_step_00000004.png']
  # 8 digits of 8x8 in a 3x3 grid with 1-px gaps: 28 px, upscaled by 10
  # with nearest neighbours (every pixel a 10x10 block).
  png = np.asarray(Image.open(tmp_path / 'samples' / 'ema_step_00000004.png'))
  assert png.shape == (280, 280)
  np.testing.assert_array_equal(png, np.kron(png[::10, ::10],
                                             np.ones((10, 10), np.uint8)))
  events = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={'tensors': 0})
  events.Reload()
  images = events.Tensors('ema_samples')
  assert [e.step for e in images] == [2, 4]  # TensorBoard's slider
  # The summary holds (width, height, PNG bytes).
  assert [int(v) for v in images[-1].tensor_proto.string_val[:2]] == [280, 280]
  with open(tmp_path / 'report.html') as f:
    page = f.read()
  assert 'ema_step_00000004' in page or 'step 4' in page


# ---------------------------------------------------------------- bad input --


def test_batch_that_does_not_divide_across_devices(tmp_path):
  with pytest.raises(ValueError, match='config.batch_size=12 does not divide '
                     'across the 8 devices.*multiple of 8'):
    run_train(tiny_config(batch_size=12), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '0')


def test_unknown_data_source(tmp_path):
  with pytest.raises(DataError, match='digits'):
    run_train(tiny_config(**{'data.source': 'cifar'}),
                             str(tmp_path))


def test_missing_tfds_data_dir_fails_fast(tmp_path):
  config = tiny_config(**{'data.source': 'tfds', 'data.name': 'cifar10',
                          'data.data_dir': str(tmp_path / 'nowhere')})
  with pytest.raises(DataError, match='tfds build'):
    run_train(config, str(tmp_path / 'run'))


def test_image_shape_that_does_not_match_the_data(tmp_path):
  with pytest.raises(DataError, match='image_size'):
    run_train(tiny_config(**{'data.image_size': 16}),
                             str(tmp_path))


def test_image_size_the_unet_cannot_halve(tmp_path):
  with pytest.raises(ValueError, match='ch_mult'):
    run_train(
        tiny_config(**{'model.ch_mult': (1, 2, 2, 2, 2)}), str(tmp_path))


def test_workdir_with_a_checkpoint_of_another_model(tmp_path):
  workdir = str(tmp_path)
  run_train(tiny_config(num_train_steps=2), workdir)
  ckpt_dir = tmp_path / 'checkpoints' / '2'
  before = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt_dir.rglob('*'))
  other = tiny_config(num_train_steps=4, **{'model.ch': 32})
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'different model: ema_params/conv_in/bias has '
                     r'shape \(16,\) in the checkpoint but \(32,\) in this run'):
    run_train(other, workdir)
  after = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt_dir.rglob('*'))
  assert before == after


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path):
  workdir = str(tmp_path)
  run_train(tiny_config(num_train_steps=2), workdir)
  state_dir = tmp_path / 'checkpoints' / '2' / 'state'
  for f in state_dir.rglob('*'):
    if f.is_file() and 'manifest' in f.name or f.parent.name == 'd':
      f.write_bytes(b'garbage')
  with pytest.raises(checkpointing.CheckpointError, match='step 2'):
    run_train(tiny_config(num_train_steps=4), workdir)
  assert (tmp_path / 'checkpoints' / '2').exists()
  assert not (tmp_path / 'checkpoints' / '4').exists()


def test_divergence_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  run_train(tiny_config(num_train_steps=2), workdir)
  diverging = tiny_config(num_train_steps=8, **{
      'optim.learning_rate': 1e30, 'optim.warmup_steps': 0})
  with pytest.raises(trainer.NonFiniteLossError, match=r'step \d.*step 2\)'):
    run_train(diverging, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.all_steps() == [2]
  ckpt.close()


@pytest.mark.parametrize('name, steps, flip', [
    ('celebahq_ddpm', 500_000, True), ('lsun_church_ddpm', 1_200_000, True),
    ('lsun_bedroom_ddpm', 2_400_000, False), ('lsun_cat_ddpm', 1_800_000, True)])
def test_paper_256_configs(name, steps, flip):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  assert count_params(config) == 113_673_219
  assert (config.num_train_steps, config.data.random_flip) == (steps, flip)
  assert (config.batch_size, config.optim.learning_rate) == (64, 2e-5)
  assert config.model.dropout == 0.0 and config.data.image_size == 256


def test_large_bedroom_config_is_the_papers_256m_model_and_builds():
  """Ho et al. 2020, appendix B: the larger LSUN Bedroom model has ~256M
  parameters (filter count increased) and trained 1.15M steps; the rest is
  the standard Bedroom config's."""
  from configs import lsun_bedroom_ddpm, lsun_bedroom_large_ddpm  # pylint: disable=g-import-not-at-top
  config = lsun_bedroom_large_ddpm.get_config()
  assert count_params(config) == 255_677_955
  assert abs(count_params(config) - 256e6) / 256e6 < 0.005
  standard = lsun_bedroom_ddpm.get_config().to_dict()
  differs = {k for k, v in config.to_dict().items() if standard[k] != v}
  assert differs == {'model', 'num_train_steps'}
  model = {k for k, v in config.model.items() if standard['model'][k] != v}
  assert model == {'ch', 'temb_dim'}
  assert (config.model.ch, config.model.temb_dim) == (192, 768)
  assert (config.num_train_steps, config.data.random_flip) == (1_150_000, False)
  for mode in ('train', 'sample', 'eval'):
    experiment.build(config, parallel.create_mesh(), mode=mode)


@pytest.mark.parametrize('name', [
    'cifar10_iddpm', 'cifar10_rectified_flow', 'cifar10_cfg', 'digits_iddpm',
    'digits_rectified_flow', 'digits_cfg', 'digits_vp_sde', 'digits_ve_sde',
    'cifar10_edm', 'digits_edm', 'digits_distill'])
def test_beyond_ddpm_configs_pass_the_checks_and_build(name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  for mode in ('train', 'sample', 'eval'):
    exp = experiment.build(config, parallel.create_mesh(), mode=mode)
  model, shape = exp.method.network, exp.method.image_shape
  x = jnp.zeros((2, *shape))
  out = jax.eval_shape(lambda: model.apply(
      model.init(jax.random.key(0), x, jnp.zeros((2,)), train=False),
      x, jnp.zeros((2,)), train=False))
  learned = config.diffusion.sampler_variance == 'learned'
  assert out.shape == (2, *shape[:2],
                       config.data.channels * (2 if learned else 1))
  assert ('cfg' in name) == (config.model.num_classes == 10)


def test_checkpoints_from_before_the_loss_history_field_still_restore(tmp_path):
  """Train states written before TrainState.loss_history existed hold only
  step, params, ema_params and opt_state; they must keep resuming."""
  exp = experiment.build(tiny_config())
  state = exp.init_state(jax.random.key(1))
  old_layout = {k: v for k, v in vars(state).items() if k != 'loss_history'}
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(7, old_layout, {'step': 7})
  ckpt.wait_until_finished()
  restored, data = ckpt.restore(exp.abstract_state(), 7)
  ckpt.close()
  assert isinstance(restored, train_state.TrainState) and data == {'step': 7}
  assert restored.loss_history is None
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


# The train-state tree of tiny_config as written before the method
# interface existed (commit 3e2a2b4): (leaf count, sha256 of the sorted
# "path:shape:dtype" lines). Equal trees mean those run directories resume.
FIRST_WAVE_TREES = {
    'ddpm': ({}, 579, '4a72584f05836d8a8ab95811409ad1b2'
             'cdd93507beabc868112ba4ea362a27d4'),
    'iddpm_conditional': (
        {'diffusion.loss': 'hybrid', 'diffusion.sampler_variance': 'learned',
         'diffusion.time_sampling': 'importance', 'model.num_classes': 10},
        585, '4f2aeaaf0b71a86f424db1af01a16e42'
        '7d74d3007f0b9a0af5717378baebd051'),
}


@pytest.mark.parametrize('name', sorted(FIRST_WAVE_TREES))
def test_state_tree_is_the_one_first_wave_run_directories_hold(name):
  import hashlib  # pylint: disable=g-import-not-at-top
  overrides, count, digest = FIRST_WAVE_TREES[name]
  state = experiment.build(tiny_config(**overrides)).abstract_state()
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  keys = sorted(f'{jax.tree_util.keystr(p)}:{tuple(leaf.shape)}:{leaf.dtype}'
                for p, leaf in flat)
  assert len(keys) == count
  assert hashlib.sha256('\n'.join(keys).encode()).hexdigest() == digest


def test_run_directory_in_the_dict_layout_resumes_and_trains_on(tmp_path):
  """A checkpoint written as a plain tree of the first-wave field names
  (no TrainState class involved) resumes: the loop restores it exactly and
  trains on from its step."""
  config = tiny_config(num_train_steps=2)
  exp = experiment.build(config)
  state = jax.device_get(exp.init_state(jax.random.key(3)))
  layout = {'step': np.int32(2), 'params': state.params,
            'ema_params': state.ema_params, 'opt_state': state.opt_state}
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save(2, layout, {'step': 2})  # the input pipeline's position
  ckpt.close()
  restored = jax.device_get(run_train(config, str(tmp_path)))
  assert int(restored.step) == 2
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  trained = run_train(tiny_config(num_train_steps=4), str(tmp_path))
  assert int(trained.step) == 4


def test_a_first_wave_loss_name_names_the_new_keys():
  with pytest.raises(ValueError, match=r"config.diffusion.prediction='v' and "
                     r"config.diffusion.loss='mse'"):
    experiment.build(tiny_config(**{'diffusion.loss': 'v_mse'}))


@pytest.mark.parametrize('overrides, match', [
    ({'method': 'flow_matching'},
     r"unknown method 'flow_matching': set config.method"),
    ({'model.name': 'resnet'}, r"unknown model 'resnet'"),
    ({'diffusion.process': 'nope'}, r'config.diffusion.process to one of'),
    ({'sample.sampler': 'pc'}, r"sampler='pc' does not apply to the process "
     r"'ddpm'"),
    ({'sample_quality.every_steps': 2,
      'sample_quality.reference': '/nowhere/stats.npz'},
     r'config.sample_quality.reference'),
    ({'keep_checkpoints': 0},
     r'config.keep_checkpoints=0 must be >= 1 \(0 would delete every'),
])
def test_bad_config_values_fail_at_build_with_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiment.build(tiny_config(**overrides))
