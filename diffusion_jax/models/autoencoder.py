"""The KL-regularised convolutional autoencoder of latent diffusion.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion
Models", sec. 3.1 and appendix G): an encoder maps an image x (H, W, 3) to a
diagonal Gaussian q(z|x) over latents z (H/f, W/f, C), a decoder maps z back
to an image; a small KL(q(z|x) || N(0, I)) term keeps the latent space
close to standard normal. The down factor f = 2^(levels - 1); the Stable
Diffusion VAE has f = 8, C = 4.

Module names follow diffusers' `AutoencoderKL` (`encoder/down_blocks_i_
resnets_j`, `mid_block_attentions_0`, `conv_norm_out`, `quant_conv`, ...) so
that its checkpoints map onto our parameters one tensor at a time
(convert/diffusers_vae.py). As in diffusers, the decoder's `up_blocks_0` is
the lowest resolution. The stride-2 downsampler, nearest-2x upsampler and
single-head attention block are the U-Net's (models/unet.py): the same
layers under the same names.

Images and latents are NHWC. Parameters are float32; `dtype` is the compute
dtype; GroupNorm statistics, the attention softmax and every output are
float32.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.group_norm import GroupNorm
from diffusion_jax.models.unet import AttentionBlock
from diffusion_jax.models.unet import Conv
from diffusion_jax.models.unet import Downsample
from diffusion_jax.models.unet import Upsample

# LDM's Normalize() and diffusers' Encoder/Decoder hard-code eps = 1e-6 in
# every GroupNorm (also our GroupNorm's default, used by AttentionBlock).
NORM_EPS = 1e-6
# DiagonalGaussianDistribution (LDM, diffusers) clamps the log-variance to
# this range, so exp(logvar) neither underflows to 0 nor overflows.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

_default_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example, shape (B,).

  Closed form 0.5 * sum(mean^2 + sigma^2 - 1 - log sigma^2), summed over all
  latent dimensions (LDM's DiagonalGaussianDistribution.kl; its loss then
  averages over the batch and weights the term by ~1e-6).
  """
  mean = mean.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  per_dim = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(per_dim, axis=tuple(range(1, mean.ndim)))


def sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """z ~ N(mean, exp(logvar)) by reparameterisation (Kingma & Welling 2014):
  z = mean + exp(logvar / 2) * eps, eps ~ N(0, I), differentiable in both."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean.astype(jnp.float32)
          + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps)


def _conv(features: int, kernel: int, dtype, name: Optional[str]):
  return Conv(features, (kernel, kernel), padding='SAME', dtype=dtype,
              kernel_init=_default_init, name=name)


def _norm(num_groups: int, dtype, name: str):
  return GroupNorm(num_groups, epsilon=NORM_EPS, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice, 1x1 shortcut when the width changes.

  The U-Net's block without the time embedding (diffusers' ResnetBlock2D
  with temb_channels=None; LDM's ResnetBlock with temb_channels=0). The VAE
  trains without dropout, so there is none.
  """
  out_ch: int
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.swish(_norm(self.num_groups, self.dtype, 'norm1')(x))
    h = _conv(self.out_ch, 3, self.dtype, 'conv1')(h)
    h = nn.swish(_norm(self.num_groups, self.dtype, 'norm2')(h))
    h = _conv(self.out_ch, 3, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, 1, self.dtype, 'conv_shortcut')(x)
    return x + h


def _mid_block(h, num_groups: int, dtype):
  """ResNet, single-head self-attention, ResNet at the lowest resolution
  (diffusers' UNetMidBlock2D with attention_head_dim = width: one head)."""
  width = h.shape[-1]
  h = ResnetBlock(width, num_groups, dtype, name='mid_block_resnets_0')(h)
  h = AttentionBlock(num_groups, dtype, name='mid_block_attentions_0')(h)
  return ResnetBlock(width, num_groups, dtype, name='mid_block_resnets_1')(h)


class Encoder(nn.Module):
  """x (B, H, W, in) -> (B, H/f, W/f, 2 * latent_channels): the moments of
  q(z|x) before quant_conv."""
  block_out_channels: Sequence[int]
  latent_channels: int
  layers_per_block: int
  norm_num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    levels = len(self.block_out_channels)
    h = _conv(self.block_out_channels[0], 3, self.dtype, 'conv_in')(
        x.astype(self.dtype))
    for i, width in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        h = ResnetBlock(width, self.norm_num_groups, self.dtype,
                        name=f'down_blocks_{i}_resnets_{j}')(h)
      if i != levels - 1:
        # diffusers (downsample_padding=0) pads (0, 1) bottom/right, then a
        # VALID stride-2 conv; 'SAME' pads exactly that on an even size,
        # which every level but the last has (checked in AutoencoderKL).
        h = Downsample(self.dtype, name=f'down_blocks_{i}_downsamplers_0')(h)
    h = _mid_block(h, self.norm_num_groups, self.dtype)
    h = nn.swish(_norm(self.norm_num_groups, self.dtype, 'conv_norm_out')(h))
    # Mean and log-variance of q(z|x) ("double_z" in LDM).
    return _conv(2 * self.latent_channels, 3, self.dtype, 'conv_out')(h)


class Decoder(nn.Module):
  """z (B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""
  block_out_channels: Sequence[int]
  out_channels: int
  layers_per_block: int
  norm_num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    widths = tuple(reversed(self.block_out_channels))
    h = _conv(widths[0], 3, self.dtype, 'conv_in')(z.astype(self.dtype))
    h = _mid_block(h, self.norm_num_groups, self.dtype)
    for i, width in enumerate(widths):
      # One ResNet more than on the way down, as in LDM's decoder
      # (num_res_blocks + 1); there are no skip connections to feed.
      for j in range(self.layers_per_block + 1):
        h = ResnetBlock(width, self.norm_num_groups, self.dtype,
                        name=f'up_blocks_{i}_resnets_{j}')(h)
      if i != len(widths) - 1:
        h = Upsample(self.dtype, name=f'up_blocks_{i}_upsamplers_0')(h)
    h = nn.swish(_norm(self.norm_num_groups, self.dtype, 'conv_norm_out')(h))
    return _conv(self.out_channels, 3, self.dtype, 'conv_out')(h)


class AutoencoderKL(nn.Module):
  """The latent-diffusion VAE: `encode`, `decode`, and both in `__call__`.

  Attributes:
    block_out_channels: width per level (LDM's ch * ch_mult); one 2x down-
      sampling between consecutive levels, so f = 2^(len - 1): (128, 256,
      512, 512) is the Stable Diffusion VAE, f = 8.
    latent_channels: C, channels of z (4 for SD's VAE; 8, 16, ... work).
    layers_per_block: ResNet blocks per encoder level (decoder: one more).
    norm_num_groups: GroupNorm groups; must divide every width.
    out_channels: channels of the reconstruction (those of x, usually 3).
    dtype: compute dtype; parameters stay float32, outputs are float32.
  """
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  latent_channels: int = 4
  layers_per_block: int = 2
  norm_num_groups: int = 32
  out_channels: int = 3
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    for width in self.block_out_channels:
      if width % self.norm_num_groups:
        raise ValueError(
            f'AutoencoderKL: width {width} of block_out_channels='
            f'{tuple(self.block_out_channels)} does not split into '
            f'norm_num_groups={self.norm_num_groups} groups: change either')
    kw = dict(block_out_channels=tuple(self.block_out_channels),
              layers_per_block=self.layers_per_block,
              norm_num_groups=self.norm_num_groups, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    # 1x1 convs on the moments and on z ("quant_conv" is a VQ-GAN leftover:
    # LDM's KL model keeps them, so its checkpoints have them).
    self.quant_conv = _conv(2 * self.latent_channels, 1, self.dtype, None)
    self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, None)

  @property
  def down_factor(self) -> int:
    """f: image size / latent size."""
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, 3) in [-1, 1] -> (mean, logvar) of q(z|x), each
    (B, H/f, W/f, latent_channels), float32; logvar clipped to [-30, 20]."""
    f = self.down_factor
    height, width = x.shape[1:3]
    if height % f or width % f:
      raise ValueError(
          f'AutoencoderKL: image size {height}x{width} is not divisible by '
          f'the down factor f={f} (2**(len(block_out_channels) - 1), '
          f'block_out_channels={tuple(self.block_out_channels)}): crop or '
          f'pad the images to a multiple of {f} (e.g. '
          f'{height // f * f or f}x{width // f * f or f}), or use fewer '
          'levels')
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """z (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels),
    float32."""
    h = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(h).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None,
               sample_posterior: bool = True):
    """(reconstruction, mean, logvar): decodes z ~ q(z|x) (drawn with `rng`)
    or, with sample_posterior=False, the posterior mean (LDM's mode())."""
    mean, logvar = self.encode(x)
    if not sample_posterior:
      z = mean
    elif rng is None:
      raise ValueError('AutoencoderKL: sample_posterior=True needs rng (a '
                       'jax.random key); pass one, or sample_posterior=False '
                       'to decode the posterior mean')
    else:
      z = sample(mean, logvar, rng)
    return self.decode(z), mean, logvar


def init_params(model: AutoencoderKL, rng: jax.Array, in_channels: int = 3):
  """Initial parameters for images with in_channels channels. A convnet's
  parameters do not depend on the image size, so the smallest valid one is
  used; jax.eval_shape(functools.partial(init_params, model), rng) gives
  the shapes alone."""
  f = model.down_factor
  x = jnp.zeros((1, f, f, in_channels), jnp.float32)
  init = jax.jit(model.init, static_argnames='sample_posterior')
  return init(rng, x, sample_posterior=False)['params']
