"""DiT (models/dit.py) and its diffusers importer (convert/diffusers_dit.py).

The comparisons build randomly initialised diffusers DiTTransformer2DModels
(nothing is downloaded), perturb every weight so that zero-initialised layers
hide nothing, and check that our DiT, given the imported weights, predicts
the same. Tests needing torch/diffusers (requirements-convert.txt) skip
without them.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from diffusion_jax import config_checks, models, parallel
from diffusion_jax.convert import diffusers_dit as dd
from diffusion_jax.errors import ConfigError
from diffusion_jax.models import dit
from tests.util import run_sample, run_train, tiny_config

# facebook/DiT-XL-2-256's transformer/config.json (DiT-XL/2, 32x32x4
# latents, learned sigma); saved by diffusers 0.12 under the old class name.
RELEASED_256 = {
    '_class_name': 'Transformer2DModel',
    '_diffusers_version': '0.12.0.dev0',
    'activation_fn': 'gelu-approximate',
    'attention_bias': True,
    'attention_head_dim': 72,
    'cross_attention_dim': None,
    'dropout': 0.0,
    'in_channels': 4,
    'norm_elementwise_affine': False,
    'norm_num_groups': 32,
    'norm_type': 'ada_norm_zero',
    'num_attention_heads': 16,
    'num_embeds_ada_norm': 1000,
    'num_layers': 28,
    'num_vector_embeds': None,
    'only_cross_attention': False,
    'out_channels': 8,
    'patch_size': 2,
    'sample_size': 32,
    'upcast_attention': False,
    'use_linear_projection': False,
}

# Parameter counts of github.com/facebookresearch/DiT models.py (commit on
# its main branch), measured by instantiating each DiT_models entry with
# input_size=32, num_classes=1000, learn_sigma=True (timm 1.0.31) and summing
# p.numel() over model.parameters(), as its train.py logs them. That sum
# includes the frozen pos_embed Parameter (requires_grad=False); the paper's
# 675M for DiT-XL/2 is that figure. Ours holds the position embedding as a
# constant, so we match the reference's trainable count: total - pos_embed.
# (variant, patch): (reference total, of which pos_embed)
REFERENCE_PARAMS = {
    ('XL', 2): (675_129_632, 294_912), ('XL', 4): (675_074_432, 73_728),
    ('XL', 8): (675_683_072, 18_432),
    ('L', 2): (458_102_816, 262_144), ('L', 4): (458_053_760, 65_536),
    ('L', 8): (458_594_816, 16_384),
    ('B', 2): (130_512_416, 196_608), ('B', 4): (130_475_648, 49_152),
    ('B', 8): (130_881_536, 12_288),
    ('S', 2): (32_963_360, 98_304), ('S', 4): (32_945_024, 24_576),
    ('S', 8): (33_148_160, 6_144),
}


def _tiny(**kw):
  args = dict(out_channels=2, patch_size=2, hidden_size=32, depth=2,
              num_heads=4, num_classes=10)
  return dit.DiT(**{**args, **kw})


def _model_config(**overrides):
  c = default.get_config().model
  c.name = 'dit'
  c.update(overrides)
  return c


# -------------------------------------------------------- (a) adaLN-Zero --
def test_fresh_block_is_the_identity_and_fresh_dit_predicts_zero():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 16, 32)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
  block = dit.DiTBlock(num_heads=4)
  params = jax.jit(block.init)(jax.random.key(0), x, c)
  np.testing.assert_array_equal(jax.jit(block.apply)(params, x, c), x)

  net = _tiny(dtype=jnp.bfloat16)
  images = jnp.asarray(rng.standard_normal((3, 8, 8, 1)), jnp.float32)
  t = jnp.array([0, 500, 999])
  variables = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(1), images, t)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert 'pos_embed' not in str(jax.tree_util.tree_structure(variables))
  out = jax.jit(functools.partial(net.apply, train=False))(
      variables, images, t, jnp.array([1, 2, 10]))
  assert out.shape == (3, 8, 8, 2) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)
  # Initialisation as the reference: a non-zero label table and time MLP.
  p = variables['params']
  assert 0.01 < float(jnp.std(p['y_embedder']['embedding'])) < 0.03
  assert float(jnp.std(p['t_embedder']['linear_1']['kernel'])) > 0.01


def test_labels_and_null_class():
  net = _tiny()
  x = jnp.ones((2, 8, 8, 1))
  t = jnp.array([3, 3])
  params = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(0), x, t)['params']
  # Off the zero initialisation, which would hide the labels.
  params = jax.tree.map(lambda a: a + 0.1, params)
  apply = jax.jit(lambda y: net.apply({'params': params}, x, t, y,
                                      train=False))
  null = apply(jnp.array([10, 10]))
  np.testing.assert_array_equal(apply(None), null)
  assert not np.allclose(apply(jnp.array([0, 1])), null)
  with pytest.raises(ValueError, match='unconditional DiT'):
    jax.eval_shape(functools.partial(_tiny(num_classes=0).init, train=False),
                   jax.random.key(0), x, t, jnp.array([0, 1]))


# ---------------------------------------------------------- (b) sizes --
def test_parameter_counts_equal_the_reference_code():
  for (variant, patch), (total, pos) in REFERENCE_PARAMS.items():
    net = models.create_model(
        _model_config(dit_variant=variant, patch_size=patch, num_classes=1000),
        out_channels=8, image_size=32)
    shapes = jax.eval_shape(lambda n=net: n.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)),
        train=False))
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count == total - pos, (variant, patch)
  assert round(REFERENCE_PARAMS['XL', 2][0] / 1e6) == 675  # the paper's


def test_variant_table_and_config_choices_agree():
  assert config_checks.CHOICES['model.dit_variant'] == (
      *dit.DIT_VARIANTS, 'custom')


# ------------------------------------------------- (e) bad sizes, config --
def test_image_size_not_divisible_by_the_patch():
  with pytest.raises(ValueError, match='image_size=6 is not divisible by '
                     'config.model.patch_size=4'):
    jax.eval_shape(functools.partial(_tiny(patch_size=4).init, train=False),
                   jax.random.key(0), jnp.zeros((1, 6, 6, 1)), jnp.zeros((1,)))
  with pytest.raises(ValueError, match='config.model.patch_size=8'):
    models.create_model(_model_config(patch_size=8), 2, image_size=12)
  config = tiny_config(**{'model.name': 'dit', 'model.patch_size': 4,
                          'data.image_size': 6})
  with pytest.raises(ConfigError, match='patch_size=2'):  # the fix offered
    config_checks.check(config)


@pytest.mark.parametrize('overrides, match', [
    ({'model.dit_variant': 'M'}, "dit_variant='M'"),
    ({'model.dit_depth': 2}, "dit_variant='custom'"),
    ({'model.dit_variant': 'custom', 'model.dit_depth': 2,
      'model.dit_hidden_size': 64}, 'dit_num_heads=0'),
    ({'model.dit_variant': 'custom', 'model.dit_depth': 2,
      'model.dit_hidden_size': 64, 'model.dit_num_heads': 6},
     'dit_num_heads=6 does not divide.*e.g. 4'),
    ({'model.dit_variant': 'custom', 'model.dit_depth': 2,
      'model.dit_hidden_size': 66, 'model.dit_num_heads': 6},
     'multiple of 4'),
    ({'model.patch_size': 3}, 'patch_size=3'),
])
def test_bad_dit_config_values_name_the_key(overrides, match):
  config = tiny_config(**{'model.name': 'dit', **overrides})
  with pytest.raises(ConfigError, match=match):
    config_checks.check(config)
  with pytest.raises(ValueError):  # create_model checks them too
    models.create_model(config.model, 1, 8)


# ------------------------------------------------- (c) diffusers weights --
def _diffusers():
  pytest.importorskip('torch')
  pytest.importorskip('safetensors')
  return pytest.importorskip('diffusers')


def _perturbed_dit(hf_config, seed=0):
  """A diffusers DiT with every weight moved off its initialisation and
  the per-block embedder copies made identical again (as released)."""
  torch = pytest.importorskip('torch')
  model = _diffusers().DiTTransformer2DModel.from_config(hf_config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * (0.02 if p.ndim > 1
                                                    else 0.05))
    emb = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(emb)
  return model


def _compare(model, params, model_config, size, out_channels):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 4, size, size)).astype(np.float32)
  t = np.array([0, 17, 500, 999])
  y = np.array([3, 999, 1000, 0])  # 1000: the null class
  with torch.no_grad():
    want = model(torch.from_numpy(x), torch.from_numpy(t),
                 torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
  net = dd.build_model(model_config, out_channels)
  apply = jax.jit(lambda p, *a: net.apply({'params': p}, *a, train=False))
  got = np.asarray(apply(params, x.transpose(0, 2, 3, 1), t, y))
  return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize('sizes, safe', [
    (dict(num_layers=3, num_attention_heads=4, attention_head_dim=16,
          sample_size=8, patch_size=2), True),
    (dict(num_layers=2, num_attention_heads=2, attention_head_dim=12,
          sample_size=16, patch_size=4, norm_eps=1e-6), False),
], ids=['tiny_safetensors', 'patch4_bin_pipeline_root'])
def test_tiny_dits_match_diffusers(tmp_path, sizes, safe):
  hf_config = {k: v for k, v in RELEASED_256.items() if not k.startswith('_')}
  hf_config.update(sizes)
  model = _perturbed_dit(hf_config)
  # The .bin case is laid out as a pipeline (transformer/ subfolder).
  model.save_pretrained(str(tmp_path / ('' if safe else 'transformer')),
                        safe_serialization=safe)
  params, model_config = dd.import_dit(str(tmp_path), match='diffusers')
  assert (model_config.dit_variant, model_config.dit_time_freq_shift) == (
      'custom', 1)
  assert model_config.dit_mlp_norm_eps == sizes.get('norm_eps', 1e-5)
  assert _compare(model, params, model_config, sizes['sample_size'],
                  8) <= 1e-4
  # The reference's conventions (match='reference') give another function.
  _, reference = dd.import_dit(str(tmp_path), match='reference')
  assert (reference.dit_time_freq_shift, reference.dit_mlp_norm_eps) == (
      0, 1e-6)
  assert _compare(model, params, reference, sizes['sample_size'], 8) > 1e-3


def test_released_width_matches_diffusers_and_reads_the_old_class_name(
    tmp_path):
  """DiT-XL/2's width, heads, patch and latent size with one block."""
  model = _perturbed_dit({**RELEASED_256, 'num_layers': 1})
  model.save_pretrained(str(tmp_path))
  # The released file's config.json, as diffusers 0.12 wrote it.
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({**RELEASED_256, 'num_layers': 1}, f)
  params, model_config = dd.import_dit(str(tmp_path), match='diffusers')
  assert (model_config.dit_hidden_size, model_config.dit_num_heads,
          model_config.num_classes) == (1152, 16, 1000)
  assert dd.sample_shape(RELEASED_256) == (32, 4, True)
  assert dd.model_config_from_diffusers(RELEASED_256).dit_variant == 'XL'
  assert _compare(model, params, model_config, 32, 8) <= 1e-4


# ---------------------------------------------------- (d) refusals --
def test_importer_refuses_differing_embedder_copies(tmp_path):
  torch = pytest.importorskip('torch')
  hf_config = {k: v for k, v in RELEASED_256.items() if not k.startswith('_')}
  hf_config.update(num_layers=3, num_attention_heads=2, attention_head_dim=8,
                   sample_size=4)
  model = _perturbed_dit(hf_config)
  with torch.no_grad():
    model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_2.bias[
        0] += 0.25
  model.save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match=r'transformer_blocks\.0 and '
                     r'transformer_blocks\.2 differ .*linear_2\.bias: max '
                     r'\|difference\| 0\.25'):
    dd.import_dit(str(tmp_path))


@pytest.mark.parametrize('change, match', [
    ({'norm_type': 'ada_norm'}, "norm_type='ada_norm'.*adaLN-Zero"),
    ({'activation_fn': 'geglu'}, "activation_fn='geglu'"),
    ({'sample_size': [32, 16]}, 'square'),
    ({'cross_attention_dim': 768}, 'cross-attention'),
    ({'out_channels': 6}, 'learned variance'),
    ({'_class_name': 'UNet2DModel'}, '_class_name'),
    ({'patch_size': 3}, 'patch_size'),
])
def test_importer_refuses_unsupported_configs(change, match):
  with pytest.raises(ValueError, match=match):
    dd.model_config_from_diffusers({**RELEASED_256, **change})


def test_importer_refuses_a_legacy_config_without_norm_type(tmp_path):
  legacy = {k: v for k, v in RELEASED_256.items() if k != 'norm_type'}
  with pytest.raises(ValueError, match='norm_type'):
    dd.model_config_from_diffusers(legacy)
  with pytest.raises(ValueError, match='holds no diffusers DiT'):
    dd.import_dit(str(tmp_path))
  with pytest.raises(ValueError, match="match='diffuser'"):
    dd.model_config_from_diffusers(RELEASED_256, match='diffuser')


# -------------------------------------------------- (f) through the trainer --
def test_dit_trains_and_samples_through_the_trainer(tmp_path):
  config = tiny_config(**{
      'model.name': 'dit', 'model.dit_variant': 'custom',
      'model.dit_depth': 2, 'model.dit_hidden_size': 32,
      'model.dit_num_heads': 4, 'model.num_classes': 10,
      'sample.guidance_scale': 1.0, 'num_train_steps': 2,
      'checkpoint_every_steps': 2, 'log_every_steps': 2})
  workdir = str(tmp_path)
  # One device: the 8-device mesh adds ~15 s of compiling and checkpoint
  # slicing and nothing DiT-specific (test_train.py covers meshes).
  mesh = parallel.create_mesh(jax.devices()[:1])
  # The loop raises NonFiniteLossError on a non-finite loss.
  state = run_train(config, workdir, mesh)
  assert int(state.step) == 2
  assert 'blocks_1' in state.params and 'y_embedder' in state.params
  assert all(np.isfinite(np.asarray(p)).all()
             for p in jax.tree.leaves(state.params))
  out = run_sample(config, workdir, mesh)
  images = np.load(os.path.join(out, 'samples.npz'))['images']
  assert images.shape == (12, 8, 8, 1) and images.std() > 0
