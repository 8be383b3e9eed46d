"""A KL-f4 autoencoder (latent diffusion) on Fashion-MNIST, 28x28 -> 7x7x4.

  apt-get install dataset-fashion-mnist   # the IDX files, Debian's package
  python -m diffusion_jax.main --config=configs/fashion_mnist_autoencoder.py \
      --workdir=runs/fashion_ae [--mode=eval]

28x28, not 32x32: the input pipeline resizes only image folders (data/
sources.py), and 28 is a multiple of f = 4, so the IDX files are read as
they are. LDM's KL-f4 recipe (Rombach et al. 2022, Table 8: f = 4, C = 3,
ch_mult (1, 2, 4), two ResNet blocks per level; L1 + learned log-scale,
KL 1e-6, hinge patch GAN from mid-run at weight 0.5, Adam (0.5, 0.9)) at
a width for one accelerator, C = 4 latent channels, and a discriminator of
two stride-2 layers (a 5x5 logit map; LDM's three would leave 1x1 on 28
pixels, one logit for the whole image). Its ~1.5M images seen are ~25
epochs of the 60,000 training images.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'autoencoder'
  data = config.data
  data.source = 'idx'
  data.data_dir = '/usr/share/datasets/fashion-mnist'
  data.image_size = 28
  data.channels = 1
  data.random_flip = False

  ae = config.autoencoder
  ae.block_out_channels = (64, 128, 256)  # f = 4
  ae.latent_channels = 4
  ae.layers_per_block = 2
  ae.norm_num_groups = 32
  ae.kl_weight = 1e-6
  ae.rec_loss = 'l1'
  ae.disc_start = 12_000
  ae.disc_weight = 0.5
  ae.disc_loss = 'hinge'
  ae.disc_layers = 2
  ae.disc_ch = 64
  ae.disc_learning_rate = 1e-4

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 500
  config.optim.grad_clip_norm = 0.0  # LDM does not clip
  config.optim.ema_decay = 0.999

  config.batch_size = 64
  config.num_train_steps = 24_000
  config.log_every_steps = 500
  config.checkpoint_every_steps = 2_000
  config.sample_grid.every_steps = 2_000
  config.sample_grid.num_images = 64
  config.sample_quality.every_steps = 6_000
  config.sample_quality.train_num_samples = 960
  config.eval.batch_size = 256
  return config
