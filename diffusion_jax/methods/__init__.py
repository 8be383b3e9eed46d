"""Generative methods by name (config.method); each builds from the config.

A new method subclasses methods.base.Method (or OneOptimizerMethod) and
registers a `config -> Method` builder here, or with `register` from outside
the package (a test registers a toy Gaussian this way).
"""

from typing import Callable

from diffusion_jax.methods.autoencoder import AutoencoderMethod
from diffusion_jax.methods.base import Method, OneOptimizerMethod
from diffusion_jax.methods.consistency import ConsistencyTraining
from diffusion_jax.methods.consistency_distillation import (
    ConsistencyDistillation)
from diffusion_jax.methods.diffusion import DiffusionMethod
from diffusion_jax.methods.distillation import ProgressiveDistillation
from diffusion_jax.methods.glow import GlowMethod
from diffusion_jax.methods.gan import GanMethod
from diffusion_jax.methods.latent_diffusion import LatentDiffusion
from diffusion_jax.methods.pixelcnn import PixelCNNMethod
from diffusion_jax.methods.vae import VAEMethod


def _diffusion(config) -> DiffusionMethod:
  """Diffusion on pixels, or on cached latents when config.latent.autoencoder
  is set (config_checks: then config.data.source is 'latents')."""
  if config.get('latent') and config.latent.autoencoder:
    return LatentDiffusion.from_config(config)
  return DiffusionMethod.from_config(config)


METHODS: dict[str, Callable] = {
    'diffusion': _diffusion,
    'progressive_distillation': ProgressiveDistillation.from_config,
    'consistency_training': ConsistencyTraining.from_config,
    'consistency_distillation': ConsistencyDistillation.from_config,
    'autoencoder': AutoencoderMethod.from_config,
    'glow': GlowMethod.from_config,
    'vae': VAEMethod.from_config,
    'gan': GanMethod.from_config,
    'pixelcnn': PixelCNNMethod.from_config,
}


def register(name: str, build: Callable) -> None:
  """Makes config.method=name build its method with build(config)."""
  METHODS[name] = build


def create_method(config) -> Method:
  if config.method not in METHODS:
    raise ValueError(f'unknown method {config.method!r}: set config.method '
                     f'to one of {tuple(METHODS)}')
  return METHODS[config.method](config)


__all__ = ['Method', 'OneOptimizerMethod', 'DiffusionMethod', 'LatentDiffusion',
           'ProgressiveDistillation', 'ConsistencyTraining',
           'ConsistencyDistillation', 'AutoencoderMethod', 'METHODS',
           'register', 'create_method']
