"""EDM at CPU size on the embedded digits: preconditioning, log-normal
noise levels, the Heun sampler at 18 levels (35 network calls).

  ./run.sh train --config=configs/digits_edm.py --workdir=runs/digits_edm
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.process = 'edm'
  config.diffusion.prediction = 'edm'
  config.diffusion.time_sampling = 'log_normal'
  config.sample.sampler = 'edm'
  config.sample.num_steps = 18
  return config
