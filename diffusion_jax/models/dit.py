"""The Diffusion Transformer, DiT (Peebles & Xie 2023), in Flax Linen.

The image (or latent) is cut into p x p patches, each embedded linearly as a
token with a fixed 2-D sin-cos position embedding; N transformer blocks
condition on c = time embedding + label embedding through adaLN-Zero
(sec. 3.2): c regresses a shift and scale for each LayerNorm and a gate for
each residual branch, all zero-initialised, so every block starts as the
identity. A final adaLN layer and a linear map give p*p*out_channels values
per token, rearranged back into an image ("unpatchify").

Parameters, initialisation and the order of the output channels follow the
reference code (github.com/facebookresearch/DiT, models.py), so parameter
counts equal its figures and diffusers' DiTTransformer2DModel weights map onto
ours (diffusion_jax/convert/diffusers_dit.py). Two details where diffusers'
port differs from the reference are attributes, 0 and 1e-6 meaning the
reference: `time_freq_shift` and `mlp_norm_eps` (see DiT).

With context_dim > 0 each block also cross-attends to a token sequence (a
caption, models/text.py) between its self-attention and its MLP, where
PixArt-alpha puts it (Chen et al. 2023, "Efficient T2I Transformer"): a
plain residual branch, not modulated or gated by adaLN (the time still
modulates self-attention and MLP), whose output projection starts at zero,
so the block starts as the block without it. Unlike PixArt we pre-normalise the tokens (an affine
LayerNorm, as LDM's BasicTransformerBlock), models/cross_attention.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import remat as remat_lib
from diffusion_jax.models import text
from diffusion_jax.models.cross_attention import CrossAttentionBlock

# Paper Table 1: (depth N, hidden size d, heads); any patch size 2, 4 or 8.
DIT_VARIANTS = {
    'S': (12, 384, 6),
    'B': (12, 768, 12),
    'L': (24, 1024, 16),
    'XL': (28, 1152, 16),
}
# The reference's sinusoidal time features before the MLP.
FREQUENCY_EMBEDDING_SIZE = 256
# Every LayerNorm of the reference (no affine parameters).
LAYER_NORM_EPS = 1e-6

_xavier = nn.initializers.xavier_uniform()
# The reference initialises the timestep MLP and the label table N(0, 0.02).
_normal_002 = nn.initializers.normal(stddev=0.02)
# ... and the patch embedding as a linear map on the flattened p*p*C kernel
# (fan_in p*p*C, fan_out d), not as a conv (whose fan_out would be p*p*d).
_patch_init = nn.initializers.variance_scaling(
    1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=-1)
_zeros = nn.initializers.zeros_init()


def timestep_embedding(t: jax.Array, dim: int = FREQUENCY_EMBEDDING_SIZE,
                       freq_shift: float = 0.0) -> jax.Array:
  """[cos(t w_i), sin(t w_i)], w_i = 10000^(-i / (dim/2 - freq_shift)).

  freq_shift 0 is the reference code (GLIDE's timestep_embedding, dim/2 in
  the denominator); diffusers' DiT uses Timesteps(flip_sin_to_cos=True,
  downscale_freq_shift=1): the same [cos, sin] order with dim/2 - 1.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32)
                  / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (dim/2)) (MAE)."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  out = np.outer(pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_2d(dim: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, (grid * grid, dim), row-major.

  As the reference (from MAE): the first dim/2 channels encode the column
  of a token, the last dim/2 its row; computed in float64 as there.
  """
  if dim % 4:
    raise ValueError(f'the 2-D sin-cos position embedding needs a hidden size '
                     f'divisible by 4, got {dim}')
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64),
                           np.arange(grid, dtype=np.float64), indexing='ij')
  return np.concatenate([_sincos_1d(dim // 2, cols),
                         _sincos_1d(dim // 2, rows)], axis=1)


def layer_norm(x: jax.Array, eps: float = LAYER_NORM_EPS) -> jax.Array:
  """LayerNorm over the last axis without affine parameters; statistics in
  float32 (two-pass variance, as torch), the result in x's dtype."""
  xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  centred = xs - xs.mean(-1, keepdims=True)
  var = jnp.square(centred).mean(-1, keepdims=True)
  return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  """adaLN: x * (1 + scale) + shift, per example (reference `modulate`)."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class PatchEmbed(nn.Module):
  """The reference's p x p stride-p conv, written as one matmul on the
  flattened (p, p, C) patches (the same HWIO kernel); tokens row-major."""
  patch_size: int
  hidden_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, channels = x.shape
    p, d = self.patch_size, self.hidden_size
    kernel = self.param('kernel', _patch_init, (p, p, channels, d))
    bias = self.param('bias', _zeros, (d,))
    patches = x.reshape(b, height // p, p, width // p, p, channels).transpose(
        0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * channels)
    return jnp.einsum('bnk,kd->bnd', patches.astype(self.dtype),
                      kernel.reshape(-1, d).astype(self.dtype)) + (
                          bias.astype(self.dtype))


class TimestepEmbedder(nn.Module):
  """256 sinusoidal features -> Dense -> SiLU -> Dense (reference)."""
  hidden_size: int
  freq_shift: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype,
                                  kernel_init=_normal_002, name=name)
    h = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, self.freq_shift)
    return dense('linear_2')(nn.silu(dense('linear_1')(h.astype(self.dtype))))


class Attention(nn.Module):
  """Multi-head self-attention, fused qkv projection with bias (timm's)."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_xavier,
                   name='qkv')(x)
    # Columns are [q | k | v], each split into heads of d / num_heads.
    q, k, v = jnp.moveaxis(
        qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
    h = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(head dim)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_xavier,
                    name='proj')(h.reshape(b, n, d))


class Mlp(nn.Module):
  """Linear -> GELU (tanh approximation) -> linear, as the reference."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_xavier,
                 name='fc1')(x)
    h = jax.nn.gelu(h, approximate=True)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_xavier,
                    name='fc2')(h)


class DiTBlock(nn.Module):
  """A transformer block with adaLN-Zero conditioning (paper Fig. 3).

  SiLU(c) -> Dense(6d) gives shift/scale/gate for attention and for the
  MLP; the Dense is zero-initialised, so gates start at 0 and the block at
  the identity.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  mlp_norm_eps: float = LAYER_NORM_EPS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, context=None):
    """context: None, or (keys/values (B, L, D_ctx), mask (B, L)) for a
    cross-attention sub-layer after self-attention."""
    d = x.shape[-1]
    mod = nn.Dense(6 * d, dtype=self.dtype, kernel_init=_zeros,
                   name='adaLN_modulation')(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        jnp.split(mod, 6, axis=-1))
    h = Attention(self.num_heads, self.dtype, name='attn')(
        modulate(layer_norm(x), shift_msa, scale_msa))
    x = x + gate_msa[:, None, :] * h
    if context is not None:
      x = CrossAttentionBlock(self.num_heads, norm_eps=LAYER_NORM_EPS,
                              dtype=self.dtype, name='cross_attn')(x, *context)
    h = Mlp(int(d * self.mlp_ratio), self.dtype, name='mlp')(
        modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp))
    return x + gate_mlp[:, None, :] * h


class FinalLayer(nn.Module):
  """adaLN (shift, scale) then a linear map to p*p*out_channels; both
  zero-initialised, so a fresh DiT predicts 0."""
  out_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    shift, scale = jnp.split(
        nn.Dense(2 * x.shape[-1], dtype=self.dtype, kernel_init=_zeros,
                 name='adaLN_modulation')(nn.silu(c)), 2, axis=-1)
    x = modulate(layer_norm(x), shift, scale)
    return nn.Dense(self.out_features, dtype=self.dtype, kernel_init=_zeros,
                    name='linear')(x)


def resolve_size(variant: str, depth: int = 0, hidden_size: int = 0,
                 num_heads: int = 0) -> tuple[int, int, int]:
  """(depth, hidden size, heads) of config.model.dit_variant: a row of
  DIT_VARIANTS (the dit_* sizes then 0), or 'custom' (all three given)."""
  given = (depth, hidden_size, num_heads)
  if variant in DIT_VARIANTS:
    if any(given):
      raise ValueError(
          f'config.model.dit_variant={variant!r} fixes depth, hidden size and '
          f'heads {DIT_VARIANTS[variant]}: set config.model.dit_depth, '
          "dit_hidden_size and dit_num_heads to 0, or dit_variant='custom'")
    return DIT_VARIANTS[variant]
  if variant != 'custom':
    raise ValueError(f'unknown config.model.dit_variant={variant!r}: use one '
                     f"of {tuple(DIT_VARIANTS)} or 'custom'")
  if min(given) <= 0:
    raise ValueError(
        "config.model.dit_variant='custom' takes its sizes from "
        'config.model.dit_depth, dit_hidden_size and dit_num_heads, got '
        f'{given}: set all three > 0, e.g. 2, 64, 4')
  if hidden_size % num_heads or hidden_size % 4:
    raise ValueError(
        f'config.model.dit_hidden_size={hidden_size} must be a multiple of 4 '
        f'(2-D sin-cos positions) and of config.model.dit_num_heads='
        f'{num_heads}: change either')
  return given


def check_patch_size(image_size: int, patch_size: int):
  if image_size % patch_size:
    raise ValueError(
        f'config.data.image_size={image_size} is not divisible by '
        f'config.model.patch_size={patch_size}: DiT cuts the image into '
        f'{patch_size}x{patch_size} patches; use a patch size that divides '
        'the image size (2, 4 or 8) or another image size')


class DiT(nn.Module):
  """eps_theta(x_t, t[, y]) as a Diffusion Transformer.

  Attributes:
    out_channels: channels of the prediction (2C with a learned variance).
    patch_size: p; the image size must be a multiple of it.
    hidden_size: token width d (a multiple of 4 and of num_heads).
    depth: number of DiT blocks N.
    num_heads: attention heads.
    mlp_ratio: MLP width / d (4 in the paper).
    num_classes: 0 for an unconditional model; otherwise labels
      0..num_classes-1 are embedded and row num_classes is the null class of
      classifier-free guidance, used when y is None.
    time_freq_shift: 0 as the reference, 1 as diffusers' DiT (see
      timestep_embedding).
    mlp_norm_eps: epsilon of the LayerNorm before each MLP: 1e-6 as the
      reference; diffusers' DiT takes its config's norm_eps (default 1e-5)
      there (the other LayerNorms use 1e-6 in both).
    dtype: compute dtype (parameters stay float32).
    context_dim: 0, or the width of the context tokens each block cross-
      attends to (with num_heads heads; module docstring, models/text.py).
    text_vocab_size: 0: the context is precomputed (B, L, context_dim)
      embeddings; > 0: (B, L) token ids encoded by a text encoder of this
      vocabulary trained with the network (text.TextEncoder).
    text_max_length, text_depth, text_heads: that encoder's positions,
      blocks and heads.
  """
  out_channels: int
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 0
  time_freq_shift: float = 0.0
  mlp_norm_eps: float = LAYER_NORM_EPS
  dtype: jnp.dtype = jnp.float32
  remat: str = 'none'  # models/remat.py's POLICIES, per DiTBlock
  context_dim: int = 0
  text_vocab_size: int = 0
  text_max_length: int = 0
  text_depth: int = 2
  text_heads: int = 4

  @nn.compact
  def __call__(self, x, t, y=None, *, train: bool, context=None,
               context_mask=None):
    """x: (B, H, W, C), t: (B,) timesteps (integer or fractional), y: (B,)
    int labels or None, context: (B, L) token ids or (B, L, context_dim)
    embeddings, context_mask: (B, L) bool (True: a real token; a row
    without one, or context None: the null sequence); returns
    (B, H, W, out_channels) float32."""
    del train  # no dropout: the reference trains DiT without it
    b, height, width, _ = x.shape
    p, d = self.patch_size, self.hidden_size
    if height != width:
      raise ValueError(f'DiT expects square images, got {height}x{width}')
    check_patch_size(height, p)
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by {self.num_heads} '
                       'heads: change config.model.dit_hidden_size or '
                       'dit_num_heads')
    grid = height // p

    h = PatchEmbed(p, d, self.dtype, name='x_embedder')(x)
    # Fixed, not a parameter (the reference freezes it: requires_grad=False).
    h = h + jnp.asarray(pos_embed_2d(d, grid), self.dtype)[None]

    c = TimestepEmbedder(d, self.time_freq_shift, self.dtype,
                         name='t_embedder')(t)
    if self.num_classes:
      if y is None:
        y = jnp.full((b,), self.num_classes, jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, d, dtype=self.dtype,
                       embedding_init=_normal_002, name='y_embedder')(y)
    elif y is not None:
      raise ValueError('class labels given to an unconditional DiT: set '
                       'config.model.num_classes to the number of classes')

    text.check_context_call(self.context_dim, context, context_mask, 'DiT')
    ctx = text.ContextEncoder(
        self.context_dim, self.text_vocab_size, self.text_max_length,
        self.text_depth, self.text_heads, self.dtype, name='context_encoder')(
            context, context_mask, b) if self.context_dim else None

    block = remat_lib.checkpointed(DiTBlock, self.remat)
    for i in range(self.depth):
      h = block(self.num_heads, self.mlp_ratio, self.mlp_norm_eps,
                   self.dtype, name=f'blocks_{i}')(h, c, ctx)
    out = self.out_channels
    h = FinalLayer(p * p * out, self.dtype, name='final_layer')(h, c)
    # Unpatchify: token (i, j) holds its patch as (p, q, channel), the
    # reference's order ('nhwpqc'), so imported weights place pixels alike.
    h = h.reshape(b, grid, grid, p, p, out).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, out).astype(jnp.float32)
