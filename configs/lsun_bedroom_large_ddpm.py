"""DDPM's larger LSUN Bedroom 256x256 model: 1,150,000 steps (paper FID 4.90).

Ho et al. 2020, appendix B: "We also trained a larger variant of the LSUN
Bedroom model with approximately 256 million parameters by increasing filter
count", trained for 1.15M steps; Table 3 and Figure 17 give it FID 4.90
(the standard 114M model of lsun_bedroom_ddpm.py: 6.36 after 2.4M steps).

The paper does not state the filter count, and the released code
(github.com/hojonathanho/diffusion, scripts/run_lsun.py) defines only the
114M model ('unet2d16b2c112244': ch 128, ch_mult (1, 1, 2, 2, 4, 4)). This
config widens that model by 1.5x: ch 192 and, as the released
diffusion_tf/models/unet.py sizes it, a 4 * ch = 768 time embedding. That
gives 255,677,955 parameters, the paper's "approximately 256 million";
everything else (data, no flips, Adam 2e-5, batch 64, dropout 0) is the
standard Bedroom model's.
"""

from configs import lsun_bedroom_ddpm


def get_config():
  config = lsun_bedroom_ddpm.get_config()
  config.model.ch = 192
  config.model.temb_dim = 4 * 192
  config.num_train_steps = 1_150_000
  return config
