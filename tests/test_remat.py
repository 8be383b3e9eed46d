"""Activation checkpointing (models/remat.py) changes memory, not results.

For the U-Net (whose ResNet blocks branch on a static `train` flag) and the
DiT: every policy has the parameter tree of 'none' (checkpoints move
between policies), and its loss and gradients equal those without remat up
to float reassociation; the compiled gradient of 'full' needs fewer
temporary bytes than 'none' (XLA's memory analysis); an unknown policy is
refused naming the key.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from diffusion_jax import config_checks
from diffusion_jax.errors import ConfigError
from diffusion_jax.models import create_model, remat


def _model_config(name, policy):
  c = default.get_config().model
  c.unlock()
  c.name, c.remat = name, policy
  c.ch, c.ch_mult, c.num_groups, c.temb_dim = 16, (1, 2), 4, 32
  c.attn_resolutions = (8,)
  c.dropout = 0.0
  c.dit_variant, c.dit_depth, c.dit_hidden_size, c.dit_num_heads = (
      'custom', 2, 32, 2)
  return c


def _net(name, policy):
  return create_model(_model_config(name, policy), out_channels=2,
                      image_size=16)


def _inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 2)), jnp.float32)
  return x, jnp.asarray([1, 10, 100, 999])


def _init(name, policy):
  x, t = _inputs()
  return _net(name, policy).init(jax.random.key(0), x, t,
                                 train=False)['params']


def _loss_and_grad(name, policy, params):
  """((loss, grads), the compiled value_and_grad): compiled once."""
  net, (x, t) = _net(name, policy), _inputs()

  def loss(p):
    y = net.apply({'params': p}, x, t, train=True)
    return jnp.mean(y ** 2 + 0.1 * y)

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  return compiled(params), compiled


@pytest.mark.parametrize('name', ['unet', 'dit'])
def test_every_policy_has_the_same_params_loss_and_gradients(name):
  params = _init(name, 'none')
  if name == 'dit':  # adaLN-Zero: perturb so the blocks are not identities
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
        params)
  (loss, grads), plain = _loss_and_grad(name, 'none', params)
  temps = {'none': plain.memory_analysis().temp_size_in_bytes}
  for policy in ('dots_saveable', 'full'):
    assert (jax.tree.map(jnp.shape, jax.eval_shape(
        lambda: _init(name, policy))) == jax.tree.map(jnp.shape, params))
    (loss_p, grads_p), compiled = _loss_and_grad(name, policy, params)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-6), grads_p, grads)
    temps[policy] = compiled.memory_analysis().temp_size_in_bytes
  assert temps['full'] < temps['none'], temps


def test_unknown_policy_is_refused_with_the_key():
  config = default.get_config()
  config.model.remat = 'some'
  with pytest.raises(ConfigError, match='config.model.remat'):
    config_checks.check(config)
  with pytest.raises(ValueError, match='config.model.remat'):
    remat.checkpointed(object, 'some')
