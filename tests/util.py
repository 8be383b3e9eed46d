"""Shared test helpers: a tiny config that trains in seconds."""

from configs import default


def tiny_config(**overrides):
  config = default.get_config()
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 4
  config.model.temb_dim = 32
  config.diffusion.num_timesteps = 20
  config.batch_size = 16
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.sample_grid.every_steps = 0
  config.sample_grid.num_images = 8
  config.sample.num_images = 12
  config.sample.batch_size = 8
  config.eval.batch_size = 8
  config.optim.warmup_steps = 2
  config.data.prefetch = 0
  config.update_from_flattened_dict(overrides)  # dotted keys, type-checked
  return config
