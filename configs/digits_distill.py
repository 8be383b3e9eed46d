"""A progressive-distillation teacher at CPU size on the embedded digits: the
VP process with the v target (Salimans & Ho 2022, sec. 4: students predict
v; eps fails at few steps), else the main job's settings.

Teacher, then stages that halve its 64 DDIM steps (each stage's teacher is
the previous stage's run):

  ./run.sh train --config=configs/digits_distill.py --workdir=runs/pd_64
  for n in 32 16 8 4; do
    .venv/bin/python -m diffusion_jax.main --config=configs/digits_distill.py \
        --workdir=runs/pd_$n --config.method=progressive_distillation \
        --config.distill.teacher_workdir=runs/pd_$((2 * n)) \
        --config.distill.student_steps=$n --config.num_train_steps=300 \
        --config.optim.learning_rate=2e-4 --config.optim.warmup_steps=0
  done

(The first stage's teacher_workdir is runs/pd_64, the teacher itself.) The
teacher samples here with DPM-Solver++(1), i.e. DDIM, over 64 levels.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.process = 'vp'
  config.diffusion.prediction = 'v'
  config.sample.sampler = 'dpm_solver_pp'
  config.sample.solver_order = 1  # DDIM
  config.sample.spacing = 'time'
  config.sample.num_steps = 64
  return config
