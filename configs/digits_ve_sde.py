"""The VE SDE (NCSN as an SDE, Song et al. 2021) at CPU size on the embedded
digits: sigma from 0.01 to 10 (the largest distance between two training
digits is 9.6: Song & Ermon 2020's rule for sigma_max), eps target,
predictor-corrector sampling.

  ./run.sh train --config=configs/digits_ve_sde.py --workdir=runs/digits_ve
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.process = 've'
  config.diffusion.ve_sigma_min = 0.01
  config.diffusion.ve_sigma_max = 10.0
  config.diffusion.prediction = 'eps'
  config.sample.sampler = 'pc'
  config.sample.num_steps = 500
  config.sample.snr = 0.16
  return config
