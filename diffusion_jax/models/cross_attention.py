"""Multi-head (cross-)attention to a masked token sequence, in Flax Linen.

Conditioning on a caption, as latent diffusion does (Rombach et al. 2022,
sec. 3.3): image tokens (queries) attend to a context sequence (keys and
values), e.g. the output of a text encoder, shape (B, L, D_ctx), with a
boolean mask (B, L), True where a token is real and False at padding.

The block follows the cross-attention sub-layer of LDM's
BasicTransformerBlock (github.com/CompVis/latent-diffusion,
ldm/modules/attention.py): pre-LayerNorm, queries from the image tokens and
keys/values from the context through bias-free projections, an output
projection, residual. That output projection (kernel and bias) starts at
zero, so a fresh block is exactly the identity and a network gains the
block without changing what it computes at init: LDM gets the same effect
from the zero_module'd proj_out of its SpatialTransformer, PixArt-alpha
(Chen et al. 2023) by zero-initialising its cross-attention's proj.

Mask semantics: keys at False positions get no attention weight, so neither
their values nor anything else about them reaches the output (nor do
gradients reach them). A context row with no True at all leaves no key to
attend to; its update is defined as exactly zero (the block returns its
input) rather than what jax's large-negative-logit masking would give there
(the uniform average over the padding, which would depend on its contents).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()


def masked_attention(q, k, v, mask) -> jax.Array:
  """softmax(q k^T / sqrt(head dim)) v over the keys where mask is True.

  Args:
    q: (B, N, H, Dh) queries.
    k: (B, L, H, Dh) keys.
    v: (B, L, H, Dh) values.
    mask: (B, L) bool, True for a real token.

  Returns:
    (B, N, H, Dh); rows of examples whose mask is all False are 0.
  """
  mask = jnp.asarray(mask, bool)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
  # jax gives masked logits a large negative value, not -inf, so an all-False
  # row is a finite uniform average over the padding: replace it by 0.
  return jnp.where(mask.any(-1)[:, None, None, None], out, 0)


class MultiHeadAttention(nn.Module):
  """Queries from x (B, N, D), keys/values from context (B, L, D_ctx);
  returns the (B, N, D) update (no residual).

  Attributes:
    num_heads: heads; D must be a multiple of it (head dim D / num_heads).
    zero_init_out: start the output projection at zero (the update is then
      0 for any input); False for an encoder trained from scratch.
    dtype: compute dtype (parameters stay float32).
  """
  num_heads: int
  zero_init_out: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask):
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'attention over width {d} cannot be split into '
                       f'{self.num_heads} heads: choose a head count that '
                       'divides the width')
    if context.ndim != 3 or context.shape[0] != b:
      raise ValueError(f'context must be (B={b}, L, D_ctx), got '
                       f'{context.shape}')
    if mask.shape != context.shape[:2]:
      raise ValueError(f'context mask {mask.shape} does not match context '
                       f'{context.shape[:2]}')
    heads = (self.num_heads, d // self.num_heads)
    dense = lambda name: nn.Dense(d, use_bias=False, dtype=self.dtype,
                                  kernel_init=_xavier, name=name)
    q = dense('to_q')(x).reshape(b, n, *heads)
    context = context.astype(self.dtype)
    k = dense('to_k')(context).reshape(b, -1, *heads)
    v = dense('to_v')(context).reshape(b, -1, *heads)
    h = masked_attention(q, k, v, mask).reshape(b, n, d)
    out = nn.Dense(d, dtype=self.dtype, name='to_out',
                   kernel_init=_zeros if self.zero_init_out else _xavier)(h)
    # Zero through the output bias too: no key, no update.
    return jnp.where(jnp.asarray(mask, bool).any(-1)[:, None, None], out, 0)


class CrossAttentionBlock(nn.Module):
  """x + MultiHeadAttention(LayerNorm(x), context, mask) on (B, N, D)
  tokens; the identity at init (see the module docstring).

  Attributes:
    num_heads: attention heads.
    norm_eps: epsilon of the affine LayerNorm (torch's 1e-5 as LDM; the DiT
      passes its 1e-6).
    dtype: compute dtype (parameters stay float32).
  """
  num_heads: int
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask):
    h = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm')(x)
    h = MultiHeadAttention(self.num_heads, dtype=self.dtype, name='attn')(
        h, context, mask)
    return x + h.astype(x.dtype)
