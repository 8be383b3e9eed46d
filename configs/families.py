"""Config sections each read only by its own method: the seeds' other
generative families (issue 16: config.glow, .vae, .gan, .pixelcnn for
config.method = 'glow' | 'vae' | 'gan' | 'pixelcnn'), consistency models
(config.consistency) and latent diffusion's autoencoder
(config.autoencoder).

Kept out of default.py so each method's settings sit together, with the
paper each default comes from; default.py attaches them before locking.
This module has no get_config: it is not an experiment.
"""

import ml_collections


def glow() -> ml_collections.ConfigDict:
  """config.glow (methods/glow.py; Kingma & Dhariwal 2018, openai/glow).

  The defaults fit the 8x8 digits on a CPU (configs/digits_glow.py): 8x8x1
  -> squeeze 4x4x4 -> K steps -> split (2 channels out) -> squeeze 2x2x8
  -> K steps -> top prior; 32 + 32 latent numbers. The paper's CIFAR-10
  model: configs/cifar10_glow.py.
  """
  glow = ml_collections.ConfigDict()
  # L: each level squeezes (2x2 space-to-depth), so data.image_size must be
  # divisible by 2^L; all but the last factor out half their channels.
  glow.levels = 2
  glow.steps_per_level = 8  # K flow steps per level (paper: 32 or 48)
  glow.hidden_channels = 64  # the coupling networks' width (paper: 512)
  # 'affine' (y_b = (x_b + t) sigmoid(h + 2), openai/glow) or 'additive'
  # (NICE: y_b = x_b + t, volume preserving).
  glow.coupling = 'affine'
  # Channel mixing before each coupling: 'invconv' (the paper's 1x1
  # convolution, W learned), 'invconv_lu' (W = P L (U + diag(s)), sec.
  # 3.2), or fixed 'reverse' (RealNVP) / 'shuffle'.
  glow.permutation = 'invconv'
  # A learned mean and scale per channel of the top prior (openai/glow's
  # --learntop); False: N(0, I).
  glow.learn_top = True
  # Samples are inverse(T eps), eps ~ N(0, I): 1 the model's distribution,
  # < 1 smoother samples (the paper shows T = 0.7).
  glow.temperature = 1.0
  # Bits per colour kept (Glow's CelebA-HQ: 5); bits/dim are then of the
  # n_bits-bit data.
  glow.n_bits = 8
  return glow


def vae() -> ml_collections.ConfigDict:
  """config.vae (methods/vae.py): Kingma & Welling 2014's VAE with a
  discretised decoder; eval reports Burda et al. 2016's importance-weighted
  bound in bits/dim. The sizes fit the 8x8 digits (configs/digits_vae.py)."""
  vae = ml_collections.ConfigDict()
  # Channels per resolution level of the encoder (the decoder mirrors it);
  # a stride-2 conv between levels, so f = 2^(len - 1) must divide
  # data.image_size.
  vae.widths = (32, 64)
  vae.blocks_per_level = 1  # residual blocks per level, each direction
  vae.norm_groups = 8  # GroupNorm groups (divide every width); 0: no norm
  # z's shape: (image_size/f, image_size/f, C) spatial, or (d,) a flat
  # vector (one Dense layer at the lowest resolution).
  vae.latent_shape = (4, 4, 4)
  # p(x|z) on the 8-bit bins: 'logistic' (IAF / PixelCNN++'s single
  # component) or 'gaussian' (DDPM's L_0 decoder, Ho et al. eq. 13).
  vae.decoder = 'logistic'
  # k of the importance-weighted bound in --mode=eval (>= 1; 1 = the ELBO;
  # the bound tightens as k grows, at k decoder passes per image).
  vae.eval_importance_samples = 64
  # KL annealing: the KL weight beta rises linearly 0 -> 1 over this many
  # steps (0: beta = 1 throughout). Only beta = 1 bounds the likelihood, so
  # the training loss during warm-up is not a bound; eval always uses 1.
  vae.kl_warmup_steps = 0
  return vae


def gan() -> ml_collections.ConfigDict:
  """config.gan (methods/gan.py, models/dcgan.py): DC-GAN (Radford et al.
  2016) with the non-saturating loss (Goodfellow et al. 2014), sized for the
  8x8 digits; configs/digits_gan.py trains it."""
  gan = ml_collections.ConfigDict()
  gan.z_dim = 64  # DC-GAN: 100
  # Generator: the projected map's width, then one per stride-2 transposed
  # conv; the last outputs data.channels. The side doubles len() times from
  # a base of data.image_size / 2^len: (128, 64) gives 2x2 for 8x8 digits,
  # 7x7 for 28x28, 8x8 for 32x32. DC-GAN's 64x64: (1024, 512, 256, 128).
  gan.generator_widths = (128, 64)
  # Discriminator: one stride-2 4x4 conv per width, then a dense logit.
  gan.discriminator_widths = (64, 128)
  # 'batch' (DC-GAN), 'group' or 'none' after each generator layer but the
  # output; 'none' or 'group' in the discriminator (never on its first
  # layer; no BatchNorm there: R1 needs per-image input gradients).
  gan.generator_norm = 'batch'
  gan.discriminator_norm = 'none'
  # Spectral normalisation of every discriminator layer (Miyato et al.
  # 2018): one power iteration per step.
  gan.spectral_norm = False
  # R1 (Mescheder et al. 2018): gamma/2 E||grad_x D(x)||^2 on real data;
  # 0 = off (DC-GAN); StyleGAN uses 10 (1024 px) down to ~0.1 (small).
  gan.r1_gamma = 0.0
  # Both Adams (DC-GAN sec. 4): constant learning rate 2e-4, betas (0.5,
  # 0.999); eps and gradient clipping are config.optim's.
  gan.adam_b1 = 0.5
  gan.adam_b2 = 0.999
  gan.gen_learning_rate = 2e-4
  gan.disc_learning_rate = 2e-4
  # EMA of the generator (Karras et al. 2018), what samples use; warm-up
  # from config.optim.ema_warmup.
  gan.ema_decay = 0.999
  # Stop the run (the last checkpoint kept) when a logging interval's means
  # say the discriminator has won: D(x) above, D(G(z)) below, and the
  # generator's loss above these.
  gan.diagnose = True
  gan.diagnose_d_real_above = 0.99
  gan.diagnose_d_fake_below = 0.01
  gan.diagnose_g_loss_above = 5.0
  return gan


def pixelcnn() -> ml_collections.ConfigDict:
  """config.pixelcnn (methods/pixelcnn.py, models/pixelcnn.py; Salimans et
  al. 2017, openai/pixel-cnn).

  The defaults fit the 8x8 digits on a CPU (configs/digits_pixelcnn.py):
  two resolutions (8 -> 4) of one block per stream, 32 filters, 5
  logistics. The paper's CIFAR-10 model: configs/cifar10_pixelcnn.py.
  """
  p = ml_collections.ConfigDict()
  # Gated ResNet blocks per resolution in each stream's up pass (the down
  # pass has one more at each resolution above the lowest). Paper: 5.
  p.nr_resnet = 1
  p.nr_filters = 32  # channels of both streams (u, ul). Paper: 160.
  # Logistic components per pixel (sec. 2.1); >= 1. Paper: 10.
  p.nr_logistic_mix = 5
  # Resolutions of the U-Net-like pass, halving between them; 2^(n-1) must
  # divide config.data.image_size. Paper: 3 (32, 16, 8).
  p.num_resolutions = 2
  p.dropout = 0.1  # inside every gated ResNet block (sec. 2.5). Paper: 0.5.
  # The learning rate (config.optim's schedule) is multiplied by
  # lr_decay^step; 1.0: no decay. openai/pixel-cnn: 0.999995.
  p.lr_decay = 1.0
  return p


def consistency() -> ml_collections.ConfigDict:
  """config.consistency (methods/consistency.py)."""
  # Consistency models (methods/consistency.py): 'consistency_training'
  # (iCT, Song & Dhariwal 2023) and 'consistency_distillation' (CD, Song et
  # al. 2023; its teacher: config.distill, a diffusion run of the edm
  # process). Both need diffusion.process='edm' (time_sampling='log_normal',
  # sample.sampler='edm'); noise levels lie on a Karras grid (EDM eq. 5)
  # from diffusion.edm_sigma_min to edm_sigma_max.
  consistency = ml_collections.ConfigDict()
  consistency.rho = 7.0
  # iCT: the grid has N(k) = min(s0 2^floor(k / K'), s1) + 1 levels at step
  # k, doubling every K' = floor(num_train_steps / (log2(s1 / s0) + 1))
  # (so raising num_train_steps to extend a run stretches the curriculum).
  consistency.curriculum_s0 = 10
  consistency.curriculum_s1 = 1280
  # iCT: the level pair is drawn from ln(sigma) ~ N(p_mean, p_std^2)
  # discretised on the grid.
  consistency.p_mean = -1.1
  consistency.p_std = 2.0
  # d(f, target): 'pseudo_huber', sqrt(||a - b||^2 + c^2) - c (iCT), or
  # 'l2', ||a - b||^2. CD's LPIPS is not available here.
  consistency.metric = 'pseudo_huber'
  consistency.huber_c = 0.0  # 0: iCT's 0.00054 sqrt(data dimension)
  # CD: the teacher's Heun steps between neighbours of this many levels;
  # the target network is an EMA of the student with decay target_ema; the
  # student starts as a copy of the teacher.
  consistency.num_levels = 18
  consistency.target_ema = 0.95
  consistency.init_from_teacher = True
  # Sampling (Song et al. 2023, Algorithm 1): f at each of these decreasing
  # noise levels, with fresh noise before each after the first. () = one
  # step from edm_sigma_max; (80.0, 0.821): iCT's two steps on CIFAR-10.
  consistency.sample_sigmas = ()
  return consistency


def autoencoder() -> ml_collections.ConfigDict:
  """config.autoencoder (methods/autoencoder.py)."""
  # Autoencoder (config.method='autoencoder'; methods/autoencoder.py): latent
  # diffusion's KL autoencoder (models/autoencoder.py, Rombach et al. 2022)
  # under LDM's loss: NLL (rec_loss with a learned log-scale) + kl_weight KL
  # + a patch-GAN term (Esser et al. 2021) from step disc_start, weighted
  # by disc_weight times the adaptive weight of their eq. 7. The sizes
  # below fit the 8x8 digits; LDM's f=4..16 models: configs/
  # fashion_mnist_autoencoder.py.
  ae = ml_collections.ConfigDict()
  # Widths per level (diffusers' naming; LDM: ch * ch_mult); the down
  # factor f = 2^(len - 1) must divide data.image_size. (128, 256, 512,
  # 512): Stable Diffusion's f=8 VAE.
  ae.block_out_channels = (32, 64)
  ae.latent_channels = 4  # C of the latents (B, H/f, W/f, C)
  ae.layers_per_block = 1  # ResNet blocks per encoder level (decoder +1)
  ae.norm_num_groups = 8  # GroupNorm groups; must divide every width
  ae.kl_weight = 1e-6  # LDM's KL-f4/f8 models
  ae.rec_loss = 'l1'  # 'l1' (LDM) or 'l2'
  # LDM's NLL = rec / exp(s) + s with one learned scalar s (a Laplace
  # decoder's log-scale for l1); False keeps s at logvar_init.
  ae.learn_logvar = True
  ae.logvar_init = 0.0
  # LPIPS (VGG16 features + linear heads) is not implemented yet: a non-
  # empty path is refused; empty skips the term (logged once).
  ae.lpips_weights_path = ''
  ae.perceptual_weight = 1.0
  # Patch discriminator (pix2pix's NLayerDiscriminator with GroupNorm): its
  # loss and the GAN term are off (factor 0) before step disc_start.
  ae.disc_start = 200
  ae.disc_weight = 0.5  # LDM's KL-f8 config
  ae.disc_loss = 'hinge'  # 'hinge' (LDM) or 'non_saturating'
  # Stride-2 4x4 convs (LDM: 3); the logit map floor(size / 2^n) - 2 must
  # be >= 1: 1 for 8x8 images.
  ae.disc_layers = 1
  ae.disc_ch = 64
  # Both Adams use LDM's betas (not config.optim's); the autoencoder's
  # learning rate, warm-up, clipping, eps and EMA are config.optim's.
  ae.disc_learning_rate = 1e-3
  ae.adam_b1 = 0.5
  ae.adam_b2 = 0.9
  return ae
