"""Captions as context sequences for cross-attention (cross_attention.py).

Four parts:
  * WordTokenizer: a word-level tokenizer over a fixed vocabulary, enough
    for template captions ("a photo of a 3"): ids (N, L) int32 and a mask
    (N, L) bool, True for a real token.
  * TextEncoder: a small Transformer trained jointly with the diffusion
    network from scratch (token embedding + learned positions + pre-LN
    blocks whose self-attention masks the padding), (B, L) ids -> (B, L, D).
  * ContextEncoder: what the U-Net and DiT call. It encodes ids (or takes
    precomputed embeddings as they are) and substitutes the null sequence
    of classifier-free guidance for captions without a real token.
  * load_embeddings: precomputed embeddings (e.g. of a frozen text encoder)
    from an .npz, checked.

The null sequence: one learned token (`null_context`, (1, D_ctx)) with a
mask that is True at position 0 only. An example whose context mask is all
False (a caption dropped for guidance, Ho & Salimans 2022, or the empty
caption of a tokenizer without BOS/EOS) and a call with context=None both
get it. We learn it rather
than encode the empty caption so that the same null serves precomputed
embeddings (whose encoder is not ours), as PixArt-alpha's learned
y_embedding does (Chen et al. 2023). With a single key every query attends
to it with weight 1, so the null condition is a learned update per
cross-attention block, as the null class of a class-conditional model is a
learned embedding.
"""

import re
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.cross_attention import MultiHeadAttention

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS = ('<pad>', '<unk>', '<bos>', '<eos>')

_WORD = re.compile(r'\w+|[^\w\s]')
_normal_002 = nn.initializers.normal(stddev=0.02)  # GPT-2 / CLIP practice


class WordTokenizer:
  """Lower-cased words and punctuation marks -> ids; PAD=0, UNK=1, BOS=2,
  EOS=3 (reserved whether or not add_bos_eos), then the vocabulary in the
  order given."""

  def __init__(self, vocabulary: Sequence[str], add_bos_eos: bool = False):
    words = [w.lower() for w in vocabulary]
    for w in words:
      if w in SPECIAL_TOKENS or _WORD.findall(w) != [w]:
        raise ValueError(f'vocabulary entry {w!r} is not a single word or '
                         f'punctuation mark (or is one of {SPECIAL_TOKENS})')
    if len(set(words)) != len(words):
      dups = sorted({w for w in words if words.count(w) > 1})
      raise ValueError(f'vocabulary lists {dups} more than once')
    self.words = (*SPECIAL_TOKENS, *words)
    self.add_bos_eos = add_bos_eos
    self._ids = {w: i for i, w in enumerate(self.words)}

  @classmethod
  def from_captions(cls, captions: Sequence[str], add_bos_eos: bool = False):
    """The vocabulary of every word in `captions`, sorted."""
    return cls(sorted({w for c in captions for w in split(c)}), add_bos_eos)

  @property
  def vocab_size(self) -> int:
    """Rows the text encoder's token table needs
    (config.model.text_vocab_size)."""
    return len(self.words)

  def num_tokens(self, caption: str) -> int:
    return len(split(caption)) + 2 * self.add_bos_eos

  def check_lengths(self, captions: Sequence[str], max_length: int):
    """Raises ValueError naming the first caption longer than max_length
    tokens and the length every caption would need."""
    lengths = [self.num_tokens(c) for c in captions]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
      i = too_long[0]
      extra = ' including BOS and EOS' if self.add_bos_eos else ''
      raise ValueError(
          f'caption {captions[i]!r} has {lengths[i]} tokens{extra}, more '
          f'than the text encoder\'s maximum length {max_length} '
          f'(config.model.text_max_length); {len(too_long)} of '
          f'{len(captions)} captions are too long: set '
          f'config.model.text_max_length to at least {max(lengths)} or '
          'shorten the captions')

  def encode(self, captions: Sequence[str], max_length: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, max_length) int32, mask (N, max_length) bool), padded with
    PAD at the end; words outside the vocabulary become UNK."""
    if isinstance(captions, str):
      raise TypeError('encode takes a list of captions, not one string')
    self.check_lengths(captions, max_length)
    ids = np.full((len(captions), max_length), PAD, np.int32)
    for row, caption in enumerate(captions):
      tokens = [self._ids.get(w, UNK) for w in split(caption)]
      if self.add_bos_eos:
        tokens = [BOS, *tokens, EOS]
      ids[row, :len(tokens)] = tokens
    return ids, ids != PAD

  def decode(self, ids, mask=None) -> list[str]:
    """Inverse of encode up to normalisation (lower case, words joined by
    one space); BOS/EOS are left out."""
    ids = np.asarray(ids)
    mask = ids != PAD if mask is None else np.asarray(mask, bool)
    return [' '.join(self.words[i] for i, m in zip(row, row_mask)
                     if m and i not in (BOS, EOS))
            for row, row_mask in zip(ids, mask)]


def split(caption: str) -> list[str]:
  """Lower-cased words and punctuation marks of a caption."""
  return _WORD.findall(caption.lower())


class TextEncoderBlock(nn.Module):
  """Pre-LN: x + SelfAttn(LN(x)) over the real tokens, x + MLP(LN(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    d = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype, name='norm1')(x)
    x = x + MultiHeadAttention(self.num_heads, zero_init_out=False,
                               dtype=self.dtype, name='attn')(h, h, mask)
    h = nn.LayerNorm(dtype=self.dtype, name='norm2')(x)
    h = nn.Dense(int(d * self.mlp_ratio), dtype=self.dtype, name='fc1')(h)
    return x + nn.Dense(d, dtype=self.dtype, name='fc2')(nn.gelu(h))


class TextEncoder(nn.Module):
  """(B, L) token ids and mask -> (B, L, width) contextual embeddings;
  bidirectional (padding keys masked, no causal mask), a final LayerNorm,
  padded positions set to 0.

  Attributes:
    vocab_size: rows of the token table (WordTokenizer.vocab_size).
    width: embedding width D (the network's context_dim).
    max_length: positions learned; longer inputs are an error.
    depth: Transformer blocks.
    num_heads: heads of each block's self-attention.
    dtype: compute dtype (parameters stay float32).
  """
  vocab_size: int
  width: int
  max_length: int
  depth: int = 2
  num_heads: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids, mask):
    length = ids.shape[1]
    if length > self.max_length:
      raise ValueError(
          f'token sequences of length {length} exceed the text encoder\'s '
          f'max_length={self.max_length}: set config.model.text_max_length '
          f'to at least {length}')
    x = nn.Embed(self.vocab_size, self.width, embedding_init=_normal_002,
                 dtype=self.dtype, name='token_embedding')(ids)
    pos = self.param('position_embedding', _normal_002,
                     (self.max_length, self.width))
    x = x + pos[:length].astype(self.dtype)
    for i in range(self.depth):
      x = TextEncoderBlock(self.num_heads, dtype=self.dtype,
                           name=f'blocks_{i}')(x, mask)
    x = nn.LayerNorm(dtype=self.dtype, name='final_norm')(x)
    # Padding outputs are never attended to; zero makes them independent of
    # what the padding held.
    return jnp.where(mask[..., None], x, 0)


class ContextEncoder(nn.Module):
  """(context, mask) as given to a network -> (B, L, context_dim) keys and
  values and a (B, L) mask with at least one True per row.

  context: (B, L) int token ids when vocab_size > 0 (encoded by a jointly
  trained TextEncoder), else precomputed (B, L, context_dim) embeddings;
  None: the null sequence for the whole batch. mask: (B, L) bool; None: all
  True for embeddings, ids != PAD for ids. Rows with an all-False mask get
  the null sequence (module docstring).
  """
  context_dim: int
  vocab_size: int = 0
  max_length: int = 0
  depth: int = 2
  num_heads: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, context, mask, batch: int):
    null = self.param('null_context', nn.initializers.normal(stddev=1.0),
                      (1, self.context_dim)).astype(self.dtype)
    encoder = (TextEncoder(self.vocab_size, self.context_dim, self.max_length,
                           self.depth, self.num_heads, self.dtype,
                           name='text_encoder') if self.vocab_size else None)
    if context is None:
      if encoder and self.is_initializing():
        # Create the encoder's parameters even when init sees no caption.
        ids = jnp.zeros((batch, self.max_length), jnp.int32)
        encoder(ids, jnp.ones(ids.shape, bool))
      return (jnp.broadcast_to(null, (batch, 1, self.context_dim)),
              jnp.ones((batch, 1), bool))
    if context.shape[0] != batch:
      raise ValueError(f'context holds {context.shape[0]} examples for a '
                       f'batch of {batch}')
    if encoder:
      if context.ndim != 2 or not jnp.issubdtype(context.dtype, jnp.integer):
        raise ValueError(
            f'this network encodes token ids (config.model.text_vocab_size='
            f'{self.vocab_size}): pass context as (B, L) integer ids, got '
            f'{context.dtype} {context.shape}')
      mask = context != PAD if mask is None else jnp.asarray(mask, bool)
      context = encoder(context, mask)
    else:
      if context.ndim != 3 or context.shape[-1] != self.context_dim:
        raise ValueError(
            f'context embeddings must be (B, L, config.model.context_dim='
            f'{self.context_dim}), got {context.shape}; token ids need '
            'config.model.text_vocab_size > 0')
      mask = (jnp.ones(context.shape[:2], bool) if mask is None
              else jnp.asarray(mask, bool))
      context = context.astype(self.dtype)
    if mask.shape != context.shape[:2]:
      raise ValueError(f'context_mask {mask.shape} does not match context '
                       f'{context.shape[:2]}')
    is_null = ~mask.any(-1)
    first = jnp.arange(mask.shape[1]) == 0
    null_seq = jnp.where(first[:, None], null, 0)
    return (jnp.where(is_null[:, None, None], null_seq[None], context),
            jnp.where(is_null[:, None], first[None], mask))


def check_context_call(context_dim: int, context, context_mask, model: str):
  """The errors both networks raise for context they cannot take."""
  if not context_dim and context is not None:
    raise ValueError(f'a context sequence given to a {model} without cross-'
                     'attention: set config.model.context_dim > 0')
  if context is None and context_mask is not None:
    raise ValueError('context_mask given without context')


def context_kwargs(c) -> dict:
  """The network attributes of the cross-attention keys of config.model,
  checked; keys a config lacks take their off defaults."""
  kw = dict(context_dim=c.get('context_dim', 0),
            text_vocab_size=c.get('text_vocab_size', 0),
            text_max_length=c.get('text_max_length', 0),
            text_depth=c.get('text_depth', 2),
            text_heads=c.get('text_heads', 4))
  if kw['context_dim'] < 0 or kw['text_vocab_size'] < 0:
    raise ValueError('config.model.context_dim and text_vocab_size must be '
                     '>= 0 (0: off)')
  if kw['text_vocab_size']:
    if not kw['context_dim']:
      raise ValueError('config.model.text_vocab_size > 0 needs '
                       'config.model.context_dim > 0 (the encoder width)')
    if kw['text_max_length'] <= 0 or kw['text_depth'] < 0:
      raise ValueError('a text encoder needs config.model.text_max_length > '
                       '0 (the longest caption in tokens) and text_depth >= 0')
    if kw['context_dim'] % kw['text_heads']:
      raise ValueError(
          f'config.model.context_dim={kw["context_dim"]} is not divisible by '
          f'config.model.text_heads={kw["text_heads"]}: change either')
  return kw


def load_embeddings(path: str, context_dim: int = 0, max_length: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings (N, L, D) float32, mask (N, L) bool) from an .npz holding
  'embeddings' and optionally 'mask' (bool or 0/1; absent: all True).

  context_dim / max_length > 0: D must equal it / L must not exceed it.
  Raises FileNotFoundError or ValueError naming the file, the key and what
  to change.
  """
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except FileNotFoundError as e:
    raise FileNotFoundError(f'no precomputed text embeddings at {path}') from e
  except ValueError as e:  # not an .npz, or object arrays
    raise ValueError(f'{path} is not an .npz of numeric arrays: {e}') from e
  if 'embeddings' not in arrays:
    raise ValueError(f"{path} has no 'embeddings' array (keys: "
                     f"{sorted(arrays)}): save the (N, L, D) embeddings under "
                     "'embeddings' and the (N, L) mask under 'mask'")
  emb = arrays['embeddings']
  if emb.ndim != 3 or not np.issubdtype(emb.dtype, np.floating):
    raise ValueError(f"{path}: 'embeddings' must be a float (N, L, D) array, "
                     f'got {emb.dtype} {emb.shape}')
  mask = arrays.get('mask', np.ones(emb.shape[:2], bool))
  if mask.shape != emb.shape[:2]:
    raise ValueError(f"{path}: 'mask' {mask.shape} does not match "
                     f"'embeddings' {emb.shape}: it needs shape "
                     f'{emb.shape[:2]}')
  if mask.dtype != bool:
    if not (np.issubdtype(mask.dtype, np.integer)
            and np.isin(mask, (0, 1)).all()):
      raise ValueError(f"{path}: 'mask' must be bool (True: a real token) or "
                       f'0/1 integers, got {mask.dtype}')
    mask = mask.astype(bool)
  _, length, dim = emb.shape
  if context_dim and dim != context_dim:
    raise ValueError(f'{path}: embeddings of width {dim}, but the network '
                     f'attends to width config.model.context_dim='
                     f'{context_dim}: set it to {dim}')
  if max_length and length > max_length:
    raise ValueError(f'{path}: sequences of length {length} exceed '
                     f'config.model.text_max_length={max_length}: raise it '
                     f'to {length} or truncate the embeddings')
  if not np.isfinite(emb[mask]).all():
    raise ValueError(f'{path}: embeddings at real tokens are not all finite')
  return emb.astype(np.float32), mask
