"""Reads diffusers `AutoencoderKL` checkpoints into our AutoencoderKL.

The latent-diffusion VAEs (stabilityai/sd-vae-ft-ema, sd-vae-ft-mse, the
`vae/` folder of a Stable Diffusion pipeline) are distributed in diffusers'
format. models/autoencoder.py names its modules after diffusers', so the
conversion is the U-Net's (convert/diffusers.py): one tensor at a time with
a layout change only, older attention names (query, key, value, proj_attn)
accepted. That module's reader and `convert_params` are used as they are,
once per part of the model: `encoder.*`, `decoder.*` and the two 1x1 convs.

Only what our model reproduces exactly is accepted: the plain
DownEncoderBlock2D / UpDecoderBlock2D blocks, SiLU, the mid-block attention
and both quant convs. Anything else raises ValueError naming the config key
or tensor.
"""

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import numpy as np

from diffusion_jax.convert import diffusers as unet_convert
from diffusion_jax.models import autoencoder

CLASS_NAME = 'AutoencoderKL'

# diffusers' AutoencoderKL.__init__ defaults (0.42.1): a key missing from a
# config.json means diffusers builds the model with this value.
_DIFFUSERS_DEFAULTS = {
    'in_channels': 3,
    'out_channels': 3,
    'down_block_types': ('DownEncoderBlock2D',),
    'up_block_types': ('UpDecoderBlock2D',),
    'block_out_channels': (64,),
    'layers_per_block': 1,
    'act_fn': 'silu',
    'latent_channels': 4,
    'norm_num_groups': 32,
    'sample_size': 32,
    'scaling_factor': 0.18215,
    'shift_factor': None,
    'latents_mean': None,
    'latents_std': None,
    'force_upcast': True,
    'use_quant_conv': True,
    'use_post_quant_conv': True,
    'mid_block_add_attention': True,
}

# What our model hard-codes, as (diffusers field, required value, why).
_FIXED = (
    ('use_quant_conv', True, 'our AutoencoderKL always has quant_conv'),
    ('use_post_quant_conv', True,
     'our AutoencoderKL always has post_quant_conv'),
    ('mid_block_add_attention', True,
     'our mid blocks always have self-attention'),
)
_DOWN_TYPE = 'DownEncoderBlock2D'
_UP_TYPE = 'UpDecoderBlock2D'
# The 1x1 convs outside the encoder and decoder.
_TOP_LEVEL = ('quant_conv', 'post_quant_conv')


@dataclasses.dataclass(frozen=True)
class ImportedVAE:
  """A converted checkpoint.

  Attributes:
    params: our AutoencoderKL's params (numpy float32 leaves).
    settings: keyword arguments of models.autoencoder.AutoencoderKL.
    in_channels: image channels the encoder takes.
    scaling_factor: latents are multiplied by it before diffusion (and
      divided after), to give them roughly unit variance (LDM sec. 4.3.2:
      0.18215 for SD's VAE).
    shift_factor: subtracted before scaling where the VAE has one (None:
      none; diffusers: z' = (z - shift) * scale).
    latents_mean, latents_std: per-channel statistics some VAEs carry
      instead (None if absent); recorded, not applied.
  """
  params: Any
  settings: dict
  in_channels: int
  scaling_factor: float
  shift_factor: Optional[float] = None
  latents_mean: Optional[tuple] = None
  latents_std: Optional[tuple] = None

  def model(self, **overrides) -> autoencoder.AutoencoderKL:
    """The AutoencoderKL these params belong to (e.g. dtype=jnp.bfloat16)."""
    return autoencoder.AutoencoderKL(**{**self.settings, **overrides})


def _reject(field: str, value: Any, why: str):
  unet_convert.reject(field, value, why, 'AutoencoderKL')


def settings_from_diffusers(hf_config: Mapping[str, Any]) -> dict:
  """hf_config (config.json) -> keyword arguments of our AutoencoderKL plus
  'in_channels'. Raises ValueError naming the first field our model cannot
  reproduce exactly."""
  class_name = hf_config.get('_class_name', CLASS_NAME)
  if class_name != CLASS_NAME:
    _reject('_class_name', class_name, f'only {CLASS_NAME} is supported')
  c = unet_convert.resolve_config(hf_config, _DIFFUSERS_DEFAULTS, _FIXED,
                        'AutoencoderKL')
  # diffusers' get_activation maps both names to nn.SiLU.
  if c['act_fn'] not in ('silu', 'swish'):
    _reject('act_fn', c['act_fn'], 'our AutoencoderKL uses silu only')

  channels = tuple(int(x) for x in c['block_out_channels'])
  for field, block_type in (('down_block_types', _DOWN_TYPE),
                            ('up_block_types', _UP_TYPE)):
    types = list(c[field])
    if len(types) != len(channels):
      _reject(field, types, f'needs one block per entry of '
              f'block_out_channels {list(channels)}')
    for i, t in enumerate(types):
      if t != block_type:
        _reject(f'{field}[{i}]', t, f'supported: {block_type!r} only')
  groups = int(c['norm_num_groups'])
  if any(x % groups for x in channels):
    _reject('norm_num_groups', groups,
            f'must divide every entry of block_out_channels {list(channels)}')
  return dict(block_out_channels=channels,
              latent_channels=int(c['latent_channels']),
              layers_per_block=int(c['layers_per_block']),
              norm_num_groups=groups,
              out_channels=int(c['out_channels']),
              in_channels=int(c['in_channels']))


def convert_vae_params(state_dict: Mapping[str, np.ndarray],
                       flax_abstract_params) -> dict:
  """diffusers AutoencoderKL state dict -> our params (numpy float32).

  Our `encoder` and `decoder` subtrees are named like diffusers' inside, so
  each goes through convert/diffusers.py's convert_params with its prefix
  taken off the checkpoint's names; the 1x1 convs and any tensor outside
  encoder.* / decoder.* form a third part, so a stray tensor is reported as
  unused there.
  """
  parts = {'encoder': {}, 'decoder': {}, '': {}}
  for key, value in state_dict.items():
    prefix, _, rest = key.partition('.')
    if prefix in ('encoder', 'decoder') and rest:
      parts[prefix][rest] = value
    else:
      parts[''][key] = value
  params = {}
  for prefix, sub_dict in parts.items():
    if prefix:
      abstract = flax_abstract_params[prefix]
    else:
      abstract = {k: flax_abstract_params[k] for k in _TOP_LEVEL}
    try:
      converted = unet_convert.convert_params(sub_dict, abstract)
    except ValueError as e:
      where = (f'in the {prefix}.* tensors (named below without "{prefix}.")'
               if prefix else 'outside encoder.* and decoder.*')
      raise ValueError(f'AutoencoderKL checkpoint, {where}: {e}') from e
    if prefix:
      params[prefix] = converted
    else:
      params.update(converted)
  return params


def import_diffusers_vae(path: str) -> ImportedVAE:
  """Reads a local diffusers AutoencoderKL directory (or a pipeline root
  with a vae/ subfolder): config.json + diffusion_pytorch_model.safetensors
  (read with numpy) or .bin (torch, weights_only). Raises ValueError on
  anything our AutoencoderKL cannot reproduce exactly."""
  hf_config, state_dict = unet_convert.load_diffusers_unet(
      unet_convert.find_model_dir(path, 'vae', 'AutoencoderKL'))
  settings = settings_from_diffusers(hf_config)
  in_channels = settings.pop('in_channels')
  model = autoencoder.AutoencoderKL(**settings)
  abstract = jax.eval_shape(
      functools.partial(autoencoder.init_params, model,
                        in_channels=in_channels), jax.random.key(0))
  params = convert_vae_params(state_dict, abstract)
  c = {**_DIFFUSERS_DEFAULTS, **hf_config}
  optional = lambda v: None if v is None else tuple(float(x) for x in v)
  return ImportedVAE(
      params=params, settings=settings, in_channels=in_channels,
      scaling_factor=float(c['scaling_factor']),
      shift_factor=(None if c['shift_factor'] is None
                    else float(c['shift_factor'])),
      latents_mean=optional(c['latents_mean']),
      latents_std=optional(c['latents_std']))
