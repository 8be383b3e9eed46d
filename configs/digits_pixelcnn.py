"""PixelCNN++ (Salimans et al. 2017) at CPU size on the embedded 8x8 digits.

  python -m diffusion_jax.main --config=configs/digits_pixelcnn.py \
      --workdir=runs/digits_pixelcnn [--mode=sample|eval]

config.pixelcnn's defaults: two resolutions (8x8 -> 4x4) of one gated
ResNet block per stream (two in the down pass at 8x8), 32 filters, a
mixture of 5 discretised logistics per pixel, dropout 0.1. The loss is the
training batch's exact NLL in bits/dim; eval mode writes the 300 test
digits' bits/dim to eval/step_*/metrics.json.
The digits use 17 of the 256 levels, so a good model goes far below the 8
bits/dim of a uniform distribution. Sampling draws the 64 pixels one after
another: 64 network passes per batch of images.

Measured (352,847 parameters): 1,000 steps took 17.5 min (1.05 s/step) on
a 2-core CPU shared with other jobs (load ~15); the EMA model scored 3.52
+- 0.03 bits/dim on the 300 test digits (train loss with dropout: 3.25).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'pixelcnn'
  # config.pixelcnn: families.pixelcnn()'s defaults are this model.

  config.optim.learning_rate = 1e-3  # openai/pixel-cnn's
  config.optim.warmup_steps = 50
  # The loss is in bits/dim (~1e0); openai/pixel-cnn does not clip.
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
