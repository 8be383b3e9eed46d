"""bfloat16 parameters with a float32 master copy (config.optim.param_dtype;
train_state.with_float32_master).

The master copy is exactly what a float32 optimizer would hold given the
same gradients, and the parameters are its rounding; an update below half
a bfloat16 ulp moves the master where a bfloat16 sum would not move at all
(closed forms); a diffusion run with bfloat16 parameters trains like the
float32 one, keeps its EMA in float32, resumes bit-exactly, and shards the
master like the parameters; the two-optimizer methods refuse the option.
"""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from configs import digits_autoencoder, digits_gan
from diffusion_jax import config_checks, experiment, parallel, sharding
from diffusion_jax import train_state
from diffusion_jax.checkpointing import CheckpointError
from diffusion_jax.errors import ConfigError
from tests.util import run_train, tiny_config


def _grads(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(n)]


def test_master_copy_is_the_float32_optimizer_and_params_its_rounding():
  shape = (7, 5)
  init = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  adam = optax.adam(1e-2)
  wrapped = train_state.with_float32_master(adam)
  p32, s32 = init, adam.init(init)
  opt_state = wrapped.init(init)  # from the float32 initial values
  params = init.astype(jnp.bfloat16)
  for g in _grads(20, shape):
    g = g.astype(jnp.bfloat16)  # what a bfloat16 network's gradient is
    u, s32 = adam.update(g.astype(jnp.float32), s32, p32)
    p32 = optax.apply_updates(p32, u)
    params, opt_state = train_state.apply_gradients(wrapped, g, opt_state,
                                                    params)
  # The same float32 arithmetic on the same gradients: bit-equal.
  np.testing.assert_array_equal(opt_state.master, p32)
  assert params.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(params), np.asarray(p32).astype(ml_dtypes.bfloat16))


def test_small_updates_accumulate_in_the_master_not_in_bfloat16():
  sgd = optax.sgd(1e-3)  # each step: -1e-3, below half an ulp at 1.0 (2^-8)
  params = jnp.ones((3,), jnp.bfloat16)
  plain, plain_state = params, sgd.init(params)
  wrapped = train_state.with_float32_master(sgd)
  opt_state = wrapped.init(jnp.ones((3,), jnp.float32))
  g = jnp.ones((3,), jnp.bfloat16)
  for _ in range(10):
    u, plain_state = sgd.update(g, plain_state, plain)
    plain = optax.apply_updates(plain, u)
    params, opt_state = train_state.apply_gradients(wrapped, g, opt_state,
                                                    params)
  np.testing.assert_array_equal(np.asarray(plain, np.float32), 1.0)  # stuck
  np.testing.assert_allclose(opt_state.master, 1.0 - 10 * 1e-3, rtol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(params, np.float32),
      np.float32(np.float32(0.99).astype(ml_dtypes.bfloat16)))


def _config(**overrides):
  return tiny_config(**{'optim.param_dtype': 'bfloat16', 'model.dropout': 0.0,
                        **overrides})


def _steps(config, n):
  exp = experiment.build(config, parallel.create_mesh(jax.devices()[:1]))
  method = exp.method
  state = method.init(jax.random.key(0))
  batch = jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, size=(16, 8, 8, 1)), jnp.float32)
  step = jax.jit(method.train_step)
  losses = []
  for _ in range(n):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return state, np.asarray(losses)


def test_diffusion_with_bfloat16_params_trains_like_float32():
  state, losses = _steps(_config(), 5)
  state32, losses32 = _steps(_config(**{'optim.param_dtype': 'float32'}), 5)
  dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}
  assert dtypes(state.params) == {jnp.dtype(jnp.bfloat16)}
  assert dtypes(state.opt_state.master) == {jnp.dtype(jnp.float32)}
  assert dtypes(state.ema_params) == {jnp.dtype(jnp.float32)}
  assert dtypes(state32.params) == {jnp.dtype(jnp.float32)}
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(
      p, m.astype(jnp.bfloat16)), state.params, state.opt_state.master)
  # bfloat16 inputs to the network (8 significant bits): ~1% apart.
  np.testing.assert_allclose(losses, losses32, rtol=3e-2)
  moved = jax.tree.leaves(jax.tree.map(
      lambda m, e: float(jnp.max(jnp.abs(m - e))), state.opt_state.master,
      state.ema_params))
  assert max(moved) > 0  # the EMA lags the master: it was updated in float32


@pytest.mark.slow  # three trainer runs (~1 min); resume itself is tested fast
def test_bfloat16_run_resumes_bit_exactly(tmp_path):
  full = run_train(_config(num_train_steps=4), str(tmp_path / 'full'))
  run_train(_config(num_train_steps=2), str(tmp_path / 'split'))
  resumed = run_train(_config(num_train_steps=4), str(tmp_path / 'split'))
  assert jax.tree.leaves(resumed.params)[0].dtype == jnp.bfloat16
  for got, want in ((resumed.params, full.params),
                    (resumed.ema_params, full.ema_params),
                    (resumed.opt_state, full.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got),
                 jax.device_get(want))


def test_switching_param_dtype_on_resume_is_refused(tmp_path):
  run_train(_config(num_train_steps=2, **{'optim.param_dtype': 'float32'}),
            str(tmp_path))
  with pytest.raises(CheckpointError, match='param_dtype'):
    run_train(_config(num_train_steps=4), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']  # untouched


def test_master_is_sharded_like_the_params():
  config = _config()
  exp = experiment.build(config, parallel.create_mesh(jax.devices()[:1]))
  shapes = exp.method.abstract_init()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                           (parallel.DATA_AXIS, parallel.FSDP_AXIS))
  specs = sharding.state_shardings(shapes, mesh, sharding.ShardingRules())
  same = jax.tree.map(lambda a, b: a.spec == b.spec, specs.params,
                      specs.opt_state.master)
  assert all(jax.tree.leaves(same))
  sizes = sharding.bytes_per_device(shapes, specs)
  n = sum(x.size for x in jax.tree.leaves(shapes.params))
  assert sizes['params'] == 2 * n and sizes['ema'] == 4 * n
  # master, mu, nu; Adam's and the warm-up schedule's int32 step counts.
  assert sizes['optimizer'] == 12 * n + 8


@pytest.mark.parametrize('value', ['float16', 'bf16'])
def test_unknown_param_dtype_is_refused_with_the_key(value):
  with pytest.raises(ConfigError, match='optim.param_dtype'):
    config_checks.check(tiny_config(**{'optim.param_dtype': value}))


@pytest.mark.parametrize('module', [digits_gan, digits_autoencoder])
def test_two_optimizer_methods_refuse_bfloat16_params(module):
  config = module.get_config()
  config.optim.param_dtype = 'bfloat16'
  with pytest.raises(ValueError, match="param_dtype='bfloat16'.*'float32'"):
    experiment.build(config, parallel.create_mesh(jax.devices()[:1]))
