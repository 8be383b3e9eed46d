"""Set-up shared by the benchmark scripts."""

import jax

from diffusion_jax import parallel, train, train_state


def model_state_and_images(config, batch_size: int, mesh):
  """(model, schedule, optimizer, fresh replicated train state, a random
  batch-sharded image batch in [-1, 1]) for timing a config's step."""
  model, schedule = train.create_model_and_schedule(config)
  optimizer = train_state.create_optimizer(config.optim)
  state = train.init_train_state(config, model, optimizer, mesh,
                                 jax.random.key(0))
  images = jax.device_put(
      jax.random.uniform(jax.random.key(1),
                         (batch_size, *train.image_shape(config)), minval=-1),
      parallel.batch_sharded(mesh))
  return model, schedule, optimizer, state, images
