"""DC-GAN's generator and discriminator (Radford et al. 2016, sec. 3-4).

Generator: z (B, z_dim) -> a dense projection reshaped to a base x base map
-> 4x4 transposed convolutions of stride 2, each doubling the side -> tanh
(images in [-1, 1]). One width per level: `widths[0]` is the projected
map's, each further width one transposed convolution's; the last transposed
convolution outputs the image channels, so the side is base * 2^len(widths)
(8 = 2 * 2^2, 28 = 7 * 2^2, 32 = 4 * 2^3; `generator_base_size`).
Normalisation after every layer but the output one (DC-GAN's BatchNorm), then
ReLU; weights ~ N(0, 0.02) (sec. 4).

Discriminator: 4x4 convolutions of stride 2 ('SAME': the side becomes
ceil(side / 2), so any image size works), LeakyReLU(0.2), no normalisation
on the first layer (sec. 3), then one dense logit per image. Its
normalisation is 'none' or GroupNorm, not DC-GAN's BatchNorm: with
BatchNorm each image's logit depends on the rest of its batch, which breaks
R1's per-image input gradient and makes real and fake batches see different
statistics (models/discriminator.py gives the same reasons). Optional
spectral normalisation (Miyato et al. 2018, eq. 8 and Algorithm 1): each
kernel is divided by its largest singular value, estimated by one power
iteration per update from a vector u kept in the 'spectral' collection
(flax's SpectralNorm; the trainer's state holds it).

`slerp`: the latent path of eval mode's interpolation figure (sec. 6.1).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.group_norm import GroupNorm
from diffusion_jax.models.unet import Conv

GENERATOR_NORMS = ('batch', 'group', 'none')
DISCRIMINATOR_NORMS = ('none', 'group')
# The collection of the generator's BatchNorm running statistics, and of
# the discriminator's spectral-norm power-iteration vectors.
BATCH_STATS, SPECTRAL = 'batch_stats', 'spectral'

# DC-GAN sec. 4: "All weights were initialized from a zero-centered Normal
# distribution with standard deviation 0.02."
_kernel_init = nn.initializers.normal(0.02)


def generator_base_size(image_size: int, num_levels: int) -> int | None:
  """The side of the projected map, image_size / 2^num_levels, or None where
  the image size is not divisible (the generator cannot output it)."""
  if image_size % 2 ** num_levels:
    return None
  return image_size // 2 ** num_levels


def slerp(z0: jax.Array, z1: jax.Array, t: jax.Array) -> jax.Array:
  """Spherical interpolation (Shoemake 1985) of z0, z1 (..., d) at t (T,)
  -> (..., T, d).

  Why not linear: z ~ N(0, I_d) lies near the sphere of radius sqrt(d), and
  the midpoint of two independent draws has norm about sqrt(d / 2), where
  the generator never saw an input (White 2016, "Sampling generative
  networks"). Along the great circle the norm moves monotonically from
  |z0| to |z1| (constant for equal norms), at a constant angular speed.
  Near-parallel endpoints (sin(Omega) ~ 0) fall back to the linear formula,
  its limit."""
  t = t.astype(jnp.float32)[:, None]
  z0, z1 = z0[..., None, :], z1[..., None, :]
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1,
                                                   keepdims=True), 1e-12)
  cos = jnp.clip(jnp.sum(unit(z0) * unit(z1), axis=-1, keepdims=True),
                 -1.0, 1.0)
  omega = jnp.arccos(cos)
  sin = jnp.sin(omega)
  small = sin < 1e-6
  safe_sin = jnp.where(small, 1.0, sin)
  w0 = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe_sin)
  w1 = jnp.where(small, t, jnp.sin(t * omega) / safe_sin)
  return w0 * z0 + w1 * z1


def _groups(width: int) -> int:
  """32 groups where they divide the width, else the largest divisor that
  does (models/discriminator.py's rule)."""
  return math.gcd(32, width)


def _norm(kind: str, width: int, train: bool, name: str):
  if kind == 'batch':
    # PyTorch's BatchNorm2d (DC-GAN's reference code): momentum 0.1 there is
    # flax's 0.9; eps 1e-5. Under jit over a mesh the mean is over the
    # global batch (XLA all-reduces), so the device count changes nothing.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, name=name)
  if kind == 'group':
    return GroupNorm(_groups(width), name=name)
  return lambda h: h


class Generator(nn.Module):
  """z (B, z_dim) -> images (B, base * 2^L, base * 2^L, channels) in [-1, 1].

  Attributes:
    widths: (w_0, ..., w_{L-1}): the projected base x base map's width, then
      each stride-2 transposed convolution's but the last (which outputs
      `channels`). L = len(widths) doublings.
    base: side of the projected map.
    channels: image channels.
    norm: 'batch' (DC-GAN; running statistics in 'batch_stats', used when
      train=False), 'group' or 'none'.
  """
  widths: tuple[int, ...]
  base: int
  channels: int
  norm: str = 'batch'

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    # No bias before a normalisation with its own shift.
    bias = self.norm == 'none'
    w0 = self.widths[0]
    h = nn.Dense(self.base * self.base * w0, use_bias=bias,
                 kernel_init=_kernel_init, name='project')(
                     z.astype(jnp.float32))
    h = h.reshape(z.shape[0], self.base, self.base, w0)
    h = nn.relu(_norm(self.norm, w0, train, 'norm_0')(h))
    for i, width in enumerate(self.widths[1:], start=1):
      h = nn.ConvTranspose(width, (4, 4), strides=(2, 2), padding='SAME',
                           use_bias=bias, kernel_init=_kernel_init,
                           name=f'up_{i}')(h)
      h = nn.relu(_norm(self.norm, width, train, f'norm_{i}')(h))
    # Sec. 3: no normalisation on the output layer, tanh to [-1, 1].
    h = nn.ConvTranspose(self.channels, (4, 4), strides=(2, 2),
                         padding='SAME', kernel_init=_kernel_init,
                         name='up_out')(h)
    return jnp.tanh(h)


class Discriminator(nn.Module):
  """images (B, H, W, C) -> logits (B,), D(x) = sigmoid(logit).

  Attributes:
    widths: one stride-2 4x4 convolution per width.
    norm: 'none' or 'group' (never on the first layer).
    spectral_norm: divide every kernel by its spectral norm (Miyato et al.).
  """
  widths: tuple[int, ...]
  norm: str = 'none'
  spectral_norm: bool = False

  def _layer(self, layer, h, update_stats):
    if not self.spectral_norm:
      return layer(h)
    # One power iteration per call from the stored u (Algorithm 1); with
    # update_stats the new u is written back (once per train step).
    return nn.SpectralNorm(layer, collection_name=SPECTRAL)(
        h, update_stats=update_stats)

  @nn.compact
  def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
    h = x.astype(jnp.float32)
    for i, width in enumerate(self.widths):
      with_norm = i > 0 and self.norm != 'none'
      h = self._layer(Conv(width, (4, 4), strides=(2, 2), padding='SAME',
                           use_bias=not with_norm, kernel_init=_kernel_init,
                           name=f'conv_{i}'), h, update_stats)
      if with_norm:
        h = GroupNorm(_groups(width), name=f'norm_{i}')(h)
      h = nn.leaky_relu(h, negative_slope=0.2)
    h = h.reshape(h.shape[0], -1)
    logits = self._layer(nn.Dense(1, kernel_init=_kernel_init, name='logit'),
                         h, update_stats)
    return logits[:, 0]
