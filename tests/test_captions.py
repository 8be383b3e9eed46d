"""Text-to-image at toy scale (issue 14, item 6): template captions
(data/captions.py), caption dropout and guided sampling in the diffusion
method, the loop with captions, bad captions; against numpy, the network
called separately, and an uninterrupted run."""

import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets

from diffusion_jax import config_checks, experiment, methods
from diffusion_jax.data import captions, pipeline
from diffusion_jax.diffusion import denoiser, guidance, sampling
from tests.compile_flags import FAST_COMPILE
from tests.util import run_train, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CAPTIONED = {'data.captions': 'digit_weight', 'model.context_dim': 8,
             'model.text_vocab_size': 17, 'model.text_max_length': 4,
             'model.text_depth': 1, 'model.text_heads': 2,
             'model.cross_attn_heads': 2}
DIT = {'model.name': 'dit', 'model.dit_variant': 'custom',
       'model.dit_depth': 1, 'model.dit_hidden_size': 16,
       'model.dit_num_heads': 2}
# One level, attention (and cross-attention) in the middle block only:
# compiling dominates this file's time.
UNET = {'model.ch_mult': (1,), 'model.attn_resolutions': ()}


def _train_digits():
  """The digits' train split, as data/sources.py scales it: uint8 (N, 8, 8)
  and labels."""
  d = datasets.load_digits()
  return (np.round(d.images[:1497] * (255 / 16)).astype(np.uint8),
          d.target[:1497])


def test_captioner_splits_each_class_at_its_own_median():
  images, labels = _train_digits()
  ink = images.reshape(len(images), -1).astype(np.int64).sum(-1)  # exact
  cap = captions.create_captioner(tiny_config(**CAPTIONED).data)
  got = cap.caption(images[..., None], labels)
  assert len(set(cap.captions)) == 20 and set(got) == set(cap.captions)
  for k in range(10):
    in_k = labels == k
    median = np.median(ink[in_k])
    expected = [f'a {"thick" if v > median else "thin"} {k}'
                for v in ink[in_k]]
    assert [g for g, i in zip(got, in_k) if i] == expected
    # Halves up to the ties at the median (which count as thin).
    thick = int((ink[in_k] > median).sum())
    assert abs(2 * thick - in_k.sum()) <= (ink[in_k] == median).sum() + 1
    assert captions.parse_caption(f'a thick {k}') == (k, True)


def test_tokens_round_trip_and_train_batches_carry_each_images_caption():
  tok = captions.template_tokenizer('digit_weight')
  every = captions.template_captions(10)
  ids, mask = tok.encode(every, 3)
  assert tok.vocab_size == 17 and ids.max() < 17 and mask.all()
  assert tok.decode(ids, mask) == list(every)
  assert len({tuple(r) for r in ids}) == 20
  # The pipeline: (images, (ids, mask)); each row's caption is its image's.
  cfg = tiny_config(**CAPTIONED).data
  batch = next(pipeline.create_train_iterator(
      cfg, global_batch_size=16, seed=0, sharding=None))
  x, (ids, mask) = batch
  assert ids.shape == mask.shape == (16, 3) and ids.dtype == np.int32
  assert mask.dtype == bool
  images, labels = _train_digits()
  ink = images.reshape(len(images), -1).astype(np.int64).sum(-1)
  medians = [np.median(ink[labels == k]) for k in range(10)]
  for row, caption in zip(x, tok.decode(ids, mask)):
    u8 = np.round((row[..., 0] + 1) * 127.5).astype(np.uint8)
    i = np.flatnonzero((images == u8).all((1, 2)))[0]
    assert caption == (f'a {"thick" if ink[i] > medians[labels[i]] else "thin"}'
                       f' {labels[i]}')


def _method(**overrides):
  """The tiny DiT (the U-Net trains in the loop test below)."""
  config = tiny_config(**{**CAPTIONED, **DIT, **overrides})
  return methods.create_method(config), config


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  tok = captions.template_tokenizer('digit_weight')
  chosen = [captions.template_captions(10)[i] for i in rng.integers(20, size=n)]
  ids, mask = tok.encode(chosen, 3)
  images = rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)
  return images, (jnp.asarray(ids), jnp.asarray(mask))


def _trained_looking(method, seed=0):
  """Fresh parameters plus noise: zero-initialised cross-attention outputs
  would otherwise hide the context."""
  params = method.init_params(jax.random.key(seed))
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  return flax.traverse_util.unflatten_dict(
      {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32)
       for k, v in flat.items()})


def test_caption_dropout_replaces_exactly_the_dropped_rows_masks():
  method, _ = _method(**{'model.context_dropout': 0.5})
  batch = _batch()
  xs = method.draw(batch, jax.random.key(3), None)
  ids, mask = map(np.asarray, batch[1])
  got = np.asarray(xs['context_mask'])
  np.testing.assert_array_equal(xs['context'], ids)  # ids untouched
  dropped = ~got.any(-1)
  assert 0 < dropped.sum() < len(got)  # both kinds at this seed
  np.testing.assert_array_equal(got[~dropped], mask[~dropped])
  # Probability 1: every caption is the null sequence, which is the network
  # called without context.
  method.context_dropout = 1.0
  xs = method.draw(batch, jax.random.key(3), None)
  assert not np.asarray(xs['context_mask']).any()
  params = _trained_looking(method)
  x, t = batch[0], jnp.arange(16, dtype=jnp.float32)
  dropped_out = method.network_fn(params, context=xs['context'],
                                  context_mask=xs['context_mask'])(x, t)
  null_out = method.network_fn(params)(x, t)
  kept_out = method.network_fn(params, context=batch[1][0],
                               context_mask=batch[1][1])(x, t)
  np.testing.assert_allclose(dropped_out, null_out, atol=1e-5)
  assert np.abs(np.asarray(kept_out - null_out)).max() > 1e-3


def test_guided_sampling_is_the_separately_computed_combination():
  w = 1.5
  method, _ = _method(**{'sample.guidance_scale': w,
                         'sample.captions': ('a thick 3', 'a thin 7',
                                             'a thin 0')})
  params = _trained_looking(method)
  noise = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  tok = captions.template_tokenizer('digit_weight')
  cycled = ['a thick 3', 'a thin 7', 'a thin 0', 'a thick 3']
  ids, mask = map(jnp.asarray, tok.encode(cycled, 3))
  assert method.sample_captions(4) == cycled
  assert method.network_calls() == 2 * 20  # ddpm, T = 20, two rows each
  cond = method.network_fn(params, context=ids, context_mask=mask)
  null = method.network_fn(params)  # context None: the null sequence

  def by_hand(x, t):
    return (1 + w) * cond(x, t) - w * null(x, t)

  x, t = noise, jnp.full((4,), 7.0)
  apply_fn = lambda x, t, c: method.network_fn(
      params, context=c[0], context_mask=c[1])(x, t)
  one_call = guidance.guided_condition(
      apply_fn, (ids, mask), (ids, jnp.zeros_like(mask)), scale=w,
      channels=1)
  np.testing.assert_allclose(one_call(x, t), by_hand(x, t), atol=1e-5)
  rng = jax.random.key(1)
  run = lambda fn: sampling.run(
      denoiser.make_denoiser(fn, method.process, method.prediction),
      method.process, noise, rng, method.sample_settings)
  np.testing.assert_allclose(method.sample(params, noise, rng), run(by_hand),
                             atol=1e-4)
  # w = 0: plain conditional sampling, one network call per step.
  method.guidance_scale = 0.0
  assert method.network_calls() == 20
  np.testing.assert_array_equal(method.sample(params, noise, rng), run(cond))


def test_precomputed_embeddings_are_looked_up_per_example(tmp_path):
  every = captions.template_captions(10)
  rng = np.random.default_rng(0)
  order = rng.permutation(20)  # rows in another order than the template's
  emb = rng.normal(size=(20, 5, 8)).astype(np.float32)
  mask = np.arange(5)[None] < rng.integers(1, 6, size=(20, 1))
  path = str(tmp_path / 'emb.npz')
  np.savez(path, embeddings=emb, mask=mask,
           captions=np.array([every[i] for i in order]))
  method, _ = _method(**{'model.text_vocab_size': 0,
                         'model.text_max_length': 5,
                         'model.context_path': path,
                         'model.context_dropout': 0.0})
  images, (ids, ids_mask) = _batch()
  tok = captions.template_tokenizer('digit_weight')
  xs = method.draw((images, (ids, ids_mask)), jax.random.key(0), None)
  row = {every[i]: r for r, i in enumerate(order)}
  want = [row[c] for c in tok.decode(ids, ids_mask)]
  np.testing.assert_array_equal(xs['context'], emb[want])
  np.testing.assert_array_equal(xs['context_mask'], mask[want])
  loss, values = method.loss(_trained_looking(method), xs, jax.random.key(1))
  assert values.shape == (16,) and np.isfinite(float(loss))
  np.savez(path, embeddings=emb[:19], mask=mask[:19],
           captions=np.array([every[i] for i in order[:19]]))
  with pytest.raises(ValueError, match='config.model.context_path'):
    _method(**{'model.text_vocab_size': 0, 'model.text_max_length': 5,
               'model.context_path': path})


@pytest.mark.parametrize('overrides, match', [
    ({'sample.captions': ('a thick 3', 'a bold 3')},
     r"config\.sample\.captions has 'a bold 3'"),
    ({'sample.captions': ('a thick thin thick 3',)},
     r'config\.model\.text_max_length'),
    ({'model.text_max_length': 2}, r'config\.model\.text_max_length'),
    ({'model.text_vocab_size': 12},
     r'config\.model\.text_vocab_size=12 .* set config\.model\.'
     r'text_vocab_size=17'),
])
def test_bad_captions_fail_before_compiling_naming_the_key(
    overrides, match, monkeypatch):
  def no_compiling(*args, **kwargs):
    raise AssertionError('compiled before the caption check')
  monkeypatch.setattr(jax, 'jit', no_compiling)
  with pytest.raises(ValueError, match=match):
    experiment.build(tiny_config(**{**CAPTIONED, **overrides}), mode='sample')


@pytest.mark.parametrize('overrides, match', [
    ({'model.context_dim': 0}, r'config\.data\.captions.*context_dim > 0'),
    ({'model.num_classes': 10}, r'num_classes=0'),
    ({'data.captions': 'digit_colour'}, r"config\.data\.captions='digit_col"),
    ({'model.context_dropout': 1.5}, r'config\.model\.context_dropout=1\.5'),
])
def test_config_checks_name_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_checks.check(tiny_config(**{**CAPTIONED, **overrides}))
  no_captions = tiny_config(**{'model.context_dim': 8})
  with pytest.raises(ValueError, match=r'context_dim=8 needs config\.data'):
    config_checks.check(no_captions)


# The U-Net's step compiles 2x longer than the tiny DiT's (160 vs 76 s on a
# loaded 2-core machine); its cross-attention is checked in
# tests/test_cross_attention.py, the caption path here is the same.
@pytest.mark.parametrize('model', [
    pytest.param(UNET, id='unet', marks=pytest.mark.slow),
    pytest.param(DIT, id='dit')])
def test_captioned_training_resumes_bit_exactly(model, tmp_path):
  """2 + 2 steps through the loop == 4 steps, with caption dropout on."""
  config = lambda steps: tiny_config(**{
      **CAPTIONED, **model, 'num_train_steps': steps,
      'model.context_dropout': 0.5})
  full = jax.device_get(run_train(config(4), str(tmp_path / 'a')))
  half = jax.device_get(run_train(config(2), str(tmp_path / 'b')))
  resumed = jax.device_get(run_train(config(4), str(tmp_path / 'b')))
  assert int(resumed.step) == int(full.step) == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.ema_params,
               full.ema_params)
  # The captions reached the text encoder: it moved in steps 3 and 4.
  enc = lambda p: p['context_encoder']['text_encoder']['token_embedding']
  assert not np.array_equal(enc(full.params)['embedding'],
                            enc(half.params)['embedding'])


@pytest.mark.slow
def test_caption_control_script_smoke(tmp_path):
  """benchmarks/caption_control.py --smoke as a user runs it; the figures
  are fractions of the samples per caption and the means are theirs."""
  out = tmp_path / 'report.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             TMPDIR=str(tmp_path),
             # One device, and LLVM without its optimisations (as
             # tests/test_benchmarks.py): compiling dominates a smoke run.
             XLA_FLAGS=FAST_COMPILE)
  cmd = [sys.executable, 'benchmarks/caption_control.py', '--smoke',
         f'--json_out={out}', f'--workdir={tmp_path / "run"}']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report['num_per_caption'] == 2 and len(report['captions']) == 20
  assert [r['guidance_scale'] for r in report['rows']] == [0.0] * 20 + [2.0] * 20
  for r in report['rows']:
    assert r['num'] == 2
    for key in ('digit_accuracy', 'weight_accuracy'):
      assert r[key] in (0.0, 0.5, 1.0)
  for w in (0.0, 2.0):
    rows = [r for r in report['rows'] if r['guidance_scale'] == w]
    assert report['means'][f'{w:g}']['weight_accuracy'] == pytest.approx(
        np.mean([r['weight_accuracy'] for r in rows]))
    assert os.path.exists(report['plots'][f'{w:g}'])
