"""The diffusion processes by name (config.diffusion.process).

'ddpm' is the discrete process of schedules.py (T integer timesteps, the
network sees the index); 'vp', 've' and 'rectified_flow' are the continuous
paths of sde.py (t in [0, 1], the network sees 999 t); 'edm' is EDM's
x0 + sigma eps with t = sigma (edm.py; the network sees ln(sigma) / 4). All are Gaussian paths
x_t = alpha_t x0 + sigma_t eps with `alpha_sigma(t)`, so losses, the
denoiser and the samplers take any of them (denoiser.py).
"""

from diffusion_jax.diffusion import edm, schedules, sde

# name -> diffusion config -> process.
PROCESSES = {
    'ddpm': schedules.schedule_from_config,
    **{name: sde.process_from_config for name in sde.PROCESSES},
    'edm': edm.process_from_config,
}


def create_process(diffusion_config):
  """The process named by config.diffusion.process, checked."""
  name = diffusion_config.process
  if name not in PROCESSES:
    raise ValueError(f'unknown diffusion process {name!r}: set '
                     f'config.diffusion.process to one of {tuple(PROCESSES)}')
  return PROCESSES[name](diffusion_config)
