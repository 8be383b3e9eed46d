"""Config sections of the seeds' other generative families (issue 16):
Glow, the VAE, the GAN and PixelCNN++, each read only by its own method
(config.method = 'glow' | 'vae' | 'gan' | 'pixelcnn').

Kept out of default.py so each family's settings sit together, with the
paper each default comes from; default.py attaches them (config.glow,
config.vae, config.gan, config.pixelcnn) before locking.
"""

import ml_collections


def glow() -> ml_collections.ConfigDict:
  """config.glow (methods/glow.py)."""
  return ml_collections.ConfigDict()


def vae() -> ml_collections.ConfigDict:
  """config.vae (methods/vae.py)."""
  return ml_collections.ConfigDict()


def gan() -> ml_collections.ConfigDict:
  """config.gan (methods/gan.py)."""
  return ml_collections.ConfigDict()


def pixelcnn() -> ml_collections.ConfigDict:
  """config.pixelcnn (methods/pixelcnn.py)."""
  return ml_collections.ConfigDict()
