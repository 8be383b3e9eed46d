"""Glow's invertible layers (Kingma & Dhariwal 2018, sec. 3; openai/glow).

Every flow layer is `layer(x, reverse=False, data_init=False) -> (y,
logdet)` on NHWC arrays: x (B, H, W, C) -> y of the same shape, logdet (B,)
the log |det dy/dx| of the map it applied (forward, or the inverse map
with reverse=True, so a layer's two logdets cancel). `data_init` only
matters to ActNorm (and the coupling networks' ActNorms): see ActNorm.

Shapes and parameters follow openai/glow (model.py, tfops.py) where the
paper leaves them open: actnorm and the zero convolution scale by
exp(3 logs) (logscale_factor 3); the affine coupling's scale is
sigmoid(h + 2); the coupling network is conv3x3-actnorm-relu,
conv1x1-actnorm-relu, Conv2dZeros. Not reproduced: openai's "edge bias"
(an extra input channel of ones marking the zero padding of its 3x3
convolutions).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from diffusion_jax.models import conv as conv_lib

# nn.Conv with the project's faster CPU weight gradient (models/conv.py).
Conv = functools.partial(nn.Conv,
                         conv_general_dilated=conv_lib.conv_general_dilated)

# openai/glow's logscale_factor: a log-scale parameter p acts as 3 p, so
# Adam's steps (about lr per step, whatever the gradient's size) move the
# scale 3x faster than the other parameters.
LOGSCALE_FACTOR = 3.0
PERMUTATIONS = ('invconv', 'invconv_lu', 'reverse', 'shuffle')
COUPLINGS = ('affine', 'additive')


def squeeze2d(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H/2, W/2, 4C): each 2x2 patch into channels, in
  openai/glow's order (channel index = c * 4 + 2 * dy + dx). A
  permutation of the entries: log-determinant 0."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c * 4)


def unsqueeze2d(x: jax.Array) -> jax.Array:
  """The inverse of squeeze2d: (B, H, W, 4C) -> (B, 2H, 2W, C)."""
  b, h, w, c4 = x.shape
  c = c4 // 4
  x = x.reshape(b, h, w, c, 2, 2)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * 2, w * 2, c)


def _per_example(value, x):
  """A scalar log-determinant shared by every example -> (B,)."""
  return jnp.broadcast_to(value, x.shape[:1])


def _constant(value: np.ndarray):
  """A parameter initialiser returning a fixed (numpy-computed) value."""
  return lambda rng, shape, dtype=jnp.float32: jnp.asarray(value, dtype)


class ActNorm(nn.Module):
  """y = (x + b) * exp(3 s) per channel (paper sec. 3.1, Table 1 row 1);
  logdet = H W sum(3 s).

  Data-dependent initialisation: called with data_init=True (inside an
  apply with mutable=['params']) it sets b = -mean(x) and 3 s =
  -log(std(x) + 1e-6) over (B, H, W) of this batch, writes them over its
  parameters and applies them, so its output on that batch has zero mean
  and unit variance per channel and the layers after it initialise on
  normalised inputs. Params are created as b = s = 0 (the identity), so
  Method.init needs no data; methods/glow.py runs the data pass inside the
  first train step. Outputs are sown to 'intermediates' (tests read them).
  """

  @nn.compact
  def __call__(self, x, reverse: bool = False, data_init: bool = False):
    c = x.shape[-1]
    bias = self.param('bias', nn.initializers.zeros, (c,))
    logs = self.param('logs', nn.initializers.zeros, (c,))
    if data_init:
      if reverse:
        raise ValueError('data_init runs the forward direction only')
      mean = jnp.mean(x, axis=(0, 1, 2))
      std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=(0, 1, 2)))
      bias = -mean
      logs = -jnp.log(std + 1e-6) / LOGSCALE_FACTOR
      self.put_variable('params', 'bias', bias)
      self.put_variable('params', 'logs', logs)
    log_scale = logs * LOGSCALE_FACTOR
    logdet = _per_example(x.shape[1] * x.shape[2] * jnp.sum(log_scale), x)
    if reverse:
      return x * jnp.exp(-log_scale) - bias, -logdet
    y = (x + bias) * jnp.exp(log_scale)
    self.sow('intermediates', 'output', y)
    return y, logdet


class Conv2dZeros(nn.Module):
  """openai/glow's conv2d_zeros: (conv3x3(x) + b) * exp(3 logs), kernel,
  b and logs all zero at init, so the layer starts as the constant 0 (a
  coupling starts as the identity or a fixed scale, a learned prior as
  N(0, I))."""
  features: int

  @nn.compact
  def __call__(self, x):
    h = Conv(self.features, (3, 3), padding='SAME',
             kernel_init=nn.initializers.zeros,
             bias_init=nn.initializers.zeros, name='conv')(x)
    logs = self.param('logs', nn.initializers.zeros, (self.features,))
    return h * jnp.exp(logs * LOGSCALE_FACTOR)


class CouplingNN(nn.Module):
  """NN() of the coupling layer (paper sec. 3.3 and 5: three convolutions,
  the first and last 3x3, the middle 1x1, hidden_channels wide; the
  hidden ones followed by ActNorm instead of a bias, as openai/glow's
  conv2d). (B, H, W, C) -> (B, H, W, features)."""
  hidden_channels: int
  features: int

  @nn.compact
  def __call__(self, x, data_init: bool = False):
    init = nn.initializers.normal(0.05)  # openai/glow's default_initializer
    h = Conv(self.hidden_channels, (3, 3), padding='SAME', use_bias=False,
             kernel_init=init, name='conv_in')(x)
    h = nn.relu(ActNorm(name='actnorm_in')(h, data_init=data_init)[0])
    h = Conv(self.hidden_channels, (1, 1), use_bias=False, kernel_init=init,
             name='conv_hidden')(h)
    h = nn.relu(ActNorm(name='actnorm_hidden')(h, data_init=data_init)[0])
    return Conv2dZeros(self.features, name='conv_out')(h)


class Coupling(nn.Module):
  """Affine coupling (paper Table 1 row 3, with openai/glow's scale):
  x = (x_a, x_b) split in channel halves, h = NN(x_a), y_b = (x_b + h[0::2])
  * sigmoid(h[1::2] + 2), y_a = x_a; logdet = sum log sigmoid(h[1::2] + 2).
  Additive (NICE): y_b = x_b + NN(x_a), logdet 0. The NN's last layer is
  zero at init: the additive coupling starts as the identity, the affine
  one as y_b = sigmoid(2) x_b."""
  hidden_channels: int
  kind: str = 'affine'

  @nn.compact
  def __call__(self, x, reverse: bool = False, data_init: bool = False):
    if self.kind not in COUPLINGS:
      raise ValueError(f'coupling {self.kind!r}: use one of {COUPLINGS}')
    half = x.shape[-1] // 2
    x_a, x_b = x[..., :half], x[..., half:]
    width = x_b.shape[-1]
    affine = self.kind == 'affine'
    h = CouplingNN(self.hidden_channels, 2 * width if affine else width,
                   name='nn')(x_a, data_init=data_init)
    if not affine:
      y_b = x_b - h if reverse else x_b + h
      return jnp.concatenate([x_a, y_b], -1), jnp.zeros(x.shape[:1], x.dtype)
    shift = h[..., 0::2]
    log_scale = jax.nn.log_sigmoid(h[..., 1::2] + 2.0)
    logdet = jnp.sum(log_scale, axis=(1, 2, 3))
    if reverse:
      y_b = x_b * jnp.exp(-log_scale) - shift
      return jnp.concatenate([x_a, y_b], -1), -logdet
    y_b = (x_b + shift) * jnp.exp(log_scale)
    return jnp.concatenate([x_a, y_b], -1), logdet


def _matmul(x, w):
  # Full float32 on TPU/GPU too: the inverse must undo the forward.
  return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


class InvConv1x1(nn.Module):
  """Invertible 1x1 convolution (paper sec. 3.2, eq. 9): y = x W per
  pixel, logdet = H W log|det W|; W initialised as a random rotation
  (log|det W| = 0)."""

  @nn.compact
  def __call__(self, x, reverse: bool = False, data_init: bool = False):
    del data_init
    c = x.shape[-1]
    w = self.param('kernel', nn.initializers.orthogonal(), (c, c))
    logdet = _per_example(
        x.shape[1] * x.shape[2] * jnp.linalg.slogdet(w)[1], x)
    if reverse:
      return _matmul(x, jnp.linalg.inv(w)), -logdet
    return _matmul(x, w), logdet


def lu_of_random_rotation(channels: int, seed: int):
  """(P, L, U strictly upper, sign(s), log|s|) of W = P L (U + diag(s)) for
  a random rotation W (paper sec. 3.2: P stays fixed, L, U, log|s| are
  learned; sign(s) is fixed too, as openai/glow)."""
  rng = np.random.default_rng(seed)
  w = np.linalg.qr(rng.standard_normal((channels, channels)))[0]
  p, lower, upper = scipy.linalg.lu(w)
  s = np.diag(upper)
  return (p.astype(np.float32), lower.astype(np.float32),
          np.triu(upper, k=1).astype(np.float32),
          np.sign(s).astype(np.float32), np.log(np.abs(s)).astype(np.float32))


class InvConv1x1LU(nn.Module):
  """The LU-decomposed 1x1 convolution (paper sec. 3.2, eq. 10):
  W = P L (U + diag(sign(s) exp(log|s|))), logdet = H W sum(log|s|),
  O(C) instead of O(C^3). P and sign(s) are constants of the
  architecture: computed (numpy) from the rotation drawn with `seed`, the
  same at every trace, so they need no place in the train state; L, U and
  log|s| start at that rotation's factors."""
  seed: int

  @nn.compact
  def __call__(self, x, reverse: bool = False, data_init: bool = False):
    del data_init
    c = x.shape[-1]
    p, lower0, upper0, sign_s, log_s0 = lu_of_random_rotation(c, self.seed)
    lower = self.param('lower', _constant(lower0), (c, c))
    upper = self.param('upper', _constant(upper0), (c, c))
    log_s = self.param('log_s', _constant(log_s0), (c,))
    eye = jnp.eye(c, dtype=x.dtype)
    lower = jnp.tril(lower, -1) + eye
    upper = jnp.triu(upper, 1) + jnp.diag(sign_s * jnp.exp(log_s))
    logdet = _per_example(x.shape[1] * x.shape[2] * jnp.sum(log_s), x)
    if reverse:
      # W^-1 = U^-1 L^-1 P^T, triangular solves (P orthogonal).
      w_inv = jax.scipy.linalg.solve_triangular(
          upper, jax.scipy.linalg.solve_triangular(lower, p.T, lower=True),
          lower=False)
      return _matmul(x, w_inv), -logdet
    return _matmul(x, _matmul(_matmul(jnp.asarray(p), lower), upper)), logdet


class Permutation(nn.Module):
  """A fixed channel permutation (paper Table 3's baselines): 'reverse'
  (RealNVP) or 'shuffle' (a random one drawn with `seed`); logdet 0."""
  kind: str
  seed: int = 0

  def __call__(self, x, reverse: bool = False, data_init: bool = False):
    del data_init
    c = x.shape[-1]
    if self.kind == 'reverse':
      perm = np.arange(c)[::-1]
    else:
      perm = np.random.default_rng(self.seed).permutation(c)
    if reverse:
      perm = np.argsort(perm)
    return x[..., perm], jnp.zeros(x.shape[:1], x.dtype)


def permutation_layer(kind: str, seed: int, name: str) -> nn.Module:
  """The channel mixing of one flow step: config.glow.permutation."""
  if kind == 'invconv':
    return InvConv1x1(name=name)
  if kind == 'invconv_lu':
    return InvConv1x1LU(seed=seed, name=name)
  if kind in ('reverse', 'shuffle'):
    return Permutation(kind, seed, name=name)
  raise ValueError(f'permutation {kind!r}: use one of {PERMUTATIONS}')


class SplitPrior(nn.Module):
  """The learned prior of a factored-out half (openai/glow's split2d):
  z_b ~ N(mean, exp(logs)^2) with (mean, logs) = Conv2dZeros(z_a),
  interleaved channels. Applied as the affine map z_b -> eps = (z_b -
  mean) exp(-logs) (logdet -sum logs), so the latents the flow returns
  are standard normal under the model and temperature is a scale of eps.
  (z_a, z_b) -> (eps, logdet); reverse: (z_a, eps) -> (z_b, logdet)."""

  @nn.compact
  def __call__(self, z_a, z_b, reverse: bool = False):
    h = Conv2dZeros(2 * z_b.shape[-1], name='conv')(z_a)
    mean, logs = h[..., 0::2], h[..., 1::2]
    logdet = -jnp.sum(logs, axis=(1, 2, 3))
    if reverse:
      return mean + jnp.exp(logs) * z_b, -logdet
    return (z_b - mean) * jnp.exp(-logs), logdet


class TopPrior(nn.Module):
  """The prior of the last level's output: N(0, I), or with learn_top
  (openai/glow's learntop) N(mean, exp(logs)^2) per channel, where
  (mean, logs) = b exp(3 s) as openai's conv2d_zeros of a zero input
  (b, s zero at init). Applied as an affine map like SplitPrior."""
  learn_top: bool = False

  @nn.compact
  def __call__(self, z, reverse: bool = False):
    if not self.learn_top:
      return z, jnp.zeros(z.shape[:1], z.dtype)
    c = z.shape[-1]
    bias = self.param('bias', nn.initializers.zeros, (2 * c,))
    logs = self.param('logs', nn.initializers.zeros, (2 * c,))
    h = bias * jnp.exp(logs * LOGSCALE_FACTOR)
    mean, log_scale = h[:c], h[c:]
    logdet = _per_example(-z.shape[1] * z.shape[2] * jnp.sum(log_scale), z)
    if reverse:
      return mean + jnp.exp(log_scale) * z, -logdet
    return (z - mean) * jnp.exp(-log_scale), logdet
