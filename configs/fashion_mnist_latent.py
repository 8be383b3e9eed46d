"""Latent diffusion on Fashion-MNIST padded to 32x32, through a KL-f4
autoencoder: 8x8x4 latents (Rombach et al. 2022's LDM-4 layout).

  apt-get install dataset-fashion-mnist   # the IDX files, Debian's package
  # 1. The f=4 autoencoder, trained on the 28x28 images (a fully
  #    convolutional network: it encodes the padded 32x32 ones as well):
  python -m diffusion_jax.main --config=configs/fashion_mnist_autoencoder.py \
      --workdir=runs/fashion_ae
  # 2. Pad the 70,000 images to 32x32 and encode them once:
  python -m diffusion_jax.cache_latents --config=configs/fashion_mnist_latent.py
  # 3. Class-conditional diffusion on the latents, decoded for grids,
  #    samples and FD (the classifier is trained on the padded images):
  python -m diffusion_jax.main --config=configs/fashion_mnist_latent.py \
      --workdir=runs/fashion_latent [--mode=sample|eval]

32, not 28: 28 / 4 = 7 latent positions cannot be halved by a U-Net or cut
into DiT patches; the cache pads with zeros (black, the background) to the
centre (config.latent.images.resize='pad'), and the decoder then returns
32x32 images. For a DiT instead: --config.model.name=dit
--config.model.dit_variant=S --config.model.patch_size=2 (16 tokens).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.latent.autoencoder = 'runs/fashion_ae'
  images = config.latent.images
  images.source = 'idx'
  images.data_dir = '/usr/share/datasets/fashion-mnist'
  images.resize = 'pad'
  data = config.data
  data.source = 'latents'
  data.data_dir = 'runs/fashion_latents'
  data.image_size = 32
  data.channels = 1
  data.random_flip = True  # caches the mirror images too (as LDM trains)
  config.diffusion.clip_denoised = False

  model = config.model
  model.ch = 128
  model.ch_mult = (1, 2)  # 8x8, 4x4
  model.num_res_blocks = 2
  model.attn_resolutions = (8, 4)
  model.num_groups = 32
  model.temb_dim = 512
  model.dropout = 0.1
  model.num_classes = 10
  model.label_dropout = 0.1
  config.sample.guidance_scale = 1.0
  config.sample.sampler = 'ddim'
  config.sample.num_steps = 100

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1000
  config.optim.ema_decay = 0.9999
  config.optim.ema_warmup = True
  config.batch_size = 128
  config.num_train_steps = 100_000
  config.log_every_steps = 500
  config.checkpoint_every_steps = 5000
  config.sample_grid.every_steps = 5000
  config.sample_grid.num_images = 80  # eight rows of the ten classes
  config.sample_quality.every_steps = 10_000
  config.sample_quality.train_num_samples = 960
  config.eval.batch_size = 256
  config.sample.batch_size = 500
  config.sample.num_images = 10_000
  return config
