"""Latent vs pixel diffusion on Fashion-MNIST at CPU size (issue 14, item 7).

Fashion-MNIST padded to 32x32 (config.data.resize='pad': centred on black,
its background), a KL-f4 autoencoder to 8x8x4 latents, and three class-
conditional diffusion models compared at equal CPU training time in
BENCHMARKS.md: DiT-S/2 on the latents (16 tokens), a small U-Net on the
latents, a small U-Net on the pixels. One file, four configs (the part
after ':' picks one):

  apt-get install dataset-fashion-mnist   # the IDX files, Debian's package
  C=configs/fashion_mnist_cpu.py
  python -m diffusion_jax.main --config=$C:autoencoder --workdir=runs/fmc_ae
  python -m diffusion_jax.cache_latents --config=$C:latent_unet
  python -m diffusion_jax.main --config=$C:latent_unet --workdir=runs/fmc_lu
  python -m diffusion_jax.main --config=$C:latent_dit --workdir=runs/fmc_ld
  python -m diffusion_jax.main --config=$C:pixel_unet --workdir=runs/fmc_pu

(add --mode=eval for each diffusion run's FD; the autoencoder's eval mode
writes its reconstruction PSNR). The latent configs read the autoencoder
from runs/fmc_ae and the cache from runs/fmc_latents (override
config.latent.autoencoder / config.data.data_dir to move them).

The autoencoder is LDM's KL-f4 recipe (L1 + learned log-scale, KL 1e-6,
hinge patch GAN from mid-run at weight 0.5, Adam (0.5, 0.9); Rombach et al.
2022, Table 8) at widths (32, 64, 128) with one ResNet block per level, so
it trains here in minutes; every diffusion model is an eps-predicting DDPM
(linear betas, T = 1000) sampled with 50 DDIM steps at guidance w = 1, all
three scored by the same Fashion-MNIST classifier on 32x32 images.
"""

from configs import default

_FASHION = '/usr/share/datasets/fashion-mnist'
_PARTS = ('autoencoder', 'latent_unet', 'latent_dit', 'pixel_unet')


def _data(config):
  data = config.data
  data.source = 'idx'
  data.data_dir = _FASHION
  data.image_size = 32
  data.channels = 1
  data.resize = 'pad'
  data.random_flip = False


def _autoencoder(config):
  config.method = 'autoencoder'
  ae = config.autoencoder
  ae.block_out_channels = (32, 64, 128)  # f = 4: 32x32 -> 8x8
  ae.latent_channels = 4
  ae.layers_per_block = 1
  ae.norm_num_groups = 16
  ae.kl_weight = 1e-6
  ae.rec_loss = 'l1'
  ae.disc_start = 1_000
  ae.disc_weight = 0.5
  ae.disc_loss = 'hinge'
  ae.disc_layers = 2  # a 6x6 logit map on 32x32
  ae.disc_ch = 32
  ae.disc_learning_rate = 2e-4
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 100
  config.optim.grad_clip_norm = 0.0  # LDM does not clip
  config.optim.ema_decay = 0.995
  config.batch_size = 32
  config.num_train_steps = 2_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.sample_grid.every_steps = 1_000
  config.sample_quality.every_steps = 0
  config.eval.batch_size = 200


def _diffusion(config, name):
  model = config.model
  model.num_classes = 10
  model.label_dropout = 0.1
  model.dropout = 0.0
  if name == 'latent_dit':
    model.name = 'dit'
    model.dit_variant = 'S'
    model.patch_size = 2  # 8x8 latents: 16 tokens
  elif name == 'latent_unet':
    model.ch = 64
    model.ch_mult = (1, 2)  # 8x8, 4x4
    model.num_res_blocks = 2
    model.attn_resolutions = (4,)
    model.num_groups = 16
    model.temb_dim = 256
  else:  # pixel_unet
    model.ch = 32
    model.ch_mult = (1, 2, 2)  # 32, 16, 8
    model.num_res_blocks = 2
    model.attn_resolutions = (8,)
    model.num_groups = 16
    model.temb_dim = 128
  if name != 'pixel_unet':
    config.latent.autoencoder = 'runs/fmc_ae'
    config.latent.images.source = 'idx'
    config.latent.images.data_dir = _FASHION
    config.latent.images.resize = 'pad'
    config.data.source = 'latents'
    config.data.data_dir = 'runs/fmc_latents'
    config.data.resize = ''
    config.diffusion.clip_denoised = False
  config.sample.sampler = 'ddim'
  config.sample.num_steps = 50
  config.sample.guidance_scale = 1.0
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.999
  config.optim.ema_warmup = True
  config.batch_size = 64
  # Set per model from its measured step time for equal CPU time (the
  # BENCHMARKS.md command lines override it).
  config.num_train_steps = 2_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.sample_grid.every_steps = 1_000
  config.sample_grid.num_images = 80  # eight rows of the ten classes
  config.sample_quality.every_steps = 0
  config.sample_quality.num_samples = 1_000
  config.sample.num_images = 1_000
  config.sample.batch_size = 200
  config.eval.batch_size = 200


def get_config(part: str = 'latent_unet'):
  if part not in _PARTS:
    raise ValueError(f'configs/fashion_mnist_cpu.py:{part}: use one of '
                     f'{", ".join(_PARTS)} after the colon')
  config = default.get_config()
  _data(config)
  if part == 'autoencoder':
    _autoencoder(config)
  else:
    _diffusion(config, part)
  return config
