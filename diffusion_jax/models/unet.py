"""The DDPM U-Net (Ho et al. 2020, appendix B) in Flax Linen.

A PixelCNN++-style backbone of wide ResNet blocks with GroupNorm, one
single-head self-attention block at chosen resolutions, and a sinusoidal
time embedding fed to every block through a 2-layer MLP.

With context_dim > 0 the U-Net also conditions on a token sequence (a
caption): at every resolution with self-attention (attn_resolutions and the
mid block), a cross-attention block (models/cross_attention.py) follows the
self-attention block, as LDM's SpatialTransformer puts self- then cross-
attention there (Rombach et al. 2022). Each starts as the identity.

Module names follow diffusers' `UNet2DModel` (`conv_in`, `time_embedding`,
`down_blocks_i/resnets_j`, `mid_block`, `up_blocks_i`, `conv_norm_out`,
`conv_out`) so that the published DDPM checkpoints map onto our parameters
one tensor at a time. As in diffusers, `up_blocks_0` is the lowest
resolution.
"""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import conv as conv_lib
from diffusion_jax.models import remat as remat_lib
from diffusion_jax.models import text
from diffusion_jax.models.cross_attention import CrossAttentionBlock
from diffusion_jax.models.group_norm import GroupNorm


def timestep_embedding(timesteps: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, [sin, cos].

  Frequencies exp(-log(10000) * i / (dim/2 - 1)), i = 0..dim/2-1, as in the
  DDPM code (diffusers: flip_sin_to_cos=False, freq_shift=1).
  """
  if dim % 2:
    raise ValueError(f'timestep embedding dim must be even, got {dim}')
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32)
                  / (half - 1))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _zero_init_last() -> nn.initializers.Initializer:
  # The DDPM code initialises the last conv of each residual branch and the
  # output conv with a tiny scale (1e-10); zeros make every block start as
  # the identity, which is what that achieves.
  return nn.initializers.zeros_init()


# w -> GUIDANCE_EMBEDDING_SCALE w before the sinusoidal embedding: the
# guidance weights of Meng et al. (2023), 0..4, then cover 0..1000 as the
# DDPM timesteps do.
GUIDANCE_EMBEDDING_SCALE = 250.0

_default_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')

# nn.Conv (same parameters) whose weight gradient is a faster formulation on
# CPU; XLA's own convolution elsewhere. See models/conv.py (WEIGHT_GRAD).
Conv = functools.partial(nn.Conv,
                         conv_general_dilated=conv_lib.conv_general_dilated)


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv twice, time embedding added in between."""
  out_ch: int
  dropout: float
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    conv = lambda ch, k, name, **kw: Conv(
        ch, (k, k), padding='SAME', dtype=self.dtype, name=name,
        kernel_init=kw.pop('kernel_init', _default_init))
    h = GroupNorm(self.num_groups, dtype=self.dtype, name='norm1')(x)
    h = conv(self.out_ch, 3, 'conv1')(nn.swish(h))
    h += nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=_default_init,
                  name='time_emb_proj')(nn.swish(temb))[:, None, None, :]
    h = GroupNorm(self.num_groups, dtype=self.dtype, name='norm2')(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    h = conv(self.out_ch, 3, 'conv2', kernel_init=_zero_init_last())(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, 1, 'conv_shortcut')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all spatial positions, residual."""
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = GroupNorm(self.num_groups, dtype=self.dtype, name='group_norm')(x)
    h = h.reshape(b, hgt * wid, c)
    dense = lambda name, **kw: nn.Dense(c, dtype=self.dtype, name=name,
                                        kernel_init=kw.get('init', _default_init))
    q, k, v = dense('to_q')(h), dense('to_k')(h), dense('to_v')(h)
    weights = jnp.einsum('bqc,bkc->bqk', q, k) * (c ** -0.5)
    weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1)
    h = jnp.einsum('bqk,bkc->bqc', weights.astype(v.dtype), v)
    h = dense('to_out', init=_zero_init_last())(h)
    return x + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
  """Stride-2 3x3 conv; 'SAME' pads (0, 1) like TensorFlow's DDPM code."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv(x.shape[-1], (3, 3), strides=(2, 2), padding='SAME',
                dtype=self.dtype, kernel_init=_default_init, name='conv')(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    x = x.reshape(b, 2 * h, 2 * w, c)
    return Conv(c, (3, 3), padding='SAME', dtype=self.dtype,
                kernel_init=_default_init, name='conv')(x)


class UNet(nn.Module):
  """eps_theta(x_t, t): predicts the noise (or another target) from x_t.

  Attributes:
    out_channels: channels of the prediction (the image channels, doubled
      when a variance is learned).
    ch: base channel count.
    ch_mult: channel multiplier per resolution; one downsampling between
      consecutive resolutions.
    num_res_blocks: ResNet blocks per resolution on the way down (one more
      on the way up, fed by the skip connections).
    attn_resolutions: spatial sizes (e.g. 16) at which attention follows
      each ResNet block.
    dropout: dropout rate inside ResNet blocks.
    num_groups: GroupNorm groups.
    temb_dim: width of the time-embedding MLP (4 * ch in the paper).
    dtype: compute dtype (parameters stay float32).
    num_classes: 0 for an unconditional model; otherwise class labels
      0..num_classes-1 are embedded and added to the time embedding, and
      label num_classes is the learned null class of classifier-free
      guidance (Ho & Salimans 2022), used when no label is given.
    guidance_input: the guidance weight w is an input too (a guidance-
      conditioned progressive-distillation student, Meng et al. 2023),
      embedded like the time and added to its embedding through a last
      layer that starts at zero, so the network starts as the same network
      without it (a student initialised from its teacher).
    context_dim: 0, or the width of the context tokens that cross-attention
      blocks (named *_cross_attn_*, which no diffusers tensor maps to)
      attend to; see models/text.py for the context and its null sequence.
    cross_attn_heads: heads of those blocks (a divisor of the channels at
      every attention resolution).
    text_vocab_size: 0: the context is precomputed (B, L, context_dim)
      embeddings; > 0: (B, L) token ids encoded by a text encoder of this
      vocabulary trained with the network (text.TextEncoder).
    text_max_length, text_depth, text_heads: that encoder's positions,
      blocks and heads.
  """
  out_channels: int
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_groups: int = 32
  temb_dim: int = 512
  dtype: jnp.dtype = jnp.float32
  remat: str = 'none'  # models/remat.py's POLICIES
  num_classes: int = 0
  guidance_input: bool = False
  context_dim: int = 0
  cross_attn_heads: int = 4
  text_vocab_size: int = 0
  text_max_length: int = 0
  text_depth: int = 2
  text_heads: int = 4

  @nn.compact
  def __call__(self, x, t, y=None, *, train: bool, guidance=None,
               context=None, context_mask=None):
    """x: (B, H, W, C) images, t: (B,) timesteps (integer or fractional),
    y: (B,) int class labels or None (the null class), guidance: (B,)
    guidance weights (guidance_input only; None: 0), context: (B, L) token
    ids or (B, L, context_dim) embeddings, context_mask: (B, L) bool (True:
    a real token; a row without one, or context None: the null sequence);
    returns (B, H, W, out_channels)."""
    if x.shape[1] != x.shape[2]:
      raise ValueError(f'UNet expects square images, got {x.shape[1:3]}')
    if x.shape[1] % 2 ** (len(self.ch_mult) - 1):
      raise ValueError(
          f'image size {x.shape[1]} is not divisible by '
          f'2**{len(self.ch_mult) - 1} (len(ch_mult)={len(self.ch_mult)}): '
          'change config.model.ch_mult or config.data.image_size')
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    # Remat per block; `train` (argument 3, the module being 0) is static.
    resnet = remat_lib.checkpointed(ResnetBlock, self.remat,
                                    static_argnums=(3,))
    res_block = lambda ch, name: resnet(ch, self.dropout, name=name, **kw)
    attn_block = lambda name: remat_lib.checkpointed(
        AttentionBlock, self.remat)(name=name, **kw)
    text.check_context_call(self.context_dim, context, context_mask, 'U-Net')
    ctx = text.ContextEncoder(
        self.context_dim, self.text_vocab_size, self.text_max_length,
        self.text_depth, self.text_heads, self.dtype, name='context_encoder')(
            context, context_mask, x.shape[0]) if self.context_dim else None

    def attention(h, name, cross_name):
      h = attn_block(name)(h)
      if ctx is not None:  # on the (B, H*W, C) tokens
        h = CrossAttentionBlock(self.cross_attn_heads, dtype=self.dtype,
                                name=cross_name)(
                                    h.reshape(h.shape[0], -1, h.shape[-1]),
                                    *ctx).reshape(h.shape)
      return h

    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(self.temb_dim, dtype=self.dtype, kernel_init=_default_init,
                    name='time_embedding_linear_1')(temb)
    temb = nn.Dense(self.temb_dim, dtype=self.dtype, kernel_init=_default_init,
                    name='time_embedding_linear_2')(nn.swish(temb))
    if self.num_classes:
      # As diffusers' class_embedding: added to the time embedding, so the
      # label reaches every ResNet block through the same projection.
      if y is None:
        y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      temb += nn.Embed(self.num_classes + 1, self.temb_dim, dtype=self.dtype,
                       name='class_embedding')(y)
    elif y is not None:
      raise ValueError('class labels given to an unconditional U-Net: set '
                       'config.model.num_classes to the number of classes')
    if self.guidance_input:
      temb += self._guidance_embedding(guidance, x.shape[0])
    elif guidance is not None:
      raise ValueError('a guidance weight given to a U-Net without '
                       'config.model.guidance_input')

    h = Conv(self.ch, (3, 3), padding='SAME', dtype=self.dtype,
             kernel_init=_default_init, name='conv_in')(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      prefix = f'down_blocks_{level}'
      for j in range(self.num_res_blocks):
        h = res_block(self.ch * mult, f'{prefix}_resnets_{j}')(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attention(h, f'{prefix}_attentions_{j}',
                        f'{prefix}_cross_attn_{j}')
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(self.dtype, name=f'{prefix}_downsamplers_0')(h)
        skips.append(h)

    h = res_block(h.shape[-1], 'mid_block_resnets_0')(h, temb, train)
    h = attention(h, 'mid_block_attentions_0', 'mid_block_cross_attn_0')
    h = res_block(h.shape[-1], 'mid_block_resnets_1')(h, temb, train)

    for i, mult in enumerate(reversed(self.ch_mult)):
      prefix = f'up_blocks_{i}'
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(self.ch * mult, f'{prefix}_resnets_{j}')(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attention(h, f'{prefix}_attentions_{j}',
                        f'{prefix}_cross_attn_{j}')
      if i != len(self.ch_mult) - 1:
        h = Upsample(self.dtype, name=f'{prefix}_upsamplers_0')(h)
    assert not skips

    h = nn.swish(GroupNorm(self.num_groups, dtype=self.dtype,
                           name='conv_norm_out')(h))
    h = Conv(self.out_channels, (3, 3), padding='SAME', dtype=self.dtype,
             kernel_init=_zero_init_last(), name='conv_out')(h)
    return h.astype(jnp.float32)

  def _guidance_embedding(self, w, batch: int):
    """The embedding of w, added to the time embedding: sinusoidal in
    GUIDANCE_EMBEDDING_SCALE w (so w in [0, 4] spans the frequencies the
    1,000 timesteps do) and a 2-layer MLP whose last layer is zero at
    init."""
    if w is None:
      w = jnp.zeros((batch,), jnp.float32)
    emb = timestep_embedding(GUIDANCE_EMBEDDING_SCALE * w, self.ch)
    emb = nn.Dense(self.temb_dim, dtype=self.dtype, kernel_init=_default_init,
                   name='guidance_embedding_linear_1')(emb)
    return nn.Dense(self.temb_dim, dtype=self.dtype,
                    kernel_init=_zero_init_last(),
                    name='guidance_embedding_linear_2')(nn.swish(emb))
