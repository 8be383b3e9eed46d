"""DDPM on LSUN Bedroom 256x256: 2,400,000 steps (paper FID 6.36).

The 114M model of Table 3 (and Figure 18). The paper's FID 4.90 is its
larger ~256M variant trained for 1.15M steps: lsun_bedroom_large_ddpm.py.

LSUN images are not square; export them once as image files under
DATA_DIR/train/ (any layout below it) and pass
--config.data.data_dir=DATA_DIR. The image_folder source center-crops and
resizes them to 256x256 as the DDPM preprocessing does.
No random flips (the paper flips every data set but LSUN Bedroom).
"""

from configs import ddpm_256


def get_config():
  config = ddpm_256.get_config()
  config.data.source = 'image_folder'
  config.data.random_flip = False
  config.num_train_steps = 2_400_000
  return config
