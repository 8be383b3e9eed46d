"""A class-conditional progressive-distillation teacher on the digits, for
a guidance-conditioned student (Meng et al. 2023): digits_distill.py (VP,
v target, DDIM over 64 levels) with the ten labels, 10% of them dropped to
the null class so the teacher also samples with classifier-free guidance.

Teacher, then stages that halve its 64 steps; each student takes the
guidance weight w as an input (drawn per example from [distill.guidance_min,
guidance_max] = [0, 4]): the first stage learns the teacher's guided steps,
later stages their guided teacher's:

  ./run.sh train --config=configs/digits_distill_guided.py \
      --workdir=runs/gpd_64
  for n in 32 16 8 4; do
    .venv/bin/python -m diffusion_jax.main \
        --config=configs/digits_distill_guided.py --workdir=runs/gpd_$n \
        --config.method=progressive_distillation \
        --config.model.guidance_input=True \
        --config.distill.teacher_workdir=runs/gpd_$((2 * n)) \
        --config.distill.student_steps=$n --config.num_train_steps=300 \
        --config.optim.learning_rate=2e-4 --config.optim.warmup_steps=0
  done

A student samples at config.sample.guidance_scale (here w = 1) in n
network calls; its teacher at the same w in 64 steps of two (conditional
and unconditional) evaluations each.
"""

from configs import digits_distill


def get_config():
  config = digits_distill.get_config()
  config.model.num_classes = 10
  config.model.label_dropout = 0.1
  config.sample.guidance_scale = 1.0
  # Eight rows of the ten digits (a multiple of 8 devices, too).
  config.sample_grid.num_images = 80
  return config
