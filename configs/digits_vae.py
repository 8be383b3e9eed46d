"""The classic VAE (Kingma & Welling 2014) at CPU size on the 8x8 digits.

  python -m diffusion_jax.main --config=configs/digits_vae.py \
      --workdir=runs/digits_vae [--mode=eval]

Eval writes to eval/step_*/metrics.json the 300 test digits' importance-
weighted bound on -log2 p(x) per dimension (total_bpd, k = 64, Burda et
al. 2016), the ELBO of the same draws (elbo_bpd = recon_bpd + kl_bpd) --
both comparable with DDPM's total_bpd on the same data (configs/
default.py) -- and the MSE / PSNR of the posterior-mean reconstructions.
The sample grids show the mean of p(x|z) for z ~ N(0, I).

Measured (one run, 2,000 steps: 6.6 min wall, 2.2 min of CPU on a shared
2-core machine): total_bpd 3.46 +- 0.03 (k = 64), elbo_bpd 3.55 = recon
3.15 + kl 0.40, PSNR 21.0 dB; classifier FD of 96 end-of-run samples
112.8 (real-image floor 63.0).

Two levels (f = 2), a 4x4x4 latent (64 numbers per 64-pixel digit) and a
discretised logistic decoder; Adam at 1e-3, no KL warm-up (the bound is
valid throughout).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = 'vae'
  vae = config.vae
  vae.widths = (32, 64)  # f = 2
  vae.blocks_per_level = 1
  vae.norm_groups = 8
  vae.latent_shape = (4, 4, 4)
  vae.decoder = 'logistic'
  vae.eval_importance_samples = 64
  vae.kl_warmup_steps = 0

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 50
  config.optim.grad_clip_norm = 1.0
  config.optim.ema_decay = 0.99

  config.batch_size = 64
  config.num_train_steps = 2000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.sample_grid.every_steps = 1000
  config.sample_grid.num_images = 64
  # FD of the samples against the test digits, at the end only.
  config.sample_quality.every_steps = 2000
  config.sample.num_images = 256
  config.sample.batch_size = 128
  return config
