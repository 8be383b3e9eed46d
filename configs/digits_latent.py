"""Latent diffusion at CPU size: the 8x8 digits through a tiny f=2
autoencoder (Rombach et al. 2022), a U-Net on the 4x4x2 latents.

  # 1. The KL autoencoder (8x8x1 -> 4x4x2), a run of this project:
  python -m diffusion_jax.main --config=configs/digits_autoencoder.py \
      --workdir=runs/digits_ae
  # 2. Encode the 1,797 digits once into runs/digits_latents (a rerun is
  #    a no-op):
  python -m diffusion_jax.cache_latents --config=configs/digits_latent.py
  # 3. Diffusion on the latents; grids, samples and FD are decoded digits:
  python -m diffusion_jax.main --config=configs/digits_latent.py \
      --workdir=runs/digits_latent [--mode=sample|eval]

The scale factor is 1/std of the cached latents (config.latent.scale_factor
0: LDM's rescaling for KL autoencoders, measured when caching). The U-Net
keeps the digits config's width on a quarter of the positions: two levels
(4x4, 2x2), attention at 4x4. Latents are not clipped while sampling.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.latent.autoencoder = 'runs/digits_ae'  # configs/digits_autoencoder.py
  config.latent.images.source = 'digits'
  config.data.source = 'latents'
  config.data.data_dir = 'runs/digits_latents'
  config.diffusion.clip_denoised = False
  config.model.attn_resolutions = (4,)
  config.num_train_steps = 1000
  config.checkpoint_every_steps = 500
  config.sample_grid.every_steps = 500
  config.sample_quality.every_steps = 500
  return config
