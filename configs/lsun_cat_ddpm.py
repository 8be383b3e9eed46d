"""DDPM on LSUN Cat 256x256: 1,800,000 steps (paper FID 19.75).

LSUN images are not square; export them once as image files under
DATA_DIR/train/ (any layout below it) and pass
--config.data.data_dir=DATA_DIR. The image_folder source center-crops and
resizes them to 256x256 as the DDPM preprocessing does.
"""

from configs import ddpm_256


def get_config():
  config = ddpm_256.get_config()
  config.data.source = 'image_folder'
  config.data.random_flip = True
  config.num_train_steps = 1_800_000
  return config
