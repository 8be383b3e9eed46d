"""The one-optimizer train state (params, EMA params, optimizer state, step,
optional power EMAs), the optimizer and its learning-rate schedule, and
bfloat16 parameters with a float32 master copy."""

from typing import Any, NamedTuple

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


PARAM_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class Float32Master(NamedTuple):
  """The optimizer state of `with_float32_master`."""
  master: Any  # the parameters in float32, which the updates accumulate in
  inner: Any   # the wrapped optimizer's state (Adam's moments: float32)


def with_float32_master(inner: optax.GradientTransformation
                        ) -> optax.GradientTransformation:
  """Master weights for low-precision parameters (Micikevicius et al. 2018,
  "Mixed precision training", sec. 3.1): the optimizer keeps a float32 copy
  and applies its updates there, and the train state's parameters are that
  copy rounded (`apply_gradients`). Without it, an update smaller than half
  a bfloat16 ulp (2^-8 relative: lr 1e-4 x Adam's ~unit step) rounds away
  and the parameters stop moving.

  The model then reads, and fsdp gathers, 2-byte parameters; the state
  grows by 2 bytes per parameter (bf16 params + f32 master + Adam's two
  moments + the f32 EMA: 18 bytes against 16), which is why this is a
  lever for the gathers and the forward's inputs, not for the state.
  """
  def init(params):
    master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    return Float32Master(master, inner.init(master))

  def update(grads, state, params=None):
    del params  # the master copy, not its rounding, is what is updated
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    updates, inner_state = inner.update(grads, state.inner, state.master)
    return updates, Float32Master(optax.apply_updates(state.master, updates),
                                  inner_state)

  return optax.GradientTransformation(init, update)


def apply_gradients(optimizer, grads, opt_state, params):
  """-> (params, opt_state) after one optimizer update. With a float32
  master copy, the parameters are the updated master rounded to their own
  dtype (not params + update, which would round twice)."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  if isinstance(opt_state, Float32Master):
    return cast_like(opt_state.master, params), opt_state
  return optax.apply_updates(params, updates), opt_state


def float32_params(state: TrainState):
  """The parameters at full precision: the master copy where there is one
  (what the EMAs average: a bfloat16 EMA at decay 0.9999 could not move)."""
  if isinstance(state.opt_state, Float32Master):
    return state.opt_state.master
  return state.params


def cast_like(tree, like):
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def create_train_state(params, optimizer, loss_history=None,
                       param_dtype=jnp.float32) -> TrainState:
  """Step 0; the EMA is params (float32), the optimizer state is initialised
  from params before they are cast to param_dtype, so a master copy starts
  at the exact initial values."""
  opt_state = optimizer.init(params)
  return TrainState(step=jnp.zeros((), jnp.int32),
                    params=jax.tree.map(lambda p: p.astype(param_dtype),
                                        params),
                    ema_params=params, opt_state=opt_state,
                    loss_history=loss_history)


def ema_update(ema_params, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params, every step."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                      ema_params, params)
