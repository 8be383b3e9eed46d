"""Rectified flow at CPU size on the embedded digits: velocity target,
logit-normal t, 50 Euler steps.

  ./run.sh train --config=configs/digits_rectified_flow.py --workdir=runs/digits_rf
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.process = 'rectified_flow'
  config.diffusion.prediction = 'velocity'
  config.diffusion.time_sampling = 'logit_normal'
  config.sample.sampler = 'euler'
  config.sample.num_steps = 50
  return config
