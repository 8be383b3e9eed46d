"""Glow (Kingma & Dhariwal 2018) at CPU size on the embedded 8x8 digits.

  python -m diffusion_jax.main --config=configs/digits_glow.py \
      --workdir=runs/digits_glow [--mode=sample|eval]

L = 2 levels of K = 8 steps (affine coupling, learned 1x1 convolutions,
64 hidden channels, learned top prior: config.glow's defaults): 8x8x1 ->
squeeze 4x4x4 -> 8 steps -> 2 channels factored out -> squeeze 2x2x8 -> 8
steps -> top prior. The loss is the training batch's bits/dim; eval mode
writes the 300 test digits' bits/dim (one dequantisation draw) to
eval/step_*/metrics.json. The digits use 17 of the 256 levels, so a good
model goes far below the 8 bits/dim of a uniform density.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'glow'
  # config.glow: families.glow()'s defaults are this model.

  config.optim.learning_rate = 1e-3  # openai/glow's
  config.optim.warmup_steps = 50
  # Glow's objective is in bits/dim (~1e0); clipping at the default 1.0
  # would mostly rescale early gradients. openai/glow does not clip.
  config.optim.grad_clip_norm = 0.0
  config.optim.ema_decay = 0.99

  config.batch_size = 64
  config.num_train_steps = 1000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.sample_grid.every_steps = 500
  config.sample_grid.num_images = 64
  config.sample_quality.every_steps = 1000
  config.sample.num_images = 256
  config.sample.batch_size = 128
  return config
