"""Networks registered by name (config.model.name): 'unet', 'mlp' and
'dit'."""

import jax.numpy as jnp
import ml_collections

from diffusion_jax.models import dit
from diffusion_jax.models import text
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.unet import UNet

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _unet(c: ml_collections.ConfigDict, out_channels: int, image_size: int):
  """The DDPM U-Net (models/unet.py)."""
  for ch in (c.ch, *[c.ch * m for m in c.ch_mult]):
    if ch % c.num_groups:
      raise ValueError(
          f'channel count {ch} is not divisible by num_groups='
          f'{c.num_groups}: change config.model.ch, ch_mult or num_groups')
  levels = len(c.ch_mult)
  if image_size % 2 ** (levels - 1):
    raise ValueError(
        f'config.data.image_size={image_size} cannot be halved {levels - 1} '
        f'times by the U-Net (config.model.ch_mult={tuple(c.ch_mult)}): '
        'use fewer levels or another image size')
  context = text.context_kwargs(c)
  heads = c.get('cross_attn_heads', 4)
  if context['context_dim'] and (
      heads <= 0 or any(c.ch * m % heads for m in c.ch_mult)):
    raise ValueError(
        f'config.model.cross_attn_heads={heads} does not divide every channel '
        f'count {[c.ch * m for m in c.ch_mult]} of the U-Net: change it')
  return UNet(out_channels=out_channels, ch=c.ch, ch_mult=tuple(c.ch_mult),
              num_res_blocks=c.num_res_blocks,
              attn_resolutions=tuple(c.attn_resolutions), dropout=c.dropout,
              num_groups=c.num_groups, temb_dim=c.temb_dim,
              dtype=_DTYPES[c.dtype], num_classes=c.num_classes,
              guidance_input=c.get('guidance_input', False),
              remat=c.get('remat', 'none'),
              cross_attn_heads=heads, **context)


def _mlp(c: ml_collections.ConfigDict, out_channels: int, image_size: int):
  """The residual MLP (models/mlp.py): width config.model.ch, depth
  config.model.num_res_blocks; images are flattened."""
  del image_size
  return MLP(out_channels=out_channels, hidden=c.ch, depth=c.num_res_blocks,
             temb_dim=c.temb_dim, num_classes=c.num_classes)


def _dit(c: ml_collections.ConfigDict, out_channels: int, image_size: int):
  """The Diffusion Transformer (models/dit.py): sizes from
  config.model.dit_variant, patch config.model.patch_size."""
  depth, hidden, heads = dit.resolve_size(
      c.dit_variant, c.dit_depth, c.dit_hidden_size, c.dit_num_heads)
  if image_size:
    dit.check_patch_size(image_size, c.patch_size)
  return dit.DiT(out_channels=out_channels, patch_size=c.patch_size,
                 hidden_size=hidden, depth=depth, num_heads=heads,
                 mlp_ratio=c.mlp_ratio, num_classes=c.num_classes,
                 time_freq_shift=c.dit_time_freq_shift,
                 mlp_norm_eps=c.dit_mlp_norm_eps, dtype=_DTYPES[c.dtype],
                 remat=c.get('remat', 'none'),
                 **text.context_kwargs(c))


MODELS = {'unet': _unet, 'mlp': _mlp, 'dit': _dit}


def create_model(model_config: ml_collections.ConfigDict, out_channels: int,
                 image_size: int = 0):
  """Builds the network named by config.model.name, after checking the
  settings every network shares."""
  c = model_config
  if c.name not in MODELS:
    raise ValueError(f'unknown model {c.name!r}: set config.model.name to one '
                     f'of {tuple(MODELS)}')
  if c.dtype not in _DTYPES:
    raise ValueError(f'unknown dtype {c.dtype!r}: set config.model.dtype to '
                     f'one of {sorted(_DTYPES)}')
  if c.num_classes < 0:
    raise ValueError('config.model.num_classes must be >= 0 (0: unconditional)')
  if not 0.0 <= c.label_dropout < 1.0:
    raise ValueError('config.model.label_dropout must be in [0, 1)')
  if c.get('guidance_input') and c.name != 'unet':
    raise ValueError(f'config.model.guidance_input=True: only the unet takes '
                     f'a guidance weight as input, not {c.name!r}')
  if c.get('context_dim', 0) and c.name not in ('unet', 'dit'):
    raise ValueError(f'config.model.context_dim > 0: only the unet and dit '
                     f'cross-attend to a context sequence, not {c.name!r}')
  return MODELS[c.name](c, out_channels, image_size)
