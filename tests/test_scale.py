"""Throughput options: k steps per compiled call and gradient accumulation
must train the same params as the plain step; bad values fail clearly."""

import os

import jax
import numpy as np
import pytest

from diffusion_jax import checkpointing, experiment, parallel
from tests.util import run_train, tiny_config


# A smaller U-Net than tiny_config (one level, no attention): half the
# compile time, and these tests compare step functions, not model quality.
MICRO = {'model.ch': 8, 'model.ch_mult': (1,), 'model.attn_resolutions': (),
         'model.temb_dim': 16, 'optim.warmup_steps': 0}


def micro_config(**overrides):
  return tiny_config(**{**MICRO, **overrides})


def _run(config, mesh, num_steps=4):
  """Trains on fixed batches, k per call with config.steps_per_call; returns
  (init state, final state, per-step losses)."""
  rng = np.random.default_rng(0)
  batches = [jax.device_put(rng.uniform(-1, 1, (16, 8, 8, 1)).astype(
      np.float32), parallel.batch_sharded(mesh)) for _ in range(num_steps)]
  exp = experiment.build(config, mesh)
  state = exp.init_state(jax.random.key(0))
  init = jax.device_get(state)
  k = config.steps_per_call
  step = exp.jit_train_step()
  losses = []
  for i in range(0, num_steps, k):
    state, metrics = step(state, batches[i] if k == 1 else
                          tuple(batches[i:i + k]))
    losses.extend(np.atleast_1d(jax.device_get(metrics['loss'])))
  return init, jax.device_get(state), np.array(losses)


@pytest.fixture(scope='module')
def mesh():
  return parallel.create_mesh(jax.devices()[:2])


@pytest.fixture(scope='module')
def plain(mesh):
  # dropout 0: grad accumulation equals the plain step only then (its dropout
  # masks are drawn per micro-batch, see methods.base.OneOptimizerMethod).
  return _run(micro_config(**{'model.dropout': 0.0}), mesh)


def _assert_close(a, b):
  # Adam divides by sqrt(v): tiny float differences in near-zero gradient
  # entries move an update by a fraction of lr (see test_train).
  for x, y in ((a.params, b.params), (a.ema_params, b.ema_params)):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=2e-5),
                 x, y)


@pytest.mark.parametrize('overrides', [{'steps_per_call': 2},
                                       {'grad_accum_steps': 4}])
def test_throughput_options_equal_the_plain_step(mesh, plain, overrides):
  init, plain_state, plain_losses = plain
  _, state, losses = _run(micro_config(**{'model.dropout': 0.0, **overrides}),
                          mesh)
  assert int(state.step) == int(plain_state.step) == 4
  assert losses.shape == (4,)  # every step's metrics, not one per call
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  _assert_close(state, plain_state)
  # The comparison is not between two untrained states.
  assert not np.allclose(init.params['conv_in']['kernel'],
                         state.params['conv_in']['kernel'], atol=1e-4)


def test_loop_with_both_options_keeps_boundaries_exact(tmp_path):
  config = micro_config(steps_per_call=2, grad_accum_steps=2,
                        num_train_steps=4, checkpoint_every_steps=2,
                        log_every_steps=2)
  state = run_train(config, str(tmp_path))
  assert int(state.step) == 4
  ckpt = checkpointing.Checkpointer(os.path.join(tmp_path, 'checkpoints'))
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
  # Resuming at step 4 with k=3 cannot keep the call boundaries.
  config = micro_config(num_train_steps=12, steps_per_call=3,
                        log_every_steps=3, checkpoint_every_steps=3)
  with pytest.raises(ValueError, match='resuming at step 4, which is not a '
                     'multiple of config.steps_per_call=3'):
    run_train(config, str(tmp_path))


@pytest.mark.parametrize('overrides, match', [
    ({'steps_per_call': 3}, r'config.num_train_steps=4 is not a multiple of '
     r'config.steps_per_call=3'),
    ({'steps_per_call': 4, 'num_train_steps': 8}, r'config.log_every_steps=2 '
     r'is not a multiple of config.steps_per_call=4'),
    ({'steps_per_call': 2, 'sample_grid.every_steps': 3, 'num_train_steps': 6},
     r'config.sample_grid.every_steps=3 is not a multiple'),
    ({'steps_per_call': 0}, r'config.steps_per_call=0 must be positive'),
    ({'grad_accum_steps': 3}, r'config.grad_accum_steps=3 does not divide the '
     r'per-device batch 2 \(config.batch_size=16 over 8 devices\)'),
    ({'grad_accum_steps': 0}, r'config.grad_accum_steps=0 must be positive'),
])
def test_bad_throughput_values_fail_before_compiling(tmp_path, overrides,
                                                     match):
  with pytest.raises(ValueError, match=match):
    run_train(micro_config(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')
