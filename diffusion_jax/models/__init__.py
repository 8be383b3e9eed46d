"""Models registered by name (config.model.name)."""

import jax.numpy as jnp
import ml_collections

from diffusion_jax.models.unet import UNet

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(model_config: ml_collections.ConfigDict, out_channels: int):
  """Builds the network named by config.model.name."""
  if model_config.name != 'unet':
    raise ValueError(f'unknown model {model_config.name!r}: set '
                     "config.model.name to 'unet'")
  if model_config.dtype not in _DTYPES:
    raise ValueError(f'unknown dtype {model_config.dtype!r}: set '
                     f'config.model.dtype to one of {sorted(_DTYPES)}')
  for c in (model_config.ch, *[model_config.ch * m for m in model_config.ch_mult]):
    if c % model_config.num_groups:
      raise ValueError(
          f'channel count {c} is not divisible by num_groups='
          f'{model_config.num_groups}: change config.model.ch, ch_mult or '
          'num_groups')
  if model_config.num_classes < 0:
    raise ValueError('config.model.num_classes must be >= 0 (0: unconditional)')
  if not 0.0 <= model_config.label_dropout < 1.0:
    raise ValueError('config.model.label_dropout must be in [0, 1)')
  return UNet(
      out_channels=out_channels,
      ch=model_config.ch,
      ch_mult=tuple(model_config.ch_mult),
      num_res_blocks=model_config.num_res_blocks,
      attn_resolutions=tuple(model_config.attn_resolutions),
      dropout=model_config.dropout,
      num_groups=model_config.num_groups,
      temb_dim=model_config.temb_dim,
      dtype=_DTYPES[model_config.dtype],
      num_classes=model_config.num_classes)
