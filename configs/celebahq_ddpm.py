"""DDPM on CelebA-HQ 256x256: 0.5M steps (paper: samples shown, no FID).

TFDS 'celeb_a_hq/256' needs its manual download; prepare it with
`tfds build celeb_a_hq/256 --manual_dir=... --data_dir=DIR --file_format=array_record`
and pass --config.data.data_dir=DIR.
"""

from configs import ddpm_256


def get_config():
  config = ddpm_256.get_config()
  config.data.source = 'tfds'
  config.data.name = 'celeb_a_hq/256'
  config.num_train_steps = 500_000
  return config
