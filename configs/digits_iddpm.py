"""Improved DDPM at CPU size on the embedded digits: cosine schedule,
learned-range variances with L_hybrid, sampled with 100 respaced steps.

  ./run.sh train --config=configs/digits_iddpm.py --workdir=runs/digits_iddpm
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.beta_schedule = 'cosine'
  config.diffusion.loss = 'hybrid'
  config.diffusion.sampler_variance = 'learned'
  config.sample.num_steps = 100  # learned variances make few steps work
  return config
