"""Shared defaults for every experiment.

On their own they train the embedded scikit-learn digits (1,797 real 8x8
images, no download) with a small U-Net in a few minutes on a laptop CPU.
Experiment files (e.g. `cifar10_ddpm.py`) start from `get_config()` here and
state only what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Input pipeline (diffusion_jax/input_pipeline.py).
  config.data = data = ml_collections.ConfigDict()
  data.source = 'digits'  # digits | tfds | idx | image_folder | npz
  data.name = ''  # tfds data set name, e.g. 'cifar10' (source=tfds only).
  data.data_dir = ''  # local directory or file holding the data.
  data.download = False  # tfds only: allow downloading (never in tests).
  data.train_split = 'train'
  data.eval_split = 'test'
  data.image_size = 8  # images are checked to be image_size x image_size.
  data.channels = 1
  data.random_flip = False  # horizontal flips; never for digits.
  data.prefetch = 2  # batches prepared ahead on a background thread.

  # Diffusion process (diffusion_jax/schedules.py, losses.py, samplers.py).
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = 'linear'
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  # L_simple (Ho et al. 2020, eq. 14) predicting eps; 'x0_mse' and 'v_mse'
  # train the network to predict x0 or v instead (samplers convert).
  diffusion.loss = 'eps_mse'
  diffusion.sampler_variance = 'beta'  # sigma_t^2: 'beta' or 'beta_tilde'.
  diffusion.clip_denoised = True  # clip x0_hat to [-1, 1] while sampling.

  # Network (diffusion_jax/models/unet.py).
  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'
  model.ch = 32
  model.ch_mult = (1, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (4,)
  model.dropout = 0.1
  model.num_groups = 8
  model.temb_dim = 128  # 4 * ch, as in the paper.
  model.dtype = 'float32'  # compute dtype; params stay float32.
  # Class conditioning: 0 = unconditional; K > 0 embeds labels 0..K-1 (the
  # data source must provide labels) plus a null class K.
  model.num_classes = 0
  # Training replaces a label by the null class with this probability, so
  # one network is both conditional and unconditional (classifier-free
  # guidance, Ho & Salimans 2022: 0.1-0.2).
  model.label_dropout = 0.1

  # Optimisation (diffusion_jax/train_state.py).
  config.optim = optim = ml_collections.ConfigDict()
  # Larger than the paper's 2e-4: a small model and a 1,500-step budget.
  optim.learning_rate = 1e-3
  optim.warmup_steps = 100
  optim.grad_clip_norm = 1.0
  optim.adam_b1 = 0.9
  optim.adam_b2 = 0.999
  optim.adam_eps = 1e-8
  optim.ema_decay = 0.995  # ~200-step horizon for a short run.

  # Training loop (diffusion_jax/train.py).
  config.batch_size = 64  # global, over all devices and hosts.
  config.num_train_steps = 1500
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.sample_every_steps = 1500  # EMA sample grid (and at the end); 0: never.
  config.num_sample_images = 64

  # Sample mode (--mode=sample).
  config.sample = sample = ml_collections.ConfigDict()
  sample.num_images = 64
  sample.batch_size = 64  # global; split over all devices.
  # Sampler for --mode=sample and the grids during training:
  # 'ddpm' (ancestral; respaced when 0 < num_steps < T) or 'ddim'.
  sample.sampler = 'ddpm'
  sample.num_steps = 0  # 0: all T steps
  sample.ddim_eta = 0.0  # DDIM only: 0 deterministic, 1 ~ DDPM (beta~)
  # 0-based timesteps at which to save x0 predictions of the first batch as
  # progressive.png (DDPM sec. 4.3), e.g. (999, 750, 500, 250, 100, 0).
  sample.progressive_timesteps = ()
  sample.progressive_num_images = 8  # rows of that figure

  # Scale-out throughput knobs (diffusion_jax/train.py). Both leave the
  # trained params unchanged (up to float summation order; see
  # make_train_step for the dropout caveat of grad_accum_steps).
  # Train steps per compiled call (one lax.scan over a (k, B, ...) stack):
  # fewer host round trips on TPU. log/checkpoint/sample intervals and
  # num_train_steps must be multiples of it.
  config.steps_per_call = 1
  # Micro-batches per step when the per-device batch does not fit in memory:
  # gradients are averaged over them, then one optimizer update. The
  # per-device batch (batch_size / devices) must be a multiple of it.
  config.grad_accum_steps = 1

  # Sample quality: FID / Inception Score / KID (diffusion_jax/
  # sample_metrics.py) on EMA samples, in --mode=eval and during training.
  config.fid = fid = ml_collections.ConfigDict()
  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or an .npz of its
  # tensors). '' = a randomly initialised network: the code path runs, the
  # numbers are NOT comparable to published FIDs (logged loudly).
  fid.weights_path = ''
  fid.reference = 'train'  # 'train' | 'eval' split, or a mu/sigma .npz
  fid.num_samples = 0  # --mode=eval (the paper: 50,000); 0 skips FID
  fid.every_steps = 0  # during training; 0 = never
  fid.train_num_samples = 5_000  # per periodic FID during training
  fid.resize_to = 299  # Inception input size (the reference: 299)
  fid.cache_dir = ''  # reference statistics cache; '' = workdir/fid_stats

  # Locked: a misspelt key in an experiment file or on the command line is an
  # error, not a silently ignored new field.
  config.lock()
  return config
