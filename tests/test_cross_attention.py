"""Cross-attention to token sequences (models/cross_attention.py, text.py)
and its use in the U-Net and DiT, checked against independent math."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from diffusion_jax import models
from diffusion_jax.models import cross_attention as xa
from diffusion_jax.models import dit
from diffusion_jax.models import text
from diffusion_jax.models.unet import UNet

X = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
T = np.array([3.0, 700.0], np.float32)
Y = np.array([1, 10])  # a label and the null class
CTX_DIM, MAX_LEN, VOCAB = 8, 5, 12
IDS = np.array([[4, 5, 6, 0, 0], [7, 0, 0, 0, 0]], np.int32)
MASK = IDS != text.PAD


def _unet(**kw):
  return UNet(3, ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
              num_groups=4, temb_dim=32, num_classes=10, **kw)


def _dit(**kw):
  return dit.DiT(3, patch_size=2, hidden_size=32, depth=1, num_heads=4,
                 num_classes=10, **kw)


def _normal(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _perturb(params, seed, only=lambda path: True):
  """Every leaf (whose path `only` accepts) plus noise, so that zero-
  initialised layers hide nothing (numpy noise: no per-shape compiles)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({
      path: v + 0.3 * _normal(v.shape, seed + i) if only(path) else v
      for i, (path, v) in enumerate(flat.items())})


def _is_new(path) -> bool:
  return any('cross_attn' in p or p == 'context_encoder' for p in path)


class _Fns:
  """A network with a text encoder, its fresh parameters and its applies,
  made once per architecture: compiling dominates this file's time."""

  def __init__(self, make):
    self.base = make()
    self.text = make(context_dim=CTX_DIM, text_vocab_size=VOCAB,
                     text_max_length=MAX_LEN, text_depth=1)
    self.emb = make(context_dim=CTX_DIM)  # precomputed embeddings
    # rbg keys: the same test, a fraction of threefry's compile time.
    self.params = jax.jit(lambda: self.text.init(
        jax.random.key(0, impl='rbg'), X, T, train=False)['params'])()
    # The applies run eagerly (op by op): a network with and without a zero
    # branch then runs the same ops and agrees bit for bit, where compiled
    # XLA may fuse the two graphs differently and round differently (~1e-6
    # seen for the U-Net); and the tests share one cache of compiled ops.
    call = lambda m: lambda p, **kw: m.apply({'params': p}, X, T, Y,
                                             train=False, **kw)
    self.apply_base = call(self.base)
    self.apply_null = call(self.text)
    self.apply_ids = lambda p, i, m: call(self.text)(
        p, context=i, context_mask=m)
    self.apply_emb = lambda p, e, m: call(self.emb)(
        p, context=e, context_mask=m)


_fns = functools.cache(_Fns)


def _numpy_attention(q, k, v, mask):
  """Loop over (example, query, head): softmax over the real keys only."""
  out = np.zeros(q.shape)
  for b, n, h in np.ndindex(*q.shape[:3]):
    keys = np.flatnonzero(mask[b])
    if keys.size:
      logits = k[b, keys, h] @ q[b, n, h] / np.sqrt(q.shape[-1])
      w = np.exp(logits - logits.max())
      out[b, n, h] = (w / w.sum()) @ v[b, keys, h]
  return out


def test_masked_attention_equals_brute_force_and_all_masked_rows_are_zero():
  q, k, v = (_normal(s, i) for i, s in
             enumerate([(3, 4, 2, 4), (3, 5, 2, 4), (3, 5, 2, 4)]))
  mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  ours = np.asarray(xa.masked_attention(q, k, v, mask))
  np.testing.assert_allclose(ours, _numpy_attention(q, k, v, mask), atol=1e-5)
  assert (ours[2] == 0).all()


def test_block_ignores_masked_tokens_and_all_masked_rows_leave_x():
  block = xa.CrossAttentionBlock(num_heads=2)
  x, ctx = _normal((3, 6, 8), 0), _normal((3, 4, 5), 1)
  mask = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
  apply = jax.jit(block.apply)
  params = jax.jit(block.init)(jax.random.key(2, impl='rbg'), x, ctx, mask)
  # Fresh: the identity, whatever the context.
  np.testing.assert_array_equal(apply(params, x, ctx, mask), x)
  params = _perturb(params, 3)
  out = apply(params, x, ctx, mask)
  other = np.where(mask[..., None], ctx, 1e3 * ctx + 7.0)
  np.testing.assert_array_equal(apply(params, x, other, mask), out)
  assert not np.array_equal(out[:2], x[:2])
  np.testing.assert_array_equal(out[2], x[2])  # no key: zero update
  grads = jax.jit(jax.grad(lambda c: apply(params, x, c, mask).sum()))(ctx)
  assert np.isfinite(grads).all()
  assert (grads[~mask] == 0).all() and (grads[mask] != 0).any()


@pytest.mark.parametrize('make', [_unet, _dit], ids=['unet', 'dit'])
def test_fresh_context_model_is_the_model_without_context(make):
  f = _fns(make)
  flat = flax.traverse_util.flatten_dict(f.params)
  assert 'text_encoder' in f.params['context_encoder']  # made without ids
  # Modules added only (see also test_existing_configs_keep_...), and their
  # output projections start at zero.
  base_shapes = jax.eval_shape(functools.partial(f.base.init, train=False),
                               jax.random.key(0), X, T)['params']
  assert {p for p in flat if not _is_new(p)} == set(
      flax.traverse_util.flatten_dict(base_shapes))
  outs = [v for p, v in flat.items()
          if 'to_out' in p and any('cross_attn' in q for q in p)]
  assert outs and all((v == 0).all() for v in outs)
  params = _perturb(f.params, 4, only=lambda p: not _is_new(p))
  expected = f.apply_base({k: v for k, v in params.items()
                           if not _is_new((k,))})
  assert np.abs(expected).max() > 0.1
  # Whatever the context: ids, the null sequence, embeddings with an
  # all-False row.
  np.testing.assert_array_equal(f.apply_ids(params, IDS, MASK), expected)
  np.testing.assert_array_equal(f.apply_null(params), expected)
  emb_params = {**params, 'context_encoder': {
      'null_context': params['context_encoder']['null_context']}}
  emb_mask = np.array([[1, 0, 1], [0, 0, 0]], bool)
  np.testing.assert_array_equal(
      f.apply_emb(emb_params, _normal((2, 3, CTX_DIM), 5), emb_mask),
      expected)


@pytest.mark.parametrize('make', [_unet, _dit], ids=['unet', 'dit'])
def test_masking_and_null_sequence_in_a_trained_looking_model(make):
  f = _fns(make)
  params = _perturb(f.params, 6)  # cross-attention outputs non-zero too
  out, null = f.apply_ids(params, IDS, MASK), f.apply_null(params)
  assert np.abs(out - null).max() > 1e-3
  # Tokens at masked positions do not matter.
  np.testing.assert_array_equal(
      f.apply_ids(params, np.where(MASK, IDS, 9), MASK), out)
  # A row without a real token is the null sequence, as context=None is.
  half = f.apply_ids(params, IDS, MASK * np.array([[True], [False]]))
  np.testing.assert_allclose(half[1], null[1], atol=1e-6)
  np.testing.assert_allclose(half[0], out[0], atol=1e-6)
  assert np.isfinite(half).all()


def test_gradients_reach_the_text_encoder():
  f = _fns(_dit)
  params = _perturb(f.params, 7)
  grads = jax.jit(jax.grad(
      lambda p: (f.apply_ids(p, IDS, MASK) ** 2).sum()))(params)
  table = np.asarray(grads['context_encoder']['text_encoder'][
      'token_embedding']['embedding'])
  used = np.isin(np.arange(VOCAB), IDS[MASK])
  assert (np.abs(table[used]).sum(-1) > 0).all()
  assert (table[~used] == 0).all()  # PAD and absent words get nothing
  assert (grads['context_encoder']['null_context'] == 0).all()  # no null row


def test_context_errors():
  def init(model, context, **kw):  # traced only: the errors come first
    jax.eval_shape(functools.partial(model.init, train=False, context=context,
                                     **kw), jax.random.PRNGKey(0), X, T)
  with pytest.raises(ValueError, match='context_dim > 0'):
    init(_dit(), jnp.zeros((2, 3, 8)))
  with pytest.raises(ValueError, match='context_mask given without context'):
    init(_unet(context_dim=CTX_DIM), None, context_mask=jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match='text_vocab_size'):
    init(_unet(context_dim=CTX_DIM), jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match='max_length=2'):
    init(_dit(context_dim=CTX_DIM, text_vocab_size=9, text_max_length=2),
         jnp.ones((2, 3), jnp.int32))


def test_tokenizer_round_trip_and_too_long_caption():
  captions = ['a photo of a 3', 'A blurry photo of the digit 7.', '']
  tok = text.WordTokenizer.from_captions(captions[:2], add_bos_eos=True)
  assert tok.vocab_size == 4 + 9  # a photo of 3 blurry the digit 7 .
  ids, mask = tok.encode(captions, max_length=10)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (3, 10)
  assert ids[0, 0] == text.BOS and ids[0, 6] == text.EOS
  assert mask.sum(1).tolist() == [7, 10, 2]
  assert tok.decode(ids, mask) == ['a photo of a 3',
                                   'a blurry photo of the digit 7 .', '']
  plain = text.WordTokenizer(['a', 'photo', 'of'])
  ids, mask = plain.encode(['a photo of a cat'], 6)
  assert ids[0].tolist() == [4, 5, 6, 4, text.UNK, 0]
  assert mask[0].tolist() == [True] * 5 + [False]
  assert plain.encode([''], 3)[1].sum() == 0  # the empty caption: null
  with pytest.raises(ValueError, match=r"'a photo of a cat' has 5 tokens.*"
                     r'maximum length 4.*text_max_length to at least 5'):
    plain.encode(['a photo', 'a photo of a cat'], 4)
  with pytest.raises(ValueError, match='more than once'):
    text.WordTokenizer(['a', 'A'])


def test_load_embeddings(tmp_path):
  emb = np.random.default_rng(0).normal(size=(4, 3, 8)).astype(np.float32)
  mask = np.array([[1, 1, 0]] * 4, np.uint8)
  np.savez(tmp_path / 'ok.npz', embeddings=emb, mask=mask)
  got, got_mask = text.load_embeddings(str(tmp_path / 'ok.npz'), 8, 5)
  np.testing.assert_array_equal(got, emb)
  assert got_mask.dtype == bool and got_mask.sum() == 8
  with pytest.raises(ValueError, match='context_dim=16: set it to 8'):
    text.load_embeddings(str(tmp_path / 'ok.npz'), 16)
  np.savez(tmp_path / 'bad.npz', embeddings=emb, mask=mask[:, :2])
  with pytest.raises(ValueError, match=r"'mask' \(4, 2\) does not match"):
    text.load_embeddings(str(tmp_path / 'bad.npz'))
  np.savez(tmp_path / 'nokey.npz', emb=emb)
  with pytest.raises(ValueError, match=r"no 'embeddings'.*\['emb'\]"):
    text.load_embeddings(str(tmp_path / 'nokey.npz'))
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    text.load_embeddings(str(tmp_path / 'missing.npz'))


def _tree(model_config, size=8):
  model = models.create_model(model_config, 3, size)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 3)), jnp.zeros((1,)))
  return {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_leaves_with_path(shapes)}


@pytest.mark.parametrize('name', ['unet', 'dit'])
def test_existing_configs_keep_their_parameter_tree(name):
  c = default.get_config().model
  c.name = name
  c.dit_variant, c.dit_depth, c.dit_hidden_size = 'custom', 2, 32
  c.dit_num_heads = 4
  before = _tree(c)
  assert not any('cross' in k or 'context' in k for k in before)
  with c.unlocked():
    c.context_dim, c.text_vocab_size = 0, 0
  assert _tree(c) == before
  c.context_dim = CTX_DIM
  after = _tree(c)
  assert {k: v for k, v in after.items() if k in before} == before
  assert all('cross_attn' in k or 'context_encoder' in k
             for k in set(after) - set(before))


def test_config_checks():
  c = default.get_config().model
  with c.unlocked():
    c.context_dim, c.cross_attn_heads = CTX_DIM, 3
  with pytest.raises(ValueError, match='cross_attn_heads=3'):
    models.create_model(c, 3, 8)
  c.name = 'mlp'
  with pytest.raises(ValueError, match='only the unet and dit'):
    models.create_model(c, 3, 8)
  c.name = 'dit'
  with c.unlocked():
    c.text_vocab_size = 10
  with pytest.raises(ValueError, match='text_max_length > 0'):
    models.create_model(c, 3, 8)
