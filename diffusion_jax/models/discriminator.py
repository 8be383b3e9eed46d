"""The patch discriminator of pix2pix, as taming-transformers and LDM use it.

Isola et al. 2017 ("Image-to-Image Translation with Conditional Adversarial
Networks", sec. 3.2.2 and appendix 6.1.2): a fully convolutional network
whose every output logit judges one receptive-field patch of the image as
real or fake (PatchGAN), so the adversarial loss sharpens local texture
while the pixel loss keeps the low frequencies. `NLayerDiscriminator` of
taming-transformers (Esser et al. 2021) and latent diffusion (Rombach et
al. 2022): 4x4 convolutions with padding 1; `num_layers` of them stride 2
(the first without normalisation), widths ch * min(2^n, 8); one more 4x4
stride-1 convolution with normalisation; a 4x4 stride-1 convolution to one
logit per patch; LeakyReLU(0.2) between them.

Normalisation: GroupNorm instead of pix2pix's BatchNorm (or taming's
optional ActNorm). BatchNorm needs batch-statistics state and a train/eval
switch, and makes each image's logit depend on the other images of its
(per-device) batch, so one device and eight would train differently.
ActNorm initialises from the first batch's statistics, which `init` (no
data) cannot see. GroupNorm has neither: per image, no state, no data-
dependent init.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.group_norm import GroupNorm
from diffusion_jax.models.unet import Conv

# pix2pix's weights_init: conv kernels ~ N(0, 0.02).
_kernel_init = nn.initializers.normal(0.02)


def output_size(image_size: int, num_layers: int) -> int:
  """Side of the logit map: each stride-2 conv (k4, p1) maps s to
  floor(s / 2), each stride-1 conv (k4, p1) to s - 1. Below 1 the
  discriminator is too deep for the image."""
  size = image_size
  for _ in range(num_layers):
    size = (size + 2 - 4) // 2 + 1
  return size - 2


def _groups(width: int) -> int:
  """GroupNorm groups: 32 where they divide the width (the usual count),
  else the largest common divisor (a small disc_ch)."""
  return math.gcd(32, width)


class PatchDiscriminator(nn.Module):
  """images (B, H, W, C) in [-1, 1] -> logits (B, h, w, 1), one per patch.

  Attributes:
    ch: width of the first layer (pix2pix / LDM: 64).
    num_layers: stride-2 convolutions (LDM: 3, receptive field 70x70).
  """
  ch: int = 64
  num_layers: int = 3

  def _conv(self, features, stride, use_bias, name):
    return Conv(features, (4, 4), strides=(stride, stride),
                padding=((1, 1), (1, 1)), use_bias=use_bias,
                kernel_init=_kernel_init, name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = lambda h: nn.leaky_relu(h, negative_slope=0.2)
    h = act(self._conv(self.ch, 2, True, 'conv_0')(x.astype(jnp.float32)))
    for n in range(1, self.num_layers + 1):
      width = self.ch * min(2 ** n, 8)
      # The last of these is stride 1 (pix2pix's n_layers + 1-th layer).
      stride = 2 if n < self.num_layers else 1
      # No bias before a normalisation with its own shift.
      h = self._conv(width, stride, False, f'conv_{n}')(h)
      h = act(GroupNorm(_groups(width), name=f'norm_{n}')(h))
    return self._conv(1, 1, True, 'conv_out')(h)
