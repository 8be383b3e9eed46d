"""The method interface the trainer runs, and the common one-optimizer step.

A *method* is a generative model together with how it is trained, sampled
and evaluated (VDM's `Experiment` split: the loop is generic, a method
supplies the model-specific parts). The trainer, sample mode and eval mode
call only what `Method` declares:

  init(rng) -> state              networks, their init and optimizer states;
                                  a pytree with an int `step` (checkpointed
                                  whole); `prepare()` runs first, outside
                                  jit, for any files init reads.
  train_step(state, batch)        pure; -> (state, metrics of scalars).
  sample_params(state)            the parameters to sample and evaluate with
                                  (the EMA ones).
  sample(params, noise, rng)      pure; noise of `noise_shape(n)` -> n
                                  images in [-1, 1].
  log_likelihood(params, x, rng)  per-image negative log-likelihood (exact
                                  or a bound) in bits/dim, or None.
  reconstruct(params, x, rng)     an autoencoder's reconstructions of x, or
                                  None (eval mode: MSE, PSNR).

A method with one network and one optimizer subclasses `OneOptimizerMethod`
and supplies only `init_params` and `loss` (and `draw` where randomness must
be drawn per batch); a GAN's generator/discriminator alternation supplies
the whole `train_step` over a state holding both parameter sets.
"""

import abc
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import posthoc_ema
from diffusion_jax import train_state as train_state_lib
from diffusion_jax.train_state import TrainState, create_train_state, ema_update


class Method(abc.ABC):
  """A generative method, as the trainer sees it."""

  name: str = 'method'
  # One sample's shape, e.g. (H, W, C); samples and data batches share it.
  image_shape: tuple[int, ...] = ()
  # Whether data batches are (images, labels) rather than images.
  with_labels: bool = False

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> Any:
    """A fresh train state: a pytree with an int32 scalar `step`."""

  @abc.abstractmethod
  def train_step(self, state: Any, batch: Any) -> tuple[Any, dict]:
    """One update; pure (jitted by the trainer, k per call under lax.scan).

    Metrics are float scalars; every one is checked for NaN/inf by the loop,
    'loss' is shown on the progress bar, 'learning_rate' is logged as its
    last value and every other metric as its mean over the logging interval.
    """

  def prepare(self) -> None:
    """Reads what `init` needs from outside the process (a distillation
    student's teacher checkpoint); called once, outside jit, before `init`."""

  def abstract_init(self) -> Any:
    """The shapes and dtypes of `init`'s state, without computing it (what
    a checkpoint is restored onto). A method whose init reads files (a
    distillation student's teacher) derives them from its networks instead."""
    return jax.eval_shape(self.init, jax.random.key(0))

  def sample_params(self, state: Any) -> Any:
    """What `sample` and `log_likelihood` take: the EMA parameters."""
    return state.ema_params

  def noise_shape(self, num: int) -> tuple[int, ...]:
    """The shape of the standard normal noise `sample` turns into images."""
    return (num, *self.image_shape)

  @abc.abstractmethod
  def sample(self, params: Any, noise: jax.Array, rng: jax.Array) -> jax.Array:
    """Pure: noise -> images in [-1, 1], one per row of noise. `rng` is for
    any further randomness, folded per step so results do not depend on the
    device layout."""

  def network_calls(self) -> int | None:
    """Network evaluations per image of `sample`, where it has a fixed
    count (the x axis of benchmarks/quality_vs_nfe.py); None otherwise."""
    return None

  def log_likelihood(self, params: Any, images: jax.Array,
                     rng: jax.Array) -> dict | None:
    """Per-image arrays with 'total_bpd' (B,), the negative log-likelihood
    of 8-bit data (or an upper bound on it) in bits/dim, and any terms that
    make it up; None where the method defines no likelihood."""
    del params, images, rng
    return None

  def reconstruct(self, params: Any, images: jax.Array,
                  rng: jax.Array) -> jax.Array | None:
    """Pure: images in [-1, 1] -> their reconstructions in [-1, 1] (an
    autoencoder's decode(encode(x))), which eval mode scores by MSE and
    PSNR; None where the method does not reconstruct."""
    del params, images, rng
    return None

  def summarize_likelihood(self, means: dict) -> dict:
    """The figures eval mode writes, from the data-set means of the arrays
    `log_likelihood` returns."""
    return {k: float(v) if getattr(v, 'ndim', 0) == 0 else
            [float(x) for x in v] for k, v in means.items()}

  def write_likelihood_figures(self, metrics: dict, out_dir) -> None:
    """Plots of the evaluation into out_dir (an epath.Path); optional."""
    del metrics, out_dir

  def describe(self) -> str:
    """One line for the log: what is trained."""
    return self.name

  def write_eval_figures(self, params: Any, out_dir, rng: jax.Array) -> None:
    """Method-specific figures of eval mode (a GAN's latent interpolation)
    into out_dir (an epath.Path), from the sample params; optional. Called
    once, on process 0 only: compute on host copies (jax.device_get), never
    on the global mesh."""
    del params, out_dir, rng

  def diagnose(self, metrics_means: dict) -> str | None:
    """Called by the trainer at each logging interval with the interval's
    mean metrics: a message (what went wrong and the likely fixes) stops
    the run as a non-finite loss does, the last checkpoint kept; None to
    go on. The default never stops."""
    del metrics_means
    return None


def micro_batches(x: jax.Array, m: int) -> jax.Array:
  """(B, ...) -> (m, B/m, ...), micro-batch i = rows i, i+m, i+2m, ...

  Strided, not contiguous: with B sharded over devices in contiguous blocks
  of b = B/devices rows (b % m == 0), each device's micro-batch rows are its
  own, so splitting moves no data between devices.
  """
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def unmicro_batch(x: jax.Array) -> jax.Array:
  """The inverse of micro_batches: (m, B/m, ...) -> (B, ...)."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


class OneOptimizerMethod(Method):
  """A method with one parameter set, one optax optimizer and an EMA.

  Its state is `TrainState`. A subclass supplies `init_params` and `loss`;
  `draw` (per-example randomness for the whole batch) and the auxiliary
  state hooks are optional.

  With power_ema_sigma_rels, the state also tracks one power-function EMA
  per sigma_rel (EDM2's post-hoc EMA, posthoc_ema.py) beside the classic
  one, which stays what `sample_params` returns.

  With grad_accum_steps = m > 1 the batch is split into m micro-batches (a
  lax.scan), their gradients averaged, then one optimizer update. Whatever
  `draw` returns is drawn for the whole batch first and sliced, so with no
  dropout the update equals the plain step's up to float summation order;
  the rng given to `loss` is folded with the micro-batch index (dropout
  masks: the same distribution, not the same masks).

  With param_dtype='bfloat16' the state's parameters are bfloat16 and the
  optimizer keeps a float32 master copy (train_state.with_float32_master);
  gradients accumulate and the EMAs average in float32.
  """

  def __init__(self, *, optimizer: optax.GradientTransformation,
               learning_rate_fn, ema_decay: float, seed: int,
               grad_accum_steps: int = 1, ema_warmup: bool = False,
               power_ema_sigma_rels: tuple[float, ...] = (),
               param_dtype: str = 'float32'):
    if param_dtype not in train_state_lib.PARAM_DTYPES:
      raise ValueError(
          f'config.optim.param_dtype={param_dtype!r}: use one of '
          f'{", ".join(map(repr, train_state_lib.PARAM_DTYPES))}')
    self.param_dtype = train_state_lib.PARAM_DTYPES[param_dtype]
    if param_dtype != 'float32':
      optimizer = train_state_lib.with_float32_master(optimizer)
    self.optimizer = optimizer
    self.learning_rate_fn = learning_rate_fn
    self.ema_decay = ema_decay
    self.ema_warmup = ema_warmup
    self.seed = seed
    self.grad_accum_steps = grad_accum_steps
    self.power_ema_sigma_rels = tuple(float(s) for s in power_ema_sigma_rels)
    self.power_ema_gammas = tuple(posthoc_ema.gamma_from_sigma_rel(s)
                                  for s in self.power_ema_sigma_rels)

  def _ema_decay_at(self, step):
    """With ema_warmup, min(decay, (1 + n) / (10 + n)) at update n (TF's
    ExponentialMovingAverage with num_updates; diffusers' EMAModel): early
    weights are forgotten quickly, so a short run's EMA is not dragged back
    to its first steps."""
    if not self.ema_warmup:
      return self.ema_decay
    n = step.astype(jnp.float32)
    return jnp.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Any:
    """The network parameters."""

  @abc.abstractmethod
  def loss(self, params: Any, xs: Any, rng: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    """(mean loss to minimise, per-example values (B,)) of `draw`'s rows."""

  def draw(self, batch: Any, rng: jax.Array, aux_state: Any) -> Any:
    """Everything random per example, for the whole batch: a pytree whose
    leaves have the batch as leading axis (gradient accumulation slices
    it). The default is the batch itself."""
    del rng, aux_state
    return batch

  def init_aux_state(self) -> Any:
    """State the method carries between steps besides the parameters (e.g.
    diffusion's loss history for importance sampling); None if none."""
    return None

  def update_aux_state(self, aux_state: Any, xs: Any,
                       values: jax.Array) -> Any:
    del xs, values
    return aux_state

  def init(self, rng: jax.Array) -> TrainState:
    return self.state_from(self.init_params(rng), self.init_aux_state())

  def state_from(self, params: Any, aux_state: Any) -> TrainState:
    """A fresh train state around given parameters (step 0, the EMAs
    equal to them, a fresh optimizer state)."""
    state = create_train_state(params, self.optimizer, aux_state,
                               self.param_dtype)
    if self.power_ema_gammas:  # overwritten by the first update (beta_1 = 0)
      state = state.replace(power_ema=tuple(
          params for _ in self.power_ema_gammas))
    return state

  def train_step(self, state: TrainState, batch: Any):
    # RNG from (seed, step): a resumed run draws the same numbers.
    rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
    draw_rng, loss_rng = jax.random.split(rng)
    xs = self.draw(batch, draw_rng, state.loss_history)
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    m = self.grad_accum_steps
    if m == 1:
      (loss, values), grads = grad_fn(state.params, xs, loss_rng)
    else:
      def accumulate(carry, i_xs):
        i, xs_i = i_xs
        (loss_i, values_i), grads_i = grad_fn(
            state.params, xs_i, jax.random.fold_in(loss_rng, i))
        return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), values_i

      zeros = (jnp.zeros((), jnp.float32),  # float32 sums, whatever params are
               jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                            state.params))
      (loss, grads), values = jax.lax.scan(accumulate, zeros, (
          jnp.arange(m), jax.tree.map(lambda a: micro_batches(a, m), xs)))
      values = unmicro_batch(values)
      # Equal-sized micro-batches: the mean of their means is the batch mean.
      loss, grads = jax.tree.map(lambda g: g / m, (loss, grads))
    params, opt_state = train_state_lib.apply_gradients(
        self.optimizer, grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    fresh = train_state_lib.float32_params(new_state)
    new_state = new_state.replace(
        ema_params=ema_update(state.ema_params, fresh,
                              self._ema_decay_at(state.step)),
        loss_history=self.update_aux_state(state.loss_history, xs, values),
        power_ema=posthoc_ema.power_ema_update(
            state.power_ema, fresh, state.step + 1, self.power_ema_gammas))
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': self.learning_rate_fn(state.step)}
    return new_state, metrics


def one_optimizer_kwargs(config, *, optimizer=None,
                         learning_rate_fn=None) -> dict:
  """OneOptimizerMethod's keyword arguments from config.optim, config.seed,
  config.grad_accum_steps and config.posthoc_ema, which every one-optimizer
  method reads alike; optimizer and learning_rate_fn default to Adam with
  DDPM's warm-up (train_state.create_optimizer)."""
  optim = config.optim
  return dict(
      optimizer=(train_state_lib.create_optimizer(optim) if optimizer is None
                 else optimizer),
      learning_rate_fn=(train_state_lib.learning_rate_schedule(optim)
                        if learning_rate_fn is None else learning_rate_fn),
      ema_decay=optim.ema_decay, seed=config.seed,
      ema_warmup=optim.ema_warmup, grad_accum_steps=config.grad_accum_steps,
      power_ema_sigma_rels=(tuple(config.posthoc_ema.sigma_rels)
                            if 'posthoc_ema' in config else ()),
      param_dtype=optim.get('param_dtype', 'float32'))


def require_float32_params(config, method: str) -> None:
  """A ValueError for config.optim.param_dtype other than float32 in a
  method with two optimizers (GAN, autoencoder), which keep no master copy:
  better an error than silently training in float32."""
  param_dtype = config.optim.get('param_dtype', 'float32')
  if param_dtype != 'float32':
    raise ValueError(
        f'config.optim.param_dtype={param_dtype!r}: the {method} method '
        'trains float32 parameters only (bfloat16 parameters with a float32 '
        "master copy are for the one-optimizer methods); set it to 'float32'")
