"""The state sharded over a ('data', 'fsdp') mesh (sharding.py, issue 17):
logical names on every parameter, the four 8-device mesh shapes against
the 1-device step, bad meshes and batches, resume across topologies."""

import logging as py_logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import checkpointing, experiment, methods, parallel
from diffusion_jax import sharding
from diffusion_jax.models import text
from tests.test_autoencoder_method import ae_config
from tests.util import run_train, tiny_config

SHAPES = [(8, 1), (4, 2), (2, 4), (1, 8)]  # (data, fsdp)
TINY_UNET = {'model.ch': 8, 'model.num_groups': 2, 'model.ch_mult': (1,),
             'model.attn_resolutions': (8,), 'model.temb_dim': 8,
             'batch_size': 8}
TINY_DIT = {'model.name': 'dit', 'model.dit_variant': 'custom',
            'model.dit_depth': 1, 'model.dit_hidden_size': 16,
            'model.dit_num_heads': 2, 'model.patch_size': 4,
            'model.num_classes': 10, 'batch_size': 8}
TINY_MLP = {'model.name': 'mlp', 'model.ch': 16, 'model.temb_dim': 16,
            'optim.learning_rate': 1e-3, 'optim.warmup_steps': 0,
            'sample_grid.every_steps': 0}
NAMES = {'vocab', 'vector', 'embed_in', 'embed_out', 'conv_d', 'conv_h',
         'conv_w'}


def _mesh(data, fsdp):
  return parallel.create_mesh(jax.devices()[:data * fsdp], data=data,
                              fsdp=fsdp)


# ------------------------------------------------------- logical names --

def _method_states():
  families = [(name, {'method': name}) for name in
              ('glow', 'vae', 'gan', 'pixelcnn') if name in methods.METHODS]
  for name, overrides in [('unet', {'model.num_classes': 10}),
                          ('dit', TINY_DIT), ('mlp', TINY_MLP),
                          ('autoencoder+discriminator', None), *families]:
    config = ae_config() if overrides is None else tiny_config(**overrides)
    yield name, methods.create_method(config).abstract_init()
  encoder = text.TextEncoder(12, 8, 5, 1, 2)
  ids = jnp.zeros((2, 5), jnp.int32)
  yield 'text_encoder', jax.eval_shape(
      lambda: encoder.init(jax.random.key(0), ids, ids > 0))


def test_every_parameter_of_every_model_carries_logical_axis_names():
  seen = set()
  for model, state in _method_states():
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    params = [(p, x) for p, x in flat if 'params' in jax.tree_util.keystr(
        p[:1]) or model == 'text_encoder']
    assert params, model
    for path, leaf in params:
      # The rule that tells parameters from counters holds for every model.
      assert sharding.is_parameter(path), (model, path)
      names = sharding.logical_axes(path, leaf.shape)
      assert len(names) == leaf.ndim and set(names) <= NAMES, (model, path)
      assert len(set(names)) == len(names)
      seen.add((leaf.ndim, names[-1] if names else None))
    boxed = sharding.logically_partitioned({'x': params[0][1]})
    assert isinstance(boxed['x'], nn.LogicallyPartitioned)
  # Every kind of parameter occurred: scalars, vectors, tables, kernels.
  assert {(0, None), (1, 'vector'), (2, 'embed_out'),
          (4, 'embed_out')} <= seen


def test_names_and_specs_by_rule():
  key = lambda *ks: tuple(jax.tree_util.DictKey(k) for k in ks)
  assert sharding.logical_axes(key('conv_in', 'kernel'), (3, 3, 1, 8)) == (
      'conv_h', 'conv_w', 'embed_in', 'embed_out')
  assert sharding.logical_axes(key('y', 'embedding'), (11, 16)) == (
      'vocab', 'embed_out')
  assert sharding.logical_axes(key('d', 'bias'), (16,)) == ('vector',)
  assert sharding.logical_axes(key('logvar'), ()) == ()
  mesh = _mesh(2, 4)
  shapes = {'a': {'kernel': jax.ShapeDtypeStruct((3, 8), jnp.float32),
                  'bias': jax.ShapeDtypeStruct((8,), jnp.float32)},
            # embed_out 6 does not split in 4: embed_in 12 does.
            'b': {'kernel': jax.ShapeDtypeStruct((12, 6), jnp.float32)},
            'c': {'embedding': jax.ShapeDtypeStruct((11, 16), jnp.float32)}}
  specs = jax.tree.map(lambda s: s.spec,
                       sharding.state_shardings(shapes, mesh))
  assert specs == {'a': {'kernel': P(None, 'fsdp'), 'bias': P()},
                   'b': {'kernel': P('fsdp', None)},
                   'c': {'embedding': P(None, 'fsdp')}}
  # The same specs as Flax's own path from boxed names.
  boxed = sharding.logically_partitioned({'kernel': np.zeros((3, 8))})
  assert nn.logical_to_mesh_sharding(
      nn.get_partition_spec(boxed), mesh,
      sharding.DEFAULT_RULES)['kernel'].spec == P(None, 'fsdp')


def test_indivisible_parameter_is_replicated_with_a_log_or_an_error(caplog):
  shapes = {'dense': {'kernel': jax.ShapeDtypeStruct((3, 6), jnp.float32)}}
  caplog.set_level(py_logging.INFO)
  spec = sharding.state_shardings(shapes, _mesh(2, 4))['dense']['kernel']
  assert spec.spec == P()
  lines = [r.getMessage() for r in caplog.records if 'replicated' in
           r.getMessage()]
  assert len(lines) == 1 and 'dense/kernel' in lines[0]
  strict = sharding.ShardingRules(replicate_indivisible=False)
  with pytest.raises(ValueError, match=r'dense/kernel \(3, 6\).*'
                     r'config.mesh.fsdp=4.*divide 6: 1, 2, 3, 6'):
    sharding.state_shardings(shapes, _mesh(2, 4), strict)


# ---------------------------------------------------------- bad input --

@pytest.mark.parametrize('data,fsdp,match', [
    (3, -1, r'config.mesh.data=3 x config.mesh.fsdp=-1.*8 devices'),
    (2, 2, r'multiply to 8'),
    (-1, -1, 'both -1'),
    (2, 0, r'config.mesh.fsdp=0'),
])
def test_bad_mesh_names_the_key(data, fsdp, match):
  with pytest.raises(ValueError, match=match):
    parallel.create_mesh(data=data, fsdp=fsdp)


def test_bad_batch_rules_and_indivisible_fail_in_build():
  with pytest.raises(ValueError, match=r'config.batch_size=12 does not divide '
                     r'across the 8 devices.*data 2 x fsdp 4'):
    experiment.build(tiny_config(**{'batch_size': 12, 'mesh.data': 2,
                                    'mesh.fsdp': 4}))
  with pytest.raises(ValueError, match='config.mesh.logical_axis_rules'):
    experiment.build(tiny_config(**{
        'mesh.logical_axis_rules': (('embed_out', 'model'),)}))
  # U-Net width 12 on fsdp 8: the input conv (3, 3, 1, 12) splits nowhere.
  with pytest.raises(ValueError, match=r'conv_in/kernel \(3, 3, 1, 12\).*'
                     'divide 12: 1, 2, 3, 4, 6'):
    experiment.build(tiny_config(**{
        'model.ch': 12, 'mesh.fsdp': 8,
        'mesh.replicate_indivisible': False}))


# -------------------------------------- four mesh shapes = one device --

@pytest.fixture(scope='module')
def references():
  """model -> (config, perturbed host state, batch, 1-device step result)."""
  out = {}
  for model, overrides in (('unet', TINY_UNET), ('dit', TINY_DIT)):
    config = tiny_config(**overrides)
    exp = experiment.build(config, _mesh(1, 1))
    state = jax.device_get(exp.init_state(jax.random.key(0)))
    # Noise on every parameter: zero-initialised output layers would
    # otherwise leave every other gradient zero.
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda p: p + 0.1 * rng.normal(size=p.shape).astype(p.dtype),
        state.params)
    state = state.replace(params=params, ema_params=params)
    batch = rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    if model == 'dit':
      batch = (batch, np.arange(8, dtype=np.int32))
    out[model] = (config, state, batch,
                  jax.device_get(_step(exp, state, batch)[0]))
  return out


def _step(exp, host_state, host_batch):
  """((state, metrics) on the mesh, the compiled step)."""
  state = jax.device_put(host_state, exp.state_sharding)
  batch = jax.device_put(host_batch, parallel.batch_sharded(exp.mesh))
  compiled = exp.jit_train_step().lower(state, batch).compile()
  return compiled(state, batch), compiled


def _case(model, shape, slow=False):
  marks = [pytest.mark.slow] if slow else []
  return pytest.param(model, shape, marks=marks, id=f'{model}-{shape}')


@pytest.mark.parametrize('model,shape', [
    # Each case compiles a step (~15 s of CPU): three run by default.
    *[_case('unet', s, slow=s in ((8, 1), (2, 4))) for s in SHAPES],
    *[_case('dit', s, slow=s != (2, 4)) for s in SHAPES]])
def test_mesh_shape_matches_one_device_step(references, model, shape):
  config, host_state, batch, (want_state, want_metrics) = references[model]
  exp = experiment.build(config, _mesh(*shape))
  (out, metrics), compiled = _step(exp, host_state, batch)
  state, metrics = jax.device_get((out, metrics))
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], want_metrics['grad_norm'],
                             rtol=1e-4)
  # Params, both Adam moments (mu is (1 - b1) g: the gradient) and the EMA.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=2e-6),
               state, want_state)
  fsdp = shape[1]
  kernel = 'conv_in' if model == 'unet' else 'x_embedder'
  hlo = compiled.as_text()
  # The step's own outputs are split over fsdp (8 output channels / 16
  # features per device / fsdp): parameters, EMA and Adam moments.
  for tree in (out.params, out.ema_params, out.opt_state[-1][0].mu):
    w = tree[kernel]['kernel']
    assert w.addressable_shards[0].data.shape[-1] == w.shape[-1] // fsdp
  assert ('all-gather' in hlo) == (fsdp > 1)


# ------------------------------------------------ resume on a new mesh --

def test_resume_8_to_4_to_2_to_1_devices(tmp_path):
  """fsdp 8 on 8 devices for 2 steps, then 2 steps each on 4, 2, 1
  devices: every restore is bit-exact, the data position is global, and
  the 8 steps equal one uninterrupted 1-device run (no batch skipped or
  repeated)."""
  workdir = str(tmp_path / 'run')
  config = tiny_config(**TINY_MLP, num_train_steps=2)
  state = jax.device_get(run_train(config, workdir, _mesh(1, 8)))
  for steps, shape in ((4, (2, 2)), (6, (1, 2)), (8, (1, 1))):
    config = tiny_config(**TINY_MLP, num_train_steps=steps)
    exp = experiment.build(config, _mesh(*shape))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
    restored, data = ckpt.restore(exp.abstract_state())
    ckpt.close()
    assert data == {'step': steps - 2}
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)),
                    jax.tree.leaves(state)):
      np.testing.assert_array_equal(a, b)  # bit-exact
    leaf = restored.params['dense_in']['kernel']
    assert leaf.sharding.mesh.shape == dict(zip(('data', 'fsdp'), shape))
    state = jax.device_get(run_train(config, workdir, exp.mesh))
  single = jax.device_get(run_train(tiny_config(**TINY_MLP, num_train_steps=8),
                                    str(tmp_path / 'single'), _mesh(1, 1)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               state.params, single.params)
  # A checkpoint of another width fails before anything compiles.
  other = experiment.build(tiny_config(**{**TINY_MLP, 'model.ch': 24}),
                           _mesh(1, 8))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(checkpointing.CheckpointError, match='shape'):
    ckpt.restore(other.abstract_state())
  ckpt.close()


def test_train_batches_are_global_not_per_topology():
  config = tiny_config(**TINY_MLP)
  batches = []
  for shape in ((1, 8), (2, 2), (1, 1)):
    it = experiment.build(config, _mesh(*shape)).train_iterator(start_step=5)
    batches.append(parallel.gather(next(it)))
    it.close()
  np.testing.assert_array_equal(batches[0], batches[1])
  np.testing.assert_array_equal(batches[0], batches[2])


def test_replicated_arrays_are_sliced_over_replicas_only_when_large(tmp_path):
  """Orbax's replica-parallel save slices a replicated array per replica
  (one compiled slice per shape): only where a slice holds at least
  MIN_REPLICA_SLICE_BYTES; both kinds restore exactly."""
  from unittest import mock  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh()
  replicated = parallel.replicated(mesh)
  big_rows = 8 * checkpointing.MIN_REPLICA_SLICE_BYTES // (4 * 256)
  state = {'small': jnp.arange(256.0), 'big': jnp.ones((big_rows, 256))}
  state = jax.device_put(state, replicated)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with mock.patch.object(jax.lax, 'slice_in_dim',
                         wraps=jax.lax.slice_in_dim) as sliced:
    ckpt.save(1, state)
    ckpt.wait_until_finished()
  shapes = sorted({tuple(c.args[0].shape) for c in sliced.call_args_list})
  assert shapes == [(big_rows, 256)]  # the 1 KiB vector is written whole
  assert sliced.call_count == 8  # one 1 MiB slice per replica
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=replicated), state)
  restored, _ = ckpt.restore(abstract, 1)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored, state)
