"""The one-optimizer train state (params, EMA params, optimizer state, step,
optional power EMAs), the optimizer and its learning-rate schedule."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue; the RNG is derived from (seed, step)."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  # The method's state besides its parameters (OneOptimizerMethod's
  # aux_state), e.g. diffusion's losses.LossHistory when t is importance-
  # sampled; None if it has none. Named before methods existed and kept so,
  # since the name is part of every checkpoint's tree.
  loss_history: Any = None
  # Post-hoc EMA (posthoc_ema.py): a tuple of param trees, the power-function
  # EMAs of config.posthoc_ema.sigma_rels; None when not tracked, so states
  # and checkpoints without it are unchanged.
  power_ema: Any = None


def learning_rate_schedule(optim_config: ml_collections.ConfigDict):
  """Linear warm-up from 0 to the learning rate, then constant (DDPM)."""
  lr = optim_config.learning_rate
  if optim_config.warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return optax.linear_schedule(0.0, lr, optim_config.warmup_steps)


def create_optimizer(optim_config: ml_collections.ConfigDict):
  """Adam after clipping the gradient's global norm (DDPM: 1.0)."""
  chain = []
  if optim_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  chain.append(optax.adam(learning_rate_schedule(optim_config),
                          b1=optim_config.adam_b1, b2=optim_config.adam_b2,
                          eps=optim_config.adam_eps))
  return optax.chain(*chain)


def create_train_state(params, optimizer, loss_history=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=params, opt_state=optimizer.init(params),
                    loss_history=loss_history)


def ema_update(ema_params, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params, every step."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                      ema_params, params)
