"""DC-GAN at CPU size on the embedded 8x8 digits.

  python -m diffusion_jax.main --config=configs/digits_gan.py \
      --workdir=runs/digits_gan [--mode=sample|eval]

The generator projects z (32 numbers) to a 2x2x64 map and doubles it twice
(64 -> 32 -> 1 channels, BatchNorm, tanh); the discriminator halves the
image twice (32, 64 channels, LeakyReLU 0.2, spectral norm) to one logit.
DC-GAN's Adam (2e-4, betas 0.5 / 0.999, no clipping) for both; samples
from an EMA of the generator. Eval scores 600 EMA samples in the digits classifier's features
(FD, KID, IS) against the 300 test digits and writes interpolation.png
(8 rows of spherical interpolations between two z, 10 steps each).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'gan'
  gan = config.gan
  gan.z_dim = 32
  gan.generator_widths = (64, 32)  # base 2x2 -> 4x4 -> 8x8
  gan.discriminator_widths = (32, 64)  # 8x8 -> 4x4 -> 2x2 -> logit
  gan.generator_norm = 'batch'
  gan.discriminator_norm = 'none'
  # Spectral norm in D: classifier FD 95 at step 2000 (96 samples; real
  # digits 63 +- 5) against 404 without it, where the generator collapsed
  # to a few modes (R1 with gamma 1 instead: 134).
  gan.spectral_norm = True
  gan.gen_learning_rate = 2e-4
  gan.disc_learning_rate = 2e-4
  gan.ema_decay = 0.999

  config.optim.grad_clip_norm = 0.0  # DC-GAN does not clip
  config.optim.ema_warmup = True

  config.batch_size = 64
  config.num_train_steps = 2000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.sample_grid.every_steps = 500
  config.sample_grid.num_images = 64
  # FD of EMA samples against the test digits, at the end only.
  config.sample_quality.every_steps = 2000
  config.sample_quality.num_samples = 600  # --mode=eval
  config.sample.num_images = 600
  config.sample.batch_size = 200
  return config
