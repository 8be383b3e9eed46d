"""Class-conditional DDPM at CPU size on the embedded digits (labels 0-9)
with classifier-free guidance, w = 1; grids cycle through the ten digits.

  ./run.sh train --config=configs/digits_cfg.py --workdir=runs/digits_cfg
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.num_classes = 10
  config.model.label_dropout = 0.1
  config.sample.guidance_scale = 1.0
  config.sample.sampler = 'ddim'
  config.sample.num_steps = 100
  # Eight rows of the ten digits (a multiple of 8 devices, too).
  config.sample_grid.num_images = 80
  return config
