"""The custom-gradient convolution equals lax.conv_general_dilated.

Values and both gradients, with the weight gradient per tap and in batch
chunks (one image per chunk, and chunks of 2 leaving a remainder), are
compared in float64 (differences are then summation order only) on small
shapes covering every case the U-Net uses: 3x3 'SAME' at stride 1 and 2
(TensorFlow's (0, 1) padding), 1x1 shortcuts, non-square images and explicit
asymmetric padding.
"""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')

CASES = [
    # (x shape, kernel hw, cout, strides, padding)
    ((2, 8, 8, 3), (3, 3), 5, (1, 1), 'SAME'),
    ((2, 8, 8, 4), (3, 3), 4, (2, 2), 'SAME'),  # Downsample: pads (0, 1)
    ((3, 5, 7, 4), (3, 3), 2, (1, 1), 'SAME'),  # non-square, odd sizes
    ((2, 6, 6, 6), (1, 1), 3, (1, 1), 'SAME'),  # conv_shortcut
    ((2, 7, 6, 2), (3, 2), 3, (1, 2), ((2, 0), (1, 1))),
    ((1, 6, 6, 2), (3, 3), 2, (1, 1), 'VALID'),
]


def _random(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def _one_chunk_of(images, x_shape, k_hw, cout, strides, padding):
  """MAX_CHUNK_ELEMENTS giving chunks of `images` images for this case."""
  out = jax.eval_shape(lambda x, w: lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=NHWC),
                       jax.ShapeDtypeStruct(x_shape, jnp.float32),
                       jax.ShapeDtypeStruct((*k_hw, x_shape[-1], cout),
                                            jnp.float32)).shape
  return images * out[1] * out[2] * out[3]


@pytest.mark.parametrize('method, images_per_chunk',
                         [('taps', None), ('chunks', 1), ('chunks', 2)])
@pytest.mark.parametrize('x_shape, k_hw, cout, strides, padding', CASES)
def test_value_and_gradients_equal_lax(x_shape, k_hw, cout, strides, padding,
                                       method, images_per_chunk, monkeypatch):
  pads = padding if not isinstance(padding, str) else tuple(
      lax.padtype_to_pads(x_shape[1:3], k_hw, strides, padding))
  if images_per_chunk:
    monkeypatch.setattr(conv, 'MAX_CHUNK_ELEMENTS', _one_chunk_of(
        images_per_chunk, x_shape, k_hw, cout, strides, padding))
  ours = lambda x, w: conv.conv2d(x, w, strides, pads, None, method)
  theirs = lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                                 dimension_numbers=NHWC)

  @jax.jit  # One compilation per case: eager ops would compile one by one.
  def values_and_grads(x, w, cotangent):
    out = []
    for fn in (ours, theirs):
      y, vjp = jax.vjp(fn, x, w)
      out.append((y, *vjp(cotangent)))
    return out

  with jax.enable_x64(True):
    x = _random(x_shape, 0)
    w = _random((*k_hw, x_shape[-1], cout), 1)
    cotangent = _random(jax.eval_shape(theirs, x, w).shape, 2)
    got, want = values_and_grads(x, w, cotangent)
    for g, h in zip(got, want):  # y, dx, dw
      assert g.shape == h.shape and g.dtype == jnp.float64
      np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-10)


def test_float32_weight_gradient_close_to_lax(monkeypatch):
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
  w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1
  g = jax.random.normal(jax.random.key(2), (4, 16, 16, 32))
  pads = ((1, 1), (1, 1))
  want = jax.vjp(lambda w: lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=NHWC), w)[1](g)[0]
  monkeypatch.setattr(conv, 'MAX_CHUNK_ELEMENTS', 16 * 16 * 32)  # 4 chunks
  for got in (conv.tap_weight_grad(x, g, (3, 3), (1, 1), pads),
              conv.chunked_weight_grad(x, w, g, (1, 1), pads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(
        jnp.abs(want).max()))


def test_flax_conv_same_params_and_outputs(monkeypatch):
  """nn.Conv(conv_general_dilated=conv.conv_general_dilated) is nn.Conv:
  same parameter tree, same output, gradients equal up to float32
  summation order; the switch reaches the per-tap path, the chunked one or
  plain lax."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  plain = nn.Conv(8, (3, 3), strides=(2, 2), padding='SAME')
  ours = nn.Conv(8, (3, 3), strides=(2, 2), padding='SAME',
                 conv_general_dilated=conv.conv_general_dilated)
  params = plain.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == \
      jax.tree.map(jnp.shape, params)
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(params)
  want = grad(plain)
  monkeypatch.setattr(conv, 'MAX_CHUNK_ELEMENTS', 4 * 4 * 8)  # 1 image
  for mode in ('taps', 'chunks', 'xla', 'auto'):
    monkeypatch.setattr(conv, 'WEIGHT_GRAD', mode)
    np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x),
                               rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-5),
                 grad(ours), want)
  # The per-tap path shows up as one dot_general per tap in the backward,
  # the chunked one as one weight-gradient convolution per image.
  count = lambda op: str(jax.make_jaxpr(lambda: grad(ours))()).count(op)
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'taps')
  assert count('dot_general') == 9
  taps_convs = count('conv_general_dilated')
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'chunks')
  assert count('dot_general') == 0
  assert count('conv_general_dilated') == taps_convs + 2
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'xla')
  assert count('dot_general') == 0
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'bogus')
  with pytest.raises(ValueError, match='WEIGHT_GRAD'):
    ours.apply(params, x)


def test_auto_customises_on_cpu_only(monkeypatch):
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'auto')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert conv.weight_grad_method((3, 3), (32, 32), 128, 8) == 'xla'
  assert conv.weight_grad_method((1, 1), (32, 32), 128, 8) == 'xla'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  # On a mesh (these tests see 8 devices) chunks would slice a sharded
  # batch: XLA's own, 'taps' (no batch slices) still for 1x1.
  assert jax.device_count() == 8
  assert conv.weight_grad_method((3, 3), (32, 32), 128, 8) == 'xla'
  assert conv.weight_grad_method((1, 1), (32, 32), 128, 8) == 'taps'
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  # 32x32 x 128 channels: 2 images per chunk.
  assert conv.chunk_size((32, 32), 128) == 2
  assert conv.weight_grad_method((3, 3), (32, 32), 128, 8) == 'chunks'
  assert conv.weight_grad_method((3, 3), (32, 32), 128, 2) == 'xla'
  assert conv.weight_grad_method((3, 3), (4, 4), 256, 32) == 'xla'
  assert conv.weight_grad_method((1, 1), (32, 32), 128, 8) == 'taps'


def test_unsupported_cases_fall_back_to_lax():
  """Dilation and feature groups are passed to lax untouched."""
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  kw = dict(rhs_dilation=(2, 2), dimension_numbers=NHWC, feature_group_count=2)
  np.testing.assert_array_equal(
      conv.conv_general_dilated(x, w, (1, 1), 'SAME', **kw),
      lax.conv_general_dilated(x, w, (1, 1), 'SAME', **kw))


def test_inference_compiler_options_on_cpu_only(monkeypatch):
  """Forward-only jits skip YNNPACK convolutions on CPU (faster there); the
  options compile and give the same forward as the default."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert conv.inference_compiler_options() == {}
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert conv.inference_compiler_options() == conv.NO_YNN_CONV
  monkeypatch.setattr(conv, 'INFERENCE_YNN_CONV', True)
  assert conv.inference_compiler_options() == {}
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                            dimension_numbers=NHWC)
  np.testing.assert_allclose(
      jax.jit(f, compiler_options=conv.NO_YNN_CONV)(x, w), jax.jit(f)(x, w),
      rtol=1e-5, atol=1e-5)


def test_chunked_gradient_on_a_sharded_batch(monkeypatch):
  """Chunks are slices of a batch sharded over the 8-device mesh: the
  weight gradient still equals lax's computed on one device."""
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh()
  assert mesh.size == 8
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'chunks')
  monkeypatch.setattr(conv, 'MAX_CHUNK_ELEMENTS', 2 * 8 * 8 * 8)  # 2 images
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
  loss = lambda f: lambda w, x: jnp.sum(jnp.sin(f(x, w)))
  ours = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                dimension_numbers=NHWC)
  theirs = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                 dimension_numbers=NHWC)
  sharded = jax.jit(jax.grad(loss(ours)),
                    in_shardings=(parallel.replicated(mesh),
                                  parallel.batch_sharded(mesh)))
  count = lambda: str(jax.make_jaxpr(jax.grad(loss(ours)))(w, x)).count(
      'conv_general_dilated')
  chunked = count()
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'taps')
  assert chunked == count() + 8  # 16 images in 8 chunks
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'chunks')
  np.testing.assert_allclose(
      sharded(w, jax.device_put(x, parallel.batch_sharded(mesh))),
      jax.jit(jax.grad(loss(theirs)))(w, x), rtol=1e-4, atol=1e-4)


def test_auto_on_a_mesh_moves_no_activations_between_devices(monkeypatch):
  """Chunks that slice a sharded batch made GSPMD move images between
  devices (collective-permutes; BENCHMARKS.md, sharded train state): on a
  mesh 'auto' keeps XLA's weight gradient, reduced by one all-reduce."""
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh()
  monkeypatch.setattr(conv, 'MAX_CHUNK_ELEMENTS', 8 * 8 * 8)  # 1 image
  x = jax.ShapeDtypeStruct((16, 8, 8, 4), jnp.float32,
                           sharding=parallel.batch_sharded(mesh))
  w = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32,
                           sharding=parallel.replicated(mesh))
  ours = lambda w, x: jnp.sum(jnp.sin(conv.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=NHWC)))
  hlo = lambda: jax.jit(jax.grad(ours)).lower(w, x).compile().as_text()
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'chunks')
  assert 'collective-permute' in hlo()  # what 'auto' used to pick here
  monkeypatch.setattr(conv, 'WEIGHT_GRAD', 'auto')
  text = hlo()
  assert 'collective-permute' not in text
  assert text.count(' all-reduce(') == 1
