"""Reads diffusers' DiT checkpoints (DiTTransformer2DModel) into our DiT.

The released DiT weights (facebook/DiT-XL-2-256, -512) are distributed as a
diffusers pipeline whose `transformer/` folder holds `config.json` and
`diffusion_pytorch_model.safetensors` (or `.bin`); files saved before
diffusers 0.28 name the class `Transformer2DModel` with norm_type
'ada_norm_zero', which diffusers loads as DiTTransformer2DModel.

The tensors map onto models/dit.py as

  pos_embed.proj                      -> x_embedder (conv OIHW -> HWIO)
  transformer_blocks.0.norm1.emb.
    timestep_embedder.linear_{1,2}    -> t_embedder/linear_{1,2}
    class_embedder.embedding_table    -> y_embedder (K + 1 rows, K = null)
  transformer_blocks.i.norm1.linear   -> blocks_i/adaLN_modulation
  transformer_blocks.i.attn1.to_{q,k,v} -> blocks_i/attn/qkv ([q | k | v])
  transformer_blocks.i.attn1.to_out.0 -> blocks_i/attn/proj
  transformer_blocks.i.ff.net.{0.proj,2} -> blocks_i/mlp/fc{1,2}
  proj_out_{1,2}                      -> final_layer/{adaLN_modulation,linear}

with linear weights transposed. diffusers gives every block its own copy of
the time/class embedder (and uses block 0's for the final layer); the
reference DiT has one, and a released file holds identical copies. We take
block 0's and refuse a file whose copies differ. The fixed position embedding
is not stored (a non-persistent buffer); one that is stored must equal ours.

diffusers' DiT differs from the reference code in two details (see
models/dit.py): its time frequencies use downscale_freq_shift=1 and the
LayerNorm before each MLP its config's norm_eps (1e-5 unless set).
`match='reference'` (the default) reproduces the facebookresearch/DiT code
that trained the released weights (so samples are the paper's model's);
`match='diffusers'` reproduces diffusers' outputs (the equivalence tests).

Files are read by convert/diffusers.py (safetensors with numpy; `.bin` with
torch, weights_only).
"""

import json
import math
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.convert import diffusers as cd
from diffusion_jax.models import dit

SUBFOLDER = 'transformer'
CLASS_NAMES = ('DiTTransformer2DModel', 'Transformer2DModel')
MATCHES = ('diffusers', 'reference')
# facebook/DiT-XL-2-256's transformer/config.json, the fields that
# DiTTransformer2DModel takes: the released model (benchmarks build smaller
# variants of it).
DIT_XL_2_256 = dict(
    activation_fn='gelu-approximate', attention_bias=True,
    attention_head_dim=72, dropout=0.0, in_channels=4,
    norm_elementwise_affine=False, norm_num_groups=32,
    norm_type='ada_norm_zero', num_attention_heads=16,
    num_embeds_ada_norm=1000, num_layers=28, out_channels=8, patch_size=2,
    sample_size=32, upcast_attention=False)

# DiTTransformer2DModel.__init__ defaults (diffusers 0.42.1); diffusers also
# builds an old Transformer2DModel file with them (the class is remapped).
_DIT_DEFAULTS = {
    'num_attention_heads': 16,
    'attention_head_dim': 72,
    'in_channels': 4,
    'out_channels': None,
    'num_layers': 28,
    'dropout': 0.0,
    'norm_num_groups': 32,
    'attention_bias': True,
    'sample_size': 32,
    'patch_size': 2,
    'activation_fn': 'gelu-approximate',
    'num_embeds_ada_norm': 1000,
    'upcast_attention': False,
    'norm_type': 'ada_norm_zero',
    'norm_elementwise_affine': False,
    'norm_eps': 1e-5,
}
# Fields only Transformer2DModel has, at the values that make it a DiT.
_LEGACY_FIELDS = {
    'num_vector_embeds': (None, 'DiT takes continuous inputs'),
    'cross_attention_dim': (None, 'DiT has no cross-attention'),
    'only_cross_attention': (False, 'DiT has no cross-attention'),
    'double_self_attention': (False, 'DiT has one attention per block'),
    'caption_channels': (None, 'DiT is conditioned on class labels'),
}
# Fixed in our DiT, as (field, required value, why).
_FIXED = (
    ('norm_type', 'ada_norm_zero', 'our DiT blocks are adaLN-Zero'),
    ('activation_fn', 'gelu-approximate',
     "our DiT's MLP uses GELU with the tanh approximation"),
    ('attention_bias', True, 'our qkv projection has a bias'),
    ('norm_elementwise_affine', False,
     'our LayerNorms have no affine parameters'),
)
_EMB = 'norm1.emb.'
# The U-Net importer's layout change: linear (O, I) -> (I, O), conv OIHW ->
# HWIO.
_to_flax = cd._to_flax  # pylint: disable=protected-access


def _reject(field: str, value: Any, why: str):
  cd.reject(field, value, why, 'DiT')


def _read(hf_config: Mapping[str, Any]) -> dict:
  """hf_config with diffusers' defaults filled in, checked."""
  name = hf_config.get('_class_name', CLASS_NAMES[0])
  if name not in CLASS_NAMES:
    _reject('_class_name', name, f'supported: {CLASS_NAMES}')
  if name == 'Transformer2DModel' and 'norm_type' not in hf_config:
    # Its own default is 'layer_norm': diffusers would not build a DiT.
    _reject('norm_type', None, "a Transformer2DModel is a DiT only with "
            "norm_type 'ada_norm_zero'")
  for field, (want, why) in _LEGACY_FIELDS.items():
    if hf_config.get(field, want) != want:
      _reject(field, hf_config[field], f'needs {want!r} ({why})')
  c = cd.resolve_config(
      hf_config, _DIT_DEFAULTS, _FIXED, 'DiT',
      also_known=(*_LEGACY_FIELDS, 'use_linear_projection',
                  'interpolation_scale', 'norm_num_groups'))
  if not c['num_embeds_ada_norm']:
    _reject('num_embeds_ada_norm', c['num_embeds_ada_norm'],
            'adaLN-Zero needs the number of classes')
  size = c['sample_size']
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      _reject('sample_size', size, 'our DiT takes square images')
    size = size[0]
  if not isinstance(size, int) or size <= 0:
    _reject('sample_size', size, 'needs a positive int')
  c['sample_size'] = size
  if c['patch_size'] not in (2, 4, 8):
    _reject('patch_size', c['patch_size'], 'config.model.patch_size is 2, '
            '4 or 8')
  if size % c['patch_size']:
    _reject('sample_size', size, f'not divisible by patch_size '
            f'{c["patch_size"]}')
  if (c['num_attention_heads'] * c['attention_head_dim']) % 4:
    _reject('attention_head_dim', c['attention_head_dim'],
            'the hidden size (heads x head dim) must be a multiple of 4 for '
            'the 2-D sin-cos position embedding')
  c['out_channels'] = c['out_channels'] or c['in_channels']
  if c['out_channels'] not in (c['in_channels'], 2 * c['in_channels']):
    _reject('out_channels', c['out_channels'],
            f'our methods predict in_channels={c["in_channels"]} channels, '
            'or twice that with a learned variance')
  if c['dropout']:
    logging.info('diffusers DiT dropout=%s is a training setting; our DiT '
                 'has none', c['dropout'])
  return c


def model_config_from_diffusers(
    hf_config: Mapping[str, Any],
    match: str = 'reference') -> ml_collections.ConfigDict:
  """Our config.model keys for a diffusers DiT config.json (a dict).

  The data shape and variance are not model keys: sample_shape() gives them.
  """
  if match not in MATCHES:
    raise ValueError(f'match={match!r}: use one of {MATCHES}')
  c = _read(hf_config)
  sizes = (int(c['num_layers']),
           int(c['num_attention_heads'] * c['attention_head_dim']),
           int(c['num_attention_heads']))
  variant = next((k for k, v in dit.DIT_VARIANTS.items() if v == sizes),
                 'custom')
  custom = sizes if variant == 'custom' else (0, 0, 0)
  return ml_collections.ConfigDict({
      'name': 'dit',
      'dit_variant': variant,
      'dit_depth': custom[0],
      'dit_hidden_size': custom[1],
      'dit_num_heads': custom[2],
      'patch_size': int(c['patch_size']),
      'mlp_ratio': 4.0,  # diffusers' FeedForward(mult=4), fixed for DiT
      'num_classes': int(c['num_embeds_ada_norm']),
      'dit_time_freq_shift': 1 if match == 'diffusers' else 0,
      'dit_mlp_norm_eps': (float(c['norm_eps']) if match == 'diffusers'
                           else dit.LAYER_NORM_EPS),
  })


def sample_shape(hf_config: Mapping[str, Any]) -> tuple[int, int, bool]:
  """(config.data.image_size, config.data.channels, whether the variance is
  learned: out_channels = 2 in_channels, diffusion.loss 'hybrid')."""
  c = _read(hf_config)
  return (c['sample_size'], int(c['in_channels']),
          c['out_channels'] == 2 * c['in_channels'])


def build_model(model_config: ml_collections.ConfigDict, out_channels: int,
                dtype=jnp.float32) -> dit.DiT:
  """Our DiT from model_config_from_diffusers' keys."""
  m = model_config
  depth, hidden, heads = dit.resolve_size(
      m.dit_variant, m.dit_depth, m.dit_hidden_size, m.dit_num_heads)
  return dit.DiT(out_channels=out_channels, patch_size=m.patch_size,
                 hidden_size=hidden, depth=depth, num_heads=heads,
                 mlp_ratio=m.mlp_ratio, num_classes=m.num_classes,
                 time_freq_shift=m.dit_time_freq_shift,
                 mlp_norm_eps=m.dit_mlp_norm_eps, dtype=dtype)


# ------------------------------------------------------------------- params --
def _check_embedder_copies(state_dict, depth: int) -> list[str]:
  """Block 0's embedder keys; every other block's copy must equal them."""
  prefix = f'transformer_blocks.0.{_EMB}'
  suffixes = sorted(k[len(prefix):] for k in state_dict
                    if k.startswith(prefix))
  if not suffixes:
    raise ValueError(f'checkpoint has no {prefix}* tensors: not an '
                     'adaLN-Zero DiT with a time/class embedder')
  for i in range(1, depth):
    for suffix in suffixes:
      key = f'transformer_blocks.{i}.{_EMB}{suffix}'
      if key not in state_dict:
        raise ValueError(f'checkpoint lacks {key}, the copy of block 0\'s '
                         'embedder that every diffusers DiT block holds')
      first, copy = (np.asarray(state_dict[prefix + suffix], np.float64),
                     np.asarray(state_dict[key], np.float64))
      diff = (np.abs(first - copy).max() if first.shape == copy.shape
              else math.inf)
      if diff > 0:
        raise ValueError(
            f'the time/class embedders of transformer_blocks.0 and '
            f'transformer_blocks.{i} differ ({_EMB}{suffix}: max |difference| '
            f'{diff:.3g}). Our DiT, like the reference, has one embedder for '
            'all blocks; a released DiT holds identical copies, this '
            'checkpoint (fine-tuned per block?) cannot be represented')
  return suffixes


def convert_params(state_dict: Mapping[str, np.ndarray], depth: int,
                   abstract_params) -> dict:
  """diffusers DiT state dict -> our params tree (numpy float32 leaves).

  abstract_params (jax.eval_shape of our DiT's init) gives the structure and
  shapes. Every one of our tensors is filled and every checkpoint tensor used
  (the embedder copies by the comparison); otherwise ValueError naming it.
  """
  used = set()

  def take(key):
    if key not in state_dict:
      raise ValueError(f'checkpoint lacks {key}: not a diffusers DiT of '
                       f'{depth} blocks (config.json num_layers)')
    used.add(key)
    return np.asarray(state_dict[key])

  def linear(key):
    return {'kernel': _to_flax(take(key + '.weight'), 'kernel', 2),
            'bias': take(key + '.bias')}

  emb = f'transformer_blocks.0.{_EMB}'
  for suffix in _check_embedder_copies(state_dict, depth):
    used.update(f'transformer_blocks.{i}.{_EMB}{suffix}'
                for i in range(1, depth))
  ours = {
      'x_embedder': {
          'kernel': _to_flax(take('pos_embed.proj.weight'), 'kernel', 4),
          'bias': take('pos_embed.proj.bias')},
      't_embedder': {
          n: linear(f'{emb}timestep_embedder.{n}')
          for n in ('linear_1', 'linear_2')},
      'final_layer': {'adaLN_modulation': linear('proj_out_1'),
                      'linear': linear('proj_out_2')},
  }
  table = f'{emb}class_embedder.embedding_table.weight'
  if 'y_embedder' in abstract_params:
    ours['y_embedder'] = {'embedding': take(table)}
  for i in range(depth):
    block = f'transformer_blocks.{i}'
    q, k, v = (linear(f'{block}.attn1.to_{n}') for n in 'qkv')
    ours[f'blocks_{i}'] = {
        'adaLN_modulation': linear(f'{block}.norm1.linear'),
        'attn': {
            'qkv': {n: np.concatenate([q[n], k[n], v[n]], axis=-1)
                    for n in ('kernel', 'bias')},
            'proj': linear(f'{block}.attn1.to_out.0')},
        'mlp': {'fc1': linear(f'{block}.ff.net.0.proj'),
                'fc2': linear(f'{block}.ff.net.2')},
    }
  stored_pos = 'pos_embed.pos_embed'  # only if saved as a persistent buffer
  if stored_pos in state_dict:
    used.add(stored_pos)
    stored = np.asarray(state_dict[stored_pos]).reshape(-1)
    hidden = ours['x_embedder']['bias'].shape[0]
    want = dit.pos_embed_2d(hidden, int(round(math.sqrt(
        stored.size // hidden)))).reshape(-1)
    if stored.shape != want.shape or np.abs(stored - want).max() > 1e-5:
      raise ValueError(f'checkpoint {stored_pos} is not the fixed 2-D sin-cos '
                       'position embedding of our DiT (interpolated?)')
  unused = sorted(set(state_dict) - used)
  if unused:
    raise ValueError(f'{len(unused)} checkpoint tensors have no place in our '
                     f'DiT, first: {unused[:3]}')

  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  leaves = []
  for path, abstract in flat:
    names = [str(getattr(p, 'key', p)) for p in path]
    node = ours
    for n in names:
      if not isinstance(node, dict) or n not in node:
        raise ValueError(f'our DiT parameter {"/".join(names)} has no '
                         'checkpoint tensor (a converter bug)')
      node = node[n]
    if node.shape != tuple(abstract.shape):
      raise ValueError(
          f'shape mismatch for our {"/".join(names)}: the checkpoint gives '
          f'{node.shape}, the config.json describes {tuple(abstract.shape)} '
          '(our layout)')
    leaves.append(np.ascontiguousarray(node, dtype=abstract.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


# -------------------------------------------------------------- config --
def read_config(path: str) -> tuple[str, dict]:
  """(the model directory, its config.json) of a local diffusers DiT (a
  DiTTransformer2DModel directory or a pipeline root with transformer/);
  no weights read."""
  model_dir = cd.find_model_dir(path, SUBFOLDER, 'DiT')
  file = f'{model_dir}/{cd.CONFIG_NAME}'
  try:
    with open(file) as f:
      hf_config = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{file} is not readable JSON ({e})') from e
  if not isinstance(hf_config, dict):
    raise ValueError(f'{file} is not a JSON object')
  return model_dir, hf_config


def import_dit(path: str, match: str = 'reference'
               ) -> tuple[dict, ml_collections.ConfigDict]:
  """(params, our config.model keys) of a local diffusers DiT.

  `path` is a DiTTransformer2DModel directory or a pipeline root with a
  `transformer/` subfolder. sample_shape(config.json) gives the data keys.
  """
  model_dir = cd.find_model_dir(path, SUBFOLDER, 'DiT')
  # A generic reader despite its name: config.json + safetensors or .bin.
  hf_config, state_dict = cd.load_diffusers_unet(model_dir)
  model_config = model_config_from_diffusers(hf_config, match)
  size, channels, learned = sample_shape(hf_config)
  network = build_model(model_config, channels * (2 if learned else 1))
  abstract = jax.eval_shape(
      lambda: network.init(jax.random.key(0),
                           jnp.zeros((1, size, size, channels)),
                           jnp.zeros((1,)), train=False))['params']
  params = convert_params(state_dict, network.depth, abstract)
  logging.info('Converted the diffusers DiT in %s (%s parameters)', model_dir,
               f'{sum(x.size for x in jax.tree.leaves(params)):,}')
  return params, model_config
