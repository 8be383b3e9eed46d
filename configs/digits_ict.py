"""Improved consistency training (iCT) at CPU size on the embedded digits:
one network call per sample, learnt from data alone (no teacher).

  ./run.sh train --config=configs/digits_ict.py --workdir=runs/digits_ict

What the paper did (Song & Dhariwal 2023, CIFAR-10): NCSN++, batch 1024,
400k iterations, Adam lr 1e-4, EMA 0.99993 for sampling, dropout 0.3, the
curriculum s0 = 10 -> s1 = 1280 levels, ln sigma ~ N(-1.1, 2.0^2) and the
pseudo-Huber metric with c = 0.00054 sqrt(d); FID 2.51 in one step and
2.24 in two (consistency distillation with LPIPS: 3.55 in one step, Song
et al. 2023).

Here: the default 8x8 U-Net, batch 64 and 3,000 steps, so the curriculum
doubles every 375 steps (N = 11 -> 1281, the last 375 steps at 1281).
The learning rate is 5x the paper's, as this package's DDPM default is 5x
DDPM's 2e-4 (a small model, a short run); the EMA decay 0.99 keeps the
paper's horizon as a fraction of the run (1 / (1 - 0.99993) = 14k of 400k
iterations, ~1/28; here 100 of 3,000), with the warm-up of
configs/default.py. Dropout 0.1 (the default; iCT's 0.3 is for CIFAR-10's
NCSN++). Two-step sampling: --config.consistency.sample_sigmas=
'(80.0, 0.821)' (iCT's CIFAR-10 level, not tuned for the digits).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'consistency_training'
  # The edm process: sigma in [0.002, 80] is the consistency function's time
  # (time_sampling and sampler only satisfy the diffusion checks; iCT draws
  # its own levels and samples with config.consistency.sample_sigmas).
  config.diffusion.process = 'edm'
  config.diffusion.prediction = 'edm'
  config.diffusion.time_sampling = 'log_normal'
  config.diffusion.edm_sigma_min = 0.002
  config.diffusion.edm_sigma_max = 80.0
  config.sample.sampler = 'edm'

  config.consistency.curriculum_s0 = 10
  config.consistency.curriculum_s1 = 1280
  config.consistency.p_mean = -1.1
  config.consistency.p_std = 2.0
  config.consistency.metric = 'pseudo_huber'
  config.consistency.huber_c = 0.0  # 0.00054 sqrt(64) = 0.00432
  config.consistency.sample_sigmas = ()  # one step from sigma_max

  config.optim.learning_rate = 5e-4
  config.optim.ema_decay = 0.99
  config.num_train_steps = 3000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.sample_grid.every_steps = 500
  config.sample_quality.every_steps = 500
  return config
