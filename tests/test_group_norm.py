"""models.group_norm.GroupNorm is flax's GroupNorm, reorganised.

Same parameter tree, outputs equal to flax's (float32 rounding) and to an
independent float64 numpy GroupNorm, in float32 and with bf16 compute.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.group_norm import GroupNorm


def numpy_group_norm(x, groups, scale, bias, eps=1e-6):
  x = np.asarray(x, np.float64)
  n, c = x.shape[0], x.shape[-1]
  xg = x.reshape(n, -1, groups, c // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


@pytest.mark.parametrize('backend', ['cpu', 'tpu'])
@pytest.mark.parametrize('shape, groups', [((2, 8, 8, 64), 32),
                                           ((3, 5, 7, 12), 4),
                                           ((2, 16, 6), 3)])
def test_equals_flax_and_numpy(shape, groups, backend, monkeypatch):
  """Both reductions: per channel first (CPU), flax's one (elsewhere)."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  x = 3 * jax.random.normal(jax.random.key(0), shape) + 1.5
  ours, flax_gn = GroupNorm(groups), nn.GroupNorm(groups)
  params = flax_gn.init(jax.random.key(1), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) ==
          jax.tree.map(jnp.shape, params))
  c = shape[-1]
  params = {'params': {
      'scale': 1 + 0.1 * jax.random.normal(jax.random.key(2), (c,)),
      'bias': 0.1 * jax.random.normal(jax.random.key(3), (c,))}}
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))

  @jax.jit  # one compilation instead of op-by-op eager dispatch
  def outputs_and_grads(params, x):
    return [(m.apply(params, x), jax.grad(loss(m), (0, 1))(params, x))
            for m in (ours, flax_gn)]

  (got, got_grads), (want, want_grads) = outputs_and_grads(params, x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, numpy_group_norm(
      x, groups, params['params']['scale'], params['params']['bias']),
                             rtol=1e-5, atol=1e-5)
  # Gradients too (the train step differentiates through it).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4),
               got_grads, want_grads)


def test_bfloat16_compute():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64)).astype(jnp.bfloat16)
  ours = GroupNorm(32, dtype=jnp.bfloat16)
  params = ours.init(jax.random.key(1), x)
  assert params['params']['scale'].dtype == jnp.float32
  got = ours.apply(params, x)
  assert got.dtype == jnp.bfloat16
  want = nn.GroupNorm(32, dtype=jnp.bfloat16).apply(params, x)
  np.testing.assert_allclose(got.astype(jnp.float32),
                             want.astype(jnp.float32), atol=0.05)


def test_channels_must_split_into_groups():
  with pytest.raises(ValueError, match='groups'):
    GroupNorm(32).init(jax.random.key(0), jnp.zeros((1, 4, 4, 48)))
