"""The seed's classic VAE network (Kingma & Welling 2014): small and plain.

An encoder maps an image to the mean and log-variance of a diagonal
Gaussian posterior q(z|x) over a latent of shape (H/f, W/f, C) (spatial) or
(d,) (a flat vector); a decoder maps z to two numbers per pixel and channel,
the location and log-scale of a discretised likelihood p(x|z) (a logistic or
a Gaussian integrated over the 8-bit bins: methods/vae.py).

Each resolution level is `blocks_per_level` residual blocks
(norm-swish-conv twice, as the DDPM U-Net's without the time embedding), one
stride-2 3x3 convolution between consecutive levels on the way down and
nearest-neighbour 2x upsampling + a 3x3 convolution on the way up, so
f = 2^(len(widths) - 1). A flat latent goes through one Dense layer at the
lowest resolution. No attention and no skip connections: the decoder sees x
only through z.

Not models/autoencoder.py: that is latent diffusion's SD-layout KL
autoencoder (mid-block attention, diffusers' names), trained with a GAN.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import conv as conv_lib
from diffusion_jax.models.group_norm import GroupNorm

# nn.Conv with the project's faster CPU weight gradient (models/conv.py).
Conv = functools.partial(nn.Conv,
                         conv_general_dilated=conv_lib.conv_general_dilated)
_default_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
# LDM's DiagonalGaussianDistribution clamps the log-variance to this range:
# exp() of an untrained encoder's output can neither overflow nor reach 0.
LOGVAR_RANGE = (-30.0, 20.0)


def down_factor(widths: Sequence[int]) -> int:
  """f: image side / latent side (one 2x downsampling between levels)."""
  return 2 ** (len(widths) - 1)


def _conv(features: int, name: str, *, stride: int = 1, kernel: int = 3,
          kernel_init=_default_init):
  return Conv(features, (kernel, kernel), strides=(stride, stride),
              padding='SAME', kernel_init=kernel_init, name=name)


def _norm_act(h, num_groups: int, name: str):
  """GroupNorm (num_groups > 0; 0: none) then swish."""
  if num_groups:
    h = GroupNorm(num_groups, name=name)(h)
  return nn.swish(h)


class ResBlock(nn.Module):
  """x + conv(act(norm(conv(act(norm(x)))))), 1x1 shortcut on a width
  change. (B, H, W, any) -> (B, H, W, width)."""
  width: int
  num_groups: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.width, 'conv1')(_norm_act(x, self.num_groups, 'norm1'))
    h = _conv(self.width, 'conv2')(_norm_act(h, self.num_groups, 'norm2'))
    if x.shape[-1] != self.width:
      x = _conv(self.width, 'conv_shortcut', kernel=1)(x)
    return x + h


class Encoder(nn.Module):
  """x (B, H, W, C) -> (mean, logvar) of q(z|x), each (B, *latent_shape)."""
  widths: Sequence[int]
  blocks_per_level: int
  num_groups: int
  latent_shape: Sequence[int]

  @nn.compact
  def __call__(self, x):
    h = _conv(self.widths[0], 'conv_in')(x)
    for i, width in enumerate(self.widths):
      for j in range(self.blocks_per_level):
        h = ResBlock(width, self.num_groups, name=f'down_{i}_block_{j}')(h)
      if i != len(self.widths) - 1:
        h = _conv(self.widths[i + 1], f'down_{i}_downsample', stride=2)(h)
    h = _norm_act(h, self.num_groups, 'norm_out')
    if len(self.latent_shape) == 3:  # (H/f, W/f, C)
      moments = _conv(2 * self.latent_shape[-1], 'conv_out')(h)
    else:  # (d,)
      moments = nn.Dense(2 * self.latent_shape[0], kernel_init=_default_init,
                         name='dense_out')(h.reshape(h.shape[0], -1))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class Decoder(nn.Module):
  """z (B, *latent_shape) -> (loc, log_scale), each (B, H, W, channels)."""
  widths: Sequence[int]
  blocks_per_level: int
  num_groups: int
  image_size: int
  channels: int

  @nn.compact
  def __call__(self, z):
    widths = tuple(reversed(self.widths))
    if z.ndim == 2:  # flat latent -> the lowest resolution's feature map
      side = self.image_size // down_factor(self.widths)
      h = nn.Dense(side * side * widths[0], kernel_init=_default_init,
                   name='dense_in')(z).reshape(-1, side, side, widths[0])
    else:
      h = _conv(widths[0], 'conv_in')(z)
    for i, width in enumerate(widths):
      for j in range(self.blocks_per_level):
        h = ResBlock(width, self.num_groups, name=f'up_{i}_block_{j}')(h)
      if i != len(widths) - 1:
        b, height, w, c = h.shape
        h = jax.image.resize(h, (b, 2 * height, 2 * w, c), 'nearest')
        h = _conv(widths[i + 1], f'up_{i}_upsample')(h)
    h = _norm_act(h, self.num_groups, 'norm_out')
    # Zero-initialised: training starts from loc = 0, log_scale = 0 for
    # every z (a broad likelihood, a finite loss), as the DDPM U-Net's
    # output convolution starts at zero.
    out = _conv(2 * self.channels, 'conv_out',
                kernel_init=nn.initializers.zeros_init())(h)
    loc, log_scale = jnp.split(out, 2, axis=-1)
    return loc, log_scale


class VAE(nn.Module):
  """`encode`, `decode`, and both in `__call__` (what `init` traces).

  Attributes:
    widths: channels per resolution level; f = 2^(len(widths) - 1).
    blocks_per_level: residual blocks per level, in each direction.
    num_groups: GroupNorm groups (must divide every width); 0: no norm.
    latent_shape: (image_size/f, image_size/f, C) or (d,).
    image_size, channels: the images' side and channels.
  """
  widths: Sequence[int] = (32, 64)
  blocks_per_level: int = 1
  num_groups: int = 8
  latent_shape: Sequence[int] = (4, 4, 4)
  image_size: int = 8
  channels: int = 1

  def setup(self):
    self.encoder = Encoder(tuple(self.widths), self.blocks_per_level,
                           self.num_groups, tuple(self.latent_shape))
    self.decoder = Decoder(tuple(self.widths), self.blocks_per_level,
                           self.num_groups, self.image_size, self.channels)

  def encode(self, x):
    """(B, H, W, C) -> (mean, logvar), each (B, *latent_shape)."""
    return self.encoder(x)

  def decode(self, z):
    """(B, *latent_shape) -> (loc, log_scale), each (B, H, W, C)."""
    return self.decoder(z)

  def __call__(self, x, eps):
    """Reparameterised (Kingma & Welling 2014 eq. 10): z = mean + sigma *
    eps. -> (loc, log_scale, mean, logvar)."""
    mean, logvar = self.encode(x)
    loc, log_scale = self.decode(mean + jnp.exp(0.5 * logvar) * eps)
    return loc, log_scale, mean, logvar
