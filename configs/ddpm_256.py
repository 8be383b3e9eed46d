"""Shared settings of the DDPM 256x256 models (Ho et al. 2020, appendix B).

113,673,219 parameters: ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks,
attention at 16x16, no dropout; Adam 2e-5, batch 64. The experiment files
(celebahq_ddpm.py, lsun_*_ddpm.py) add the data set and step count. The
paper trained them at 2.2 steps/s on a TPU v3-8.
"""

from configs import cifar10_ddpm


def get_config():
  config = cifar10_ddpm.get_config()  # the same diffusion, optimizer, EMA
  config.data.image_size = 256
  config.data.channels = 3
  config.data.random_flip = True
  config.model.ch = 128
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0
  config.optim.learning_rate = 2e-5
  config.batch_size = 64
  config.checkpoint_every_steps = 10_000
  config.sample_grid.every_steps = 50_000
  config.sample_grid.num_images = 16
  config.sample.num_images = 128
  config.sample.batch_size = 64
  config.eval.batch_size = 64
  return config
