"""Rectified flow on CIFAR-10: x_t = (1 - t) x + t eps, the network predicts
the velocity eps - x, t logit-normal (Esser et al. 2024), 50 Euler steps.

The DDPM paper's 35.7M U-Net and optimiser, so the objective is the only
change against configs/cifar10_ddpm.py. --config.sample.sampler=heun uses
Heun's second-order steps (two network calls each).

  python -m diffusion_jax.main --config=configs/cifar10_rectified_flow.py \
      --workdir=runs/cifar10_rf --config.data.data_dir=/path/to/tfds
"""

from configs import cifar10_ddpm


def get_config():
  config = cifar10_ddpm.get_config()
  config.diffusion.process = 'rectified_flow'
  config.diffusion.prediction = 'velocity'
  config.diffusion.time_sampling = 'logit_normal'
  config.diffusion.logit_normal_mean = 0.0
  config.diffusion.logit_normal_std = 1.0
  config.sample.sampler = 'euler'
  config.sample.num_steps = 50
  return config
