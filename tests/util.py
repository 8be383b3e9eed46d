"""Shared test helpers: a tiny config that trains in seconds."""

from configs import default


def tiny_config(**overrides):
  config = default.get_config()
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 4
  config.model.temb_dim = 32
  config.diffusion.num_timesteps = 20
  config.batch_size = 16
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.sample_grid.every_steps = 0
  config.sample_grid.num_images = 8
  config.sample.num_images = 12
  config.sample.batch_size = 8
  config.sample.sampler = 'ddpm'  # all T = 20 ancestral steps
  config.sample.num_steps = 0
  config.eval.batch_size = 8
  config.sample_quality.every_steps = 0
  config.optim.warmup_steps = 2
  config.data.prefetch = 0
  config.update_from_flattened_dict(overrides)  # dotted keys, type-checked
  return config


def run_train(config, workdir, mesh=None):
  """The CLI's --mode=train: build the objects once, run the loop."""
  from diffusion_jax import experiment, trainer  # pylint: disable=g-import-not-at-top
  return trainer.train_and_evaluate(experiment.build(config, mesh), workdir)


def run_sample(config, workdir, mesh=None, step=None):
  """The CLI's --mode=sample; returns the output directory."""
  from diffusion_jax import experiment, generate  # pylint: disable=g-import-not-at-top
  return generate.generate(experiment.build(config, mesh, mode='sample'),
                           workdir, step)


def run_eval(config, workdir, mesh=None, step=None):
  """The CLI's --mode=eval; returns the metrics."""
  from diffusion_jax import evaluate, experiment  # pylint: disable=g-import-not-at-top
  return evaluate.evaluate(experiment.build(config, mesh, mode='eval'),
                           workdir, step)
