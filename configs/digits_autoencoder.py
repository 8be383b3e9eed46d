"""Latent diffusion's KL autoencoder at CPU size on the embedded 8x8 digits.

  python -m diffusion_jax.main --config=configs/digits_autoencoder.py \
      --workdir=runs/digits_ae [--mode=eval]

Eval writes the reconstruction MSE and PSNR of the 300 test digits to
eval/step_*/metrics.json and originals | reconstructions beside them in
reconstructions.png; the sample grids decode z ~ N(0, I), which at
kl_weight 1e-6 is far from where the encoder puts the digits (latent
diffusion would sample z): expect blobs there, not digits.

f = 2, C = 2: 4x4x2 = 32 latent numbers per 64-pixel digit (LDM's f = 4,
C = 3 keeps 1/16 of an RGB image's numbers; the digits are too small for
f = 4 to leave room). LDM's loss and optimizer (L1, learned log-scale,
KL 1e-6, hinge patch GAN with the adaptive weight at 0.5, Adam (0.5, 0.9),
no gradient clipping), its discriminator one stride-2 layer deep (the most
an 8x8 image allows) and switched on at half of the run.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'autoencoder'
  ae = config.autoencoder
  ae.block_out_channels = (32, 64)  # f = 2
  ae.latent_channels = 2
  ae.layers_per_block = 1
  ae.norm_num_groups = 8
  ae.kl_weight = 1e-6
  ae.rec_loss = 'l1'
  ae.disc_start = 200
  ae.disc_weight = 0.5
  ae.disc_loss = 'hinge'
  ae.disc_layers = 1
  ae.disc_ch = 32
  ae.disc_learning_rate = 5e-4

  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 50
  config.optim.grad_clip_norm = 0.0  # LDM does not clip
  config.optim.ema_decay = 0.99

  config.batch_size = 64
  config.num_train_steps = 400
  config.log_every_steps = 100
  config.checkpoint_every_steps = 200
  config.sample_grid.every_steps = 200
  config.sample_grid.num_images = 64
  # FD of decoded prior samples against the test digits, at the end only.
  config.sample_quality.every_steps = 400
  config.sample.num_images = 256
  config.sample.batch_size = 128
  return config
