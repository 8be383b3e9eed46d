"""Reads diffusers `UNet2DModel` checkpoints and maps them to our U-Net.

The released DDPM weights (google/ddpm-cifar10-32, google/ddpm-church-256,
...) are distributed in diffusers' format. Our U-Net names its modules after
diffusers' on purpose, so the conversion is one tensor at a time with only a
layout change:

  conv      weight (O, I, kH, kW)  ->  kernel (kH, kW, I, O)
  linear    weight (O, I)          ->  kernel (I, O)
  GroupNorm weight / bias          ->  scale / bias
  bias                             ->  bias (unchanged)

and module paths `down_blocks.1.attentions.0.to_out.0` <->
`down_blocks_1_attentions_0/to_out`. Attention layers saved by older diffusers
(`query`, `key`, `value`, `proj_attn`) are accepted as `to_q`, `to_k`, `to_v`,
`to_out.0`.

The command that writes a workdir from such a checkpoint is
`diffusion_jax.convert.diffusers_cli`.

Reads `.safetensors` with numpy only; torch is imported (lazily) only for a
`.bin` file, and that is unpickled with `weights_only=True` so a file can
never run code. Neither torch nor diffusers is needed by training
(requirements-convert.txt).
"""

import json
import math
import os
import pickle
import re
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np

SAFETENSORS_NAME = 'diffusion_pytorch_model.safetensors'
BIN_NAME = 'diffusion_pytorch_model.bin'
CONFIG_NAME = 'config.json'

# diffusers' UNet2DModel.__init__ defaults (0.42.1). A key missing from a
# config.json means diffusers builds the model with this value, so the
# checks below must read it the same way (e.g. a missing attention_head_dim
# means 8-dim heads, not one head).
_DIFFUSERS_DEFAULTS = {
    'sample_size': None,
    'in_channels': 3,
    'out_channels': 3,
    'center_input_sample': False,
    'time_embedding_type': 'positional',
    'time_embedding_dim': None,
    'freq_shift': 0,
    'flip_sin_to_cos': True,
    'down_block_types': ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D',
                         'AttnDownBlock2D'),
    'mid_block_type': 'UNetMidBlock2D',
    'up_block_types': ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D',
                       'UpBlock2D'),
    'block_out_channels': (224, 448, 672, 896),
    'layers_per_block': 2,
    'mid_block_scale_factor': 1,
    'downsample_padding': 1,
    'downsample_type': 'conv',
    'upsample_type': 'conv',
    'dropout': 0.0,
    'act_fn': 'silu',
    'attention_head_dim': 8,
    'norm_num_groups': 32,
    'attn_norm_num_groups': None,
    'norm_eps': 1e-5,
    'resnet_time_scale_shift': 'default',
    'add_attention': True,
    'class_embed_type': None,
    'num_class_embeds': None,
    'num_train_timesteps': None,
}

# What our U-Net hard-codes, as (diffusers field, required value, why).
_FIXED = (
    ('center_input_sample', False, 'our U-Net takes x_t in [-1, 1] as is'),
    ('time_embedding_type', 'positional',
     'our U-Net has the sinusoidal DDPM time embedding only'),
    ('flip_sin_to_cos', False, 'our time embedding is [sin, cos]'),
    ('freq_shift', 1, 'our time embedding divides by (dim/2 - 1)'),
    ('mid_block_type', 'UNetMidBlock2D', 'our U-Net always has that mid block'),
    ('mid_block_scale_factor', 1, 'our mid block does not rescale'),
    ('downsample_padding', 0,
     "our Downsample pads (0, 1) ('SAME'), diffusers does that for 0 only"),
    ('downsample_type', 'conv', 'our Downsample is a strided conv'),
    ('upsample_type', 'conv', 'our Upsample is nearest + conv'),
    ('resnet_time_scale_shift', 'default',
     'our ResNet blocks add the time embedding (no scale/shift)'),
    ('add_attention', True, 'our mid block always has attention'),
    ('class_embed_type', None, 'our U-Net is unconditional'),
    ('num_class_embeds', None, 'our U-Net is unconditional'),
)

_DOWN_TYPES = {'DownBlock2D': False, 'AttnDownBlock2D': True}
_UP_TYPES = {'UpBlock2D': False, 'AttnUpBlock2D': True}

# flax.linen.GroupNorm's epsilon, which models/unet.py does not change.
_FLAX_GROUPNORM_EPS = 1e-6


# ------------------------------------------------------------------ loading --
def find_model_dir(path: str, subfolder: str = 'unet',
                   model: str = 'UNet2DModel') -> str:
  """`path` itself, or its `subfolder` (a pipeline root: unet/, vae/,
  transformer/), whichever holds a diffusers `model` (config + weights)."""
  if not os.path.isdir(path):
    raise ValueError(f'{path} is not a directory: expected a local diffusers '
                     f'{model} directory ({CONFIG_NAME} + {SAFETENSORS_NAME} '
                     f'or {BIN_NAME}) or a pipeline root with a {subfolder}/ '
                     'subfolder')
  for candidate in (path, os.path.join(path, subfolder)):
    has_weights = any(os.path.isfile(os.path.join(candidate, n))
                      for n in (SAFETENSORS_NAME, BIN_NAME))
    if os.path.isfile(os.path.join(candidate, CONFIG_NAME)) and has_weights:
      return candidate
  present = sorted(os.listdir(path))
  raise ValueError(
      f'{path} holds no diffusers {model}: expected {CONFIG_NAME} and '
      f'{SAFETENSORS_NAME} (or {BIN_NAME}) in it or in its {subfolder}/ '
      f'subfolder; found {present}. Sharded or variant files (*.fp16.*, '
      '*.index.json) are not supported: save the model with save_pretrained() '
      'first.')


def _load_bin(file: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{file} is a torch pickle and reading it needs torch: pip install -r '
        'requirements-convert.txt, or convert it to safetensors elsewhere') from e
  try:
    # weights_only: tensors and plain containers only, never a pickled
    # callable, so a malicious or odd file cannot run code here.
    loaded = torch.load(file, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f'refusing to load {file}: its pickle needs code execution (it is not '
        'a plain state dict of tensors), which weights_only loading forbids. '
        'Re-save it as a state dict (model.state_dict()) or as safetensors. '
        f'torch said: {str(e).splitlines()[0]}') from e
  if not isinstance(loaded, Mapping) or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor)
      for k, v in loaded.items()):
    raise ValueError(f'{file} is not a state dict (a dict of str -> tensor): '
                     f'got {type(loaded).__name__}')
  # float32 also for bf16/fp16 files: numpy has no bf16 and our params are f32.
  return {k: (v.detach().to(torch.float32) if v.is_floating_point()
              else v.detach()).numpy() for k, v in loaded.items()}


def load_diffusers_unet(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, state dict as numpy) of a local diffusers UNet.

  `path` is a UNet2DModel directory or a pipeline root with a `unet/`
  subfolder (the layout of the released google/ddpm-* repositories).
  safetensors is preferred and read without torch; a `.bin` is read with
  `torch.load(weights_only=True)`.
  """
  model_dir = find_model_dir(path)
  with open(os.path.join(model_dir, CONFIG_NAME)) as f:
    try:
      hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{model_dir}/{CONFIG_NAME} is not valid JSON: {e}') from e
  if not isinstance(hf_config, dict):
    raise ValueError(f'{model_dir}/{CONFIG_NAME} is not a JSON object')
  st_file = os.path.join(model_dir, SAFETENSORS_NAME)
  if os.path.isfile(st_file):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      state_dict = load_file(st_file)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{st_file} could not be read as safetensors with '
                       f'numpy ({type(e).__name__}: {e})') from e
  else:
    state_dict = _load_bin(os.path.join(model_dir, BIN_NAME))
  logging.info('Read %d tensors from %s', len(state_dict), model_dir)
  return hf_config, state_dict


# ------------------------------------------------------------------- config --
def reject(field: str, value: Any, why: str, model: str = 'U-Net'):
  raise ValueError(f'diffusers config {field}={value!r} cannot be represented '
                   f'by our {model}: {why}')


_reject = reject


def resolve_config(hf_config: Mapping[str, Any], defaults: Mapping[str, Any],
                   fixed, model: str, also_known=()) -> dict:
  """A diffusers config.json with the class's __init__ defaults filled in
  (a missing key means diffusers builds the model with the default, so we
  must read it the same way), unknown fields logged, and each (field, value,
  why) of `fixed` checked: our `model` reproduces only that value."""
  unknown = sorted(k for k in hf_config if not k.startswith('_')
                   and k not in defaults and k not in also_known)
  if unknown:
    logging.warning('Ignoring diffusers %s config fields unknown to this '
                    'converter: %s', model, unknown)
  c = {**defaults, **{k: v for k, v in hf_config.items() if k in defaults}}
  for field, want, why in fixed:
    if c[field] != want:
      reject(field, c[field], f'needs {want!r} ({why})', model)
  return c


def config_from_diffusers(
    hf_config: Mapping[str, Any],
    base_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """base_config with model.* and data.image_size/channels of hf_config.

  Everything else (diffusion schedule, optimiser, sampling) stays as in
  base_config, and so does model.dropout: it is a training choice that the
  released weights do not carry. Raises ValueError naming the first diffusers
  field our U-Net cannot reproduce exactly.
  """
  class_name = hf_config.get('_class_name', 'UNet2DModel')
  if class_name != 'UNet2DModel':
    _reject('_class_name', class_name, 'only UNet2DModel is supported')
  c = resolve_config(hf_config, _DIFFUSERS_DEFAULTS, _FIXED, 'U-Net')
  if c['act_fn'] not in ('silu', 'swish'):
    _reject('act_fn', c['act_fn'], 'our U-Net uses silu (swish) only')
  if not math.isclose(c['norm_eps'], _FLAX_GROUPNORM_EPS, rel_tol=1e-3):
    _reject('norm_eps', c['norm_eps'],
            f'our GroupNorms use epsilon {_FLAX_GROUPNORM_EPS}')
  if c['in_channels'] != c['out_channels']:
    _reject('out_channels', c['out_channels'],
            f'our U-Net predicts eps with in_channels={c["in_channels"]} '
            'channels (no learned variance)')

  channels = [int(x) for x in c['block_out_channels']]
  ch = channels[0]
  if any(x % ch for x in channels):
    _reject('block_out_channels', c['block_out_channels'],
            f'every entry must be a multiple of the first ({ch})')
  down, up = list(c['down_block_types']), list(c['up_block_types'])
  if len(down) != len(channels) or len(up) != len(channels):
    _reject('down_block_types', down, 'needs one down and one up block per '
            'entry of block_out_channels')
  for i, t in enumerate(down):
    if t not in _DOWN_TYPES:
      _reject(f'down_block_types[{i}]', t, f'supported: {sorted(_DOWN_TYPES)}')
  for i, t in enumerate(up):
    if t not in _UP_TYPES:
      _reject(f'up_block_types[{i}]', t, f'supported: {sorted(_UP_TYPES)}')
  # Our U-Net places attention by resolution, so the way up must mirror the
  # way down.
  for i, t in enumerate(up):
    if _UP_TYPES[t] != _DOWN_TYPES[down[len(down) - 1 - i]]:
      _reject(f'up_block_types[{i}]', t,
              f'attention on the way up must mirror down_block_types '
              f'{down} (our U-Net places attention by resolution)')

  size = c['sample_size']
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      _reject('sample_size', size, 'our U-Net takes square images')
    size = size[0]
  if not isinstance(size, int) or size <= 0:
    _reject('sample_size', size,
            'needed (a positive int) to place attention by resolution')
  if size % 2 ** (len(channels) - 1):
    _reject('sample_size', size,
            f'must be divisible by 2**{len(channels) - 1}')
  attn_resolutions = tuple(size // 2 ** i for i, t in enumerate(down)
                           if _DOWN_TYPES[t])

  # Every attention layer must have a single head: our attention has one.
  head_dim = c['attention_head_dim']
  if head_dim is not None:
    attn_channels = [channels[i] for i, t in enumerate(down)
                     if _DOWN_TYPES[t]] + [channels[-1]]  # + mid block
    for width in attn_channels:
      if width != head_dim:
        _reject('attention_head_dim', head_dim,
                f'gives {width / head_dim:g} heads on {width} channels; our '
                'attention is single-head (set it to null)')
  groups = c['norm_num_groups']
  if groups is None:
    _reject('norm_num_groups', groups, 'our GroupNorms need a group count')
  if c['attn_norm_num_groups'] not in (None, groups):
    _reject('attn_norm_num_groups', c['attn_norm_num_groups'],
            f'our attention GroupNorm uses norm_num_groups={groups}')

  config = base_config.copy_and_resolve_references()
  with config.unlocked():
    config.model.name = 'unet'
    config.model.ch = ch
    config.model.ch_mult = tuple(x // ch for x in channels)
    config.model.num_res_blocks = int(c['layers_per_block'])
    config.model.attn_resolutions = attn_resolutions
    config.model.num_groups = int(groups)
    config.model.temb_dim = int(c['time_embedding_dim'] or 4 * ch)
    config.data.image_size = size
    config.data.channels = int(c['in_channels'])
  return config


# ------------------------------------------------------------------- params --
def _diffusers_name(flax_path: tuple[str, ...]) -> tuple[str, str]:
  """('down_blocks_1_attentions_0', 'to_out', 'kernel') ->
  ('down_blocks.1.attentions.0.to_out.0.weight', 'linear')."""
  top, *inner, leaf = flax_path
  m = re.fullmatch(r'(down_blocks|up_blocks)_(\d+)_'
                   r'(resnets|attentions|downsamplers|upsamplers)_(\d+)', top)
  if m:
    top = '.'.join(m.groups())
  elif m := re.fullmatch(r'mid_block_(resnets|attentions)_(\d+)', top):
    top = 'mid_block.' + '.'.join(m.groups())
  elif m := re.fullmatch(r'time_embedding_(linear_\d+)', top):
    top = 'time_embedding.' + m.group(1)
  inner = ['to_out.0' if n == 'to_out' else n for n in inner]
  if leaf == 'bias':
    kind = 'bias'
  elif leaf == 'scale':
    kind = 'norm'
  elif leaf == 'kernel':
    kind = 'kernel'
  else:
    raise ValueError(f'unexpected parameter {"/".join(flax_path)} in our '
                     'model: the converter knows kernel, bias and scale')
  return '.'.join([top, *inner, 'weight' if leaf != 'bias' else 'bias']), kind


_LEGACY_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
                'proj_attn': 'to_out.0'}


def _rename_legacy(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Older diffusers attention names -> today's (as diffusers does on load)."""
  out = {}
  for key, value in state_dict.items():
    m = re.fullmatch(r'(.*\.attentions\.\d+)\.(query|key|value|proj_attn)'
                     r'\.(weight|bias)', key)
    new = f'{m[1]}.{_LEGACY_ATTN[m[2]]}.{m[3]}' if m else key
    if new in out:
      raise ValueError(f'checkpoint holds both {key} and {new}, which are '
                       'the same tensor under old and new names')
    out[new] = value
  return out


def _to_flax(value: np.ndarray, kind: str, ndim: int) -> np.ndarray:
  if kind == 'kernel' and ndim == 4 and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if kind == 'kernel' and ndim == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]  # a 1x1 conv used as a linear layer
    if value.ndim == 2:
      return value.T  # (out, in) -> (in, out)
  return value


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """Our shape in diffusers' layout, for error messages."""
  if kind == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def convert_params(state_dict: Mapping[str, np.ndarray], flax_abstract_params):
  """diffusers state dict -> our params tree (numpy float32 leaves).

  flax_abstract_params gives the structure, shapes and dtypes (from
  jax.eval_shape of model.init, or real params). Every one of our tensors
  is filled exactly once and every checkpoint tensor must be used; anything
  else raises ValueError naming the tensor (and both shapes on a mismatch).
  """
  state_dict = _rename_legacy(state_dict)
  used = set()
  flat, treedef = jax.tree_util.tree_flatten_with_path(flax_abstract_params)
  leaves, missing = [], []
  for path, abstract in flat:
    names = tuple(str(getattr(k, 'key', k)) for k in path)
    key, kind = _diffusers_name(names)
    ours = '/'.join(names)
    if key not in state_dict:
      missing.append(f'{key} (for our {ours})')
      leaves.append(None)
      continue
    if key in used:  # Two of our tensors on one of theirs: a mapping bug.
      raise ValueError(f'checkpoint tensor {key} would fill two of our '
                       f'tensors (second: {ours})')
    used.add(key)
    value = np.asarray(state_dict[key])
    converted = _to_flax(value, kind, len(abstract.shape))
    if converted.shape != tuple(abstract.shape):
      raise ValueError(
          f'shape mismatch: checkpoint tensor {key} has shape '
          f'{tuple(value.shape)} but our model (config) expects '
          f'{_torch_shape(tuple(abstract.shape), kind)} for it (our {ours}, '
          f'{tuple(abstract.shape)} in our layout). The config does not '
          'describe this checkpoint.')
    leaves.append(np.ascontiguousarray(converted, dtype=abstract.dtype))
  if missing:
    raise ValueError(f'{len(missing)} tensors of our model are not in the '
                     f'checkpoint, first: {missing[:3]}')
  unused = sorted(set(state_dict) - used)
  if unused:
    raise ValueError(f'{len(unused)} checkpoint tensors have no place in our '
                     f'model, first: {unused[:3]}')
  return jax.tree_util.tree_unflatten(treedef, leaves)
