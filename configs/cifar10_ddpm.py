"""DDPM on CIFAR-10 (Ho et al. 2020): the paper's 35.7M U-Net and schedule.

Paper results (Table 1, L_simple): FID 3.17, IS 9.46, NLL <= 3.75 bits/dim
(test), 3.72 (train) (3.70 / 3.69 is the model trained on the true bound L,
FID 13.51);
800k steps at batch 128 took 10.6 h on a TPU v3-8 (21 steps/s).

  python -m diffusion_jax.main --config=configs/cifar10_ddpm.py \
      --workdir=runs/cifar10 --config.data.data_dir=/path/to/tensorflow_datasets
"""

from configs import default


def get_config():
  config = default.get_config()

  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True

  # Linear betas 1e-4..0.02 over T = 1000 (the defaults), L_simple,
  # sigma_t^2 = beta_t ('fixedlarge', used for the CIFAR-10 samples).
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_schedule = 'linear'
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.prediction = 'eps'  # L_simple, eq. 14
  config.diffusion.loss = 'mse'
  config.diffusion.sampler_variance = 'beta'

  # 35,746,307 parameters.
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.num_groups = 32
  config.model.temb_dim = 512

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip_norm = 1.0
  config.optim.ema_decay = 0.9999
  config.optim.ema_warmup = False  # the paper's EMA: a constant decay

  config.batch_size = 128
  config.num_train_steps = 800_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 10_000
  config.keep_checkpoints = 3
  config.sample_grid.every_steps = 50_000
  config.sample_grid.num_images = 64
  # FID 3.17 / IS 9.46 in the paper: 50k samples against the training set.
  config.sample_quality.num_samples = 50_000
  config.sample_quality.reference = 'train'
  config.sample_quality.network = 'inception'  # the paper's FID
  config.sample_quality.every_steps = 0  # 50k-sample FIDs: --mode=eval
  config.sample_quality.train_num_samples = 5_000
  # XLA:CPU: YNNPACK's convolutions train this U-Net 1.4-1.8x faster.
  config.cpu.train_ynn_conv = True
  # The paper's sampler: 1,000 ancestral steps, sigma_t^2 = beta_t.
  config.sample.sampler = 'ddpm'
  config.sample.num_steps = 0
  config.sample.num_images = 256
  config.sample.batch_size = 256
  config.eval.batch_size = 256  # bits/dim and the 50k FID samples
  return config
