"""DiT-XL/2 on ImageNet 256x256, in the latents of Stable Diffusion's VAE
(Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

The paper's recipe: 32x32x4 latents of sd-vae-ft-ema (f = 8, scaling
0.18215), DiT-XL/2 (28 blocks, hidden 1152, 16 heads, 2x2 patches: 256
tokens, 675M parameters), 1000 classes with label dropout 0.1, the ADM
diffusion (linear betas, T = 1000, eps prediction with learned sigma: the
improved-DDPM hybrid loss, t uniform), AdamW at a constant 1e-4 without
weight decay (= Adam) or warm-up, batch 256, EMA 0.9999, horizontal flips;
sampling: 250 DDPM steps with classifier-free guidance scale 1.5. Paper
FID-50K: 2.27 for DiT-XL/2-G (cfg 1.5) after 7M steps (Table 2); 19.47
without guidance after 400K (Table 4), the length set here (raise
num_train_steps to 7_000_000 for the headline figure).

  # 0. ImageNet as TFDS array_record files (the tars need a manual dir):
  tfds build imagenet2012 --manual_dir=/data/imagenet_tars \
      --data_dir=/data/tfds --file_format=array_record
  # and the VAE: a local copy of stabilityai/sd-vae-ft-ema (config.json and
  # diffusion_pytorch_model.safetensors) in /data/sd-vae-ft-ema.
  # 1. Encode every image once, centre-cropped to 256 (ADM's preprocessing,
  #    DiT's), and its mirror image: 1.28M x 2 x 32x32x4 mean and log-
  #    variance in float16, ~42 GB (DiT's extract_features.py, kept as
  #    posteriors so each epoch draws a fresh z):
  python -m diffusion_jax.cache_latents \
      --config=configs/imagenet256_dit_xl2.py \
      --config.latent.autoencoder=/data/sd-vae-ft-ema \
      --config.latent.images.data_dir=/data/tfds \
      --config.data.data_dir=/data/imagenet256_sd_latents
  # 2. Train (the same overrides):
  python -m diffusion_jax.main --config=configs/imagenet256_dit_xl2.py \
      --workdir=runs/dit_xl2 --config.latent.autoencoder=... ...
  # 3. FID-50K against ADM's reference batch (its mu and sigma), with
  #    pytorch-fid's Inception weights:
  python -m diffusion_jax.main ... --mode=eval \
      --config.sample_quality.num_samples=50000 \
      --config.sample_quality.reference=VIRTUAL_imagenet256_labeled.npz \
      --config.sample_quality.weights_path=pt_inception-2015-12-05-6726825d.pth

Our guidance weight is w in (1 + w) f(x, y) - w f(x, null): DiT's scale
1.5 is w = 0.5. DiT's sample.py guides only the first three of the four
latent channels (a leftover it documents); here all four are guided. The
decoder that turns samples into images is the VAE's own, kept in the run's
state (methods/latent_diffusion.py).
"""

from configs import default


def get_config():
  config = default.get_config()
  latent = config.latent
  latent.autoencoder = 'sd-vae-ft-ema'  # a local diffusers AutoencoderKL
  latent.scale_factor = 0.0  # its scaling_factor, 0.18215
  latent.sample_posterior = True  # DiT: latent_dist.sample() per batch
  latent.cache_dtype = 'float16'
  images = latent.images
  images.source = 'tfds'
  images.name = 'imagenet2012'
  images.data_dir = 'tensorflow_datasets'
  images.resize = 'center_crop'

  data = config.data
  data.source = 'latents'
  data.data_dir = 'imagenet256_sd_latents'
  data.train_split = 'train'
  data.eval_split = 'validation'
  data.image_size = 256
  data.channels = 3
  data.random_flip = True

  d = config.diffusion
  d.process = 'ddpm'
  d.num_timesteps = 1000
  d.beta_schedule = 'linear'
  d.beta_start, d.beta_end = 1e-4, 0.02
  d.prediction = 'eps'
  d.loss = 'hybrid'  # learned sigma: L_simple + L_vlb (Nichol & Dhariwal)
  d.sampler_variance = 'learned'
  d.time_sampling = 'uniform'
  d.clip_denoised = False  # latents

  model = config.model
  model.name = 'dit'
  model.dit_variant = 'XL'
  model.patch_size = 2
  model.num_classes = 1000
  model.label_dropout = 0.1
  model.dtype = 'float32'

  optim = config.optim
  optim.learning_rate = 1e-4
  optim.warmup_steps = 0
  optim.grad_clip_norm = 0.0
  optim.adam_b1, optim.adam_b2, optim.adam_eps = 0.9, 0.999, 1e-8
  optim.ema_decay = 0.9999
  optim.ema_warmup = False

  config.batch_size = 256
  config.num_train_steps = 400_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 10_000
  config.keep_checkpoints = 3

  sample = config.sample
  sample.sampler = 'ddpm'
  sample.num_steps = 250  # respaced
  sample.guidance_scale = 0.5  # DiT's cfg scale 1.5
  sample.class_label = -1
  sample.batch_size = 256
  sample.num_images = 50_000
  config.sample_grid.every_steps = 10_000
  config.sample_grid.num_images = 64
  config.eval.batch_size = 256  # also the encoding batch

  quality = config.sample_quality
  quality.network = 'inception'
  quality.every_steps = 0
  quality.num_samples = 0  # step 3 above
  return config
