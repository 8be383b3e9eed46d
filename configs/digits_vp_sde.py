"""The VP SDE (Song et al. 2021, the continuous-time DDPM) at CPU size on
the embedded digits: eps target, t ~ U[1e-5, 1], sampled by the
predictor-corrector sampler (reverse-SDE Euler-Maruyama + one Langevin
step); --config.sample.sampler=heun integrates the probability-flow ODE.

  ./run.sh train --config=configs/digits_vp_sde.py --workdir=runs/digits_vp
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.process = 'vp'
  config.diffusion.prediction = 'eps'
  config.sample.sampler = 'pc'
  config.sample.num_steps = 500
  config.sample.snr = 0.16
  return config
