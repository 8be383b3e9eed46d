"""Training: the pure train step and the loop around it.

Data parallelism is `jax.jit` over a 1-D device mesh: the batch is sharded on
the 'data' axis, the train state is replicated, XLA inserts the gradient
all-reduce. The same code runs on 1 CPU, a TPU v3-8 or many hosts.

Scale-out: SIGTERM (a preemption notice) makes every process save at the same
step and return cleanly (`PreemptionGuard`); `config.steps_per_call` runs k
steps per compiled call and `config.grad_accum_steps` splits each batch into
micro-batches, both without changing the trained params. Work directories may
be gs:// paths (etils.epath), never passed to os.path.abspath/os.makedirs.
"""

import dataclasses
import os
import signal
import threading
import time

from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from etils import epath
import ml_collections
import numpy as np
import optax
import tqdm

from diffusion_jax import checkpointing
from diffusion_jax.diffusion import guidance
from diffusion_jax.data import pipeline as input_pipeline
from diffusion_jax.diffusion import losses
from diffusion_jax import models, parallel
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion import sde
from diffusion_jax import visualization
from diffusion_jax.diffusion import sde_samplers
from diffusion_jax.models import conv
from diffusion_jax.train_state import (TrainState, create_optimizer,
                                       create_train_state, ema_update,
                                       learning_rate_schedule)


class NonFiniteLossError(FloatingPointError):
  """Training diverged; the message names the step and the kept checkpoint."""


class PreemptionGuard:
  """Turns SIGTERM (the cloud's preemption notice) into a clean stop.

  Multi-process runs (jax.distributed initialized) use JAX's preemption sync
  point: the process that got SIGTERM tells the coordination service, which
  picks one call id at which *every* process returns True, so all save the
  same step (a checkpoint written by only some hosts would be unusable).
  JAX's C++ notifier owns the SIGTERM handler there, so we install none.
  A plain single-process run has no coordination service: a Python handler
  sets a flag, and the previous handler is restored on exit.

  `reached(call_id)` must be called after every compiled call with ids that
  increase by one on every process (the sync protocol picks max id + 1).
  """

  def __init__(self):
    self._flag = False
    self._installed = False
    self._previous = None
    self._use_jax = False

  def __enter__(self):
    self._use_jax = (jax.distributed.is_initialized() and
                     jax.config.jax_enable_preemption_service)
    if not self._use_jax and (threading.current_thread() is
                              threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self._flag = True  # Only a flag: logging from a handler can deadlock.

  def reached(self, call_id: int) -> bool:
    if self._use_jax:
      return multihost_utils.reached_preemption_sync_point(call_id)
    return self._flag

  def __exit__(self, *exc):
    if self._installed:
      # None: the previous handler was not set from Python; use the default.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None
                    else self._previous)
      self._installed = False
    return False


def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Fails before anything compiles if the config cannot work."""
  parallel.check_batch_size(config.batch_size, mesh, 'config.batch_size')
  if config.sample_every_steps:
    parallel.check_batch_size(config.num_sample_images, mesh,
                              'config.num_sample_images')
  if config.fid.every_steps:
    parallel.check_batch_size(config.sample.batch_size, mesh,
                              'config.sample.batch_size')
  check_diffusion_config(config)
  size, levels = config.data.image_size, len(config.model.ch_mult)
  if size % 2 ** (levels - 1):
    raise ValueError(
        f'config.data.image_size={size} cannot be halved {levels - 1} times '
        f'by the U-Net (config.model.ch_mult={tuple(config.model.ch_mult)}): '
        'use fewer levels or another image size')
  for key in ('num_train_steps', 'log_every_steps', 'checkpoint_every_steps',
              'steps_per_call', 'grad_accum_steps'):
    if config[key] <= 0:
      raise ValueError(f'config.{key} must be positive, got {config[key]}')
  # The loop only sees the state between calls, so every boundary must fall
  # on a call boundary.
  k = config.steps_per_call
  for key in ('num_train_steps', 'log_every_steps', 'checkpoint_every_steps',
              'sample_every_steps'):
    if config[key] % k:
      raise ValueError(
          f'config.{key}={config[key]} is not a multiple of '
          f'config.steps_per_call={k}: the loop can only log, checkpoint or '
          f'sample between calls of {k} steps. Set config.{key} to a multiple '
          f'of {k} or lower config.steps_per_call.')
  m = config.grad_accum_steps
  per_device = config.batch_size // mesh.devices.size
  if per_device % m:
    raise ValueError(
        f'config.grad_accum_steps={m} does not divide the per-device batch '
        f'{per_device} (config.batch_size={config.batch_size} over '
        f'{mesh.devices.size} devices): each device splits its own rows into '
        f'{m} micro-batches. Use a divisor of {per_device}.')
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ValueError('config.optim.ema_decay must be in [0, 1)')


def is_continuous(config) -> bool:
  """True for the continuous-time processes of sde.py (t in [0, 1])."""
  return config.diffusion.process != 'ddpm'


def check_diffusion_config(config) -> None:
  """Process, loss, sampler and conditioning settings that fit together;
  shared by every mode, run before anything is loaded or compiled."""
  d, s = config.diffusion, config.sample
  losses.check_config(d)
  if is_continuous(config):
    if s.sampler not in sde_samplers.SAMPLERS:
      raise ValueError(
          f'config.sample.sampler={s.sampler!r} does not apply to the '
          f'continuous process {d.process!r}: use one of '
          f'{sde_samplers.SAMPLERS}')
    # The process, its parameters, the prediction and the sampler.
    sde_samplers.check_sample_args(
        sampling_process(config, sde.process_from_config(d)),
        losses.PREDICTIONS[d.loss], s.sampler, s.num_steps or d.num_timesteps)
  else:
    if s.sampler not in samplers.SAMPLERS:
      raise ValueError(
          f'config.sample.sampler={s.sampler!r} does not apply to '
          f"config.diffusion.process='ddpm': use one of {samplers.SAMPLERS}")
    samplers.check_variance(d.sampler_variance)
    schedules.get_betas(d.beta_schedule, 2, beta_start=1e-4, beta_end=0.02)
  if s.guidance_scale and not config.model.num_classes:
    raise ValueError(
        f'config.sample.guidance_scale={s.guidance_scale} needs a class-'
        'conditional model (config.model.num_classes > 0)')
  if config.model.num_classes:
    guidance.class_labels(1, config.model.num_classes, s.class_label)


def image_shape(config) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


def create_model_and_schedule(config):
  """The network and the process: a schedules.Schedule for 'ddpm', an
  sde.Process for the continuous processes. A learned variance doubles the
  network's output channels."""
  channels = config.data.channels
  if losses.learns_variance(config.diffusion.loss):
    channels *= 2
  model = models.create_model(config.model, out_channels=channels)
  if is_continuous(config):
    return model, sde.process_from_config(config.diffusion)
  return model, schedules.schedule_from_config(config.diffusion)


def importance_sampler(config):
  """The t sampler of config.diffusion.time_sampling='importance', or None."""
  if config.diffusion.time_sampling != 'importance':
    return None
  return losses.ImportanceSampler(config.diffusion.num_timesteps)


def network_fn(config, model, params, labels=None, *, train=False,
               dropout_rng=None):
  """(x, t) -> the network output, for losses and samplers.

  t is the 0-based timestep for 'ddpm' and the continuous time in [0, 1]
  otherwise (mapped to the network's input by sde.model_time). `labels`
  are the class labels of the rows (None: the null class).
  """
  time = sde.model_time if is_continuous(config) else (lambda t: t)
  rngs = {'dropout': dropout_rng} if train else None
  return lambda x, t, y=labels: model.apply(
      {'params': params}, x, time(t), y, train=train, rngs=rngs)


def init_fn(config, model, optimizer):
  """rng -> TrainState; jit it (with out_shardings) or eval_shape it."""
  sampler = importance_sampler(config)

  def init(rng):
    x = jnp.zeros((1, *image_shape(config)), jnp.float32)
    params = model.init({'params': rng}, x, jnp.zeros((1,), jnp.float32),
                        train=False)['params']
    return create_train_state(params, optimizer,
                              sampler.init() if sampler else None)
  return init


def init_train_state(config, model, optimizer, mesh, rng) -> TrainState:
  """A fresh train state, replicated over the mesh."""
  init = jax.jit(init_fn(config, model, optimizer),
                 out_shardings=parallel.replicated(mesh))
  return init(rng)


def abstract_train_state(config, model, optimizer, mesh):
  """Shapes, dtypes and (replicated) shardings of the state, no compute."""
  shapes = jax.eval_shape(init_fn(config, model, optimizer), jax.random.key(0))
  repl = parallel.replicated(mesh)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


def _micro_batches(x: jax.Array, m: int) -> jax.Array:
  """(B, ...) -> (m, B/m, ...), micro-batch i = rows i, i+m, i+2m, ...

  Strided, not contiguous: with B sharded over devices in contiguous blocks
  of b = B/devices rows (b % m == 0), each device's micro-batch rows are its
  own, so splitting moves no data between devices.
  """
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def _unmicro_batch(x: jax.Array) -> jax.Array:
  """The inverse of _micro_batches: (m, B/m, ...) -> (B, ...)."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def make_train_step(config, model, schedule, optimizer):
  """(state, batch) -> (state, metrics); pure, to be jitted.

  `batch` is the images, or (images, labels) for a class-conditional model
  (config.model.num_classes > 0), whose labels are replaced by the null
  class with probability config.model.label_dropout.

  t is drawn per example: uniformly, importance-sampled from the loss
  history in the state (ddpm) or logit-normal (continuous processes); the
  loss is the mean over the batch of the per-example losses, each weighted
  by 1 / (T p_t) under importance sampling.

  With config.grad_accum_steps = m > 1 the batch is split into m
  micro-batches (a lax.scan), their gradients averaged, then one optimizer
  update. t, the noise and the labels are drawn for the whole batch first
  and sliced, so with model.dropout = 0 the update equals the plain step's
  up to float summation order. Dropout masks are drawn per micro-batch (key
  folded with the micro-batch index): the same distribution, not the same
  masks.
  """
  continuous = is_continuous(config)
  per_example = losses.per_example_loss(config.diffusion.loss, continuous)
  sampler = importance_sampler(config)
  num_classes = config.model.num_classes
  lr_schedule = learning_rate_schedule(config.optim)
  m = config.grad_accum_steps
  d = config.diffusion

  def draw(images, rng, loss_history):
    """Per-example t, noise and loss weights of the batch."""
    if continuous:
      t_rng, noise_rng = jax.random.split(rng)
      t = sde.sample_time(t_rng, images.shape[0], method=d.time_sampling,
                          t_min=schedule.t_min,
                          logit_mean=d.logit_normal_mean,
                          logit_std=d.logit_normal_std)
      noise = jax.random.normal(noise_rng, images.shape, images.dtype)
      return t, noise, jnp.ones((images.shape[0],), jnp.float32)
    probs = sampler.probs(loss_history) if sampler else None
    t, noise = losses.draw_t_and_noise(schedule, images, rng, probs)
    weights = (sampler.weights(probs, t) if sampler
               else jnp.ones((images.shape[0],), jnp.float32))
    return t, noise, weights

  def train_step(state: TrainState, batch):
    images, labels = batch if num_classes else (batch, None)
    # RNG from (seed, step): a resumed run draws the same numbers.
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    loss_rng, dropout_rng, label_rng = jax.random.split(rng, 3)
    t, noise, weights = draw(images, loss_rng, state.loss_history)
    if num_classes:
      drop = jax.random.bernoulli(label_rng, config.model.label_dropout,
                                  labels.shape)
      labels = jnp.where(drop, num_classes, labels)

    def objective(params, xs, dropout_rng):
      x, t, noise, weights, labels = xs
      model_fn = network_fn(config, model, params, labels, train=True,
                            dropout_rng=dropout_rng)
      values = per_example(model_fn, schedule, x, t, noise)
      return jnp.mean(weights * values), values

    xs = (images, t, noise, weights, labels)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if m == 1:
      (loss, values), grads = grad_fn(state.params, xs, dropout_rng)
    else:
      def accumulate(carry, i_xs):
        i, xs_i = i_xs
        (loss_i, values_i), grads_i = grad_fn(
            state.params, xs_i, jax.random.fold_in(dropout_rng, i))
        return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), values_i

      zeros = (jnp.zeros((), jnp.float32),
               jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), values = jax.lax.scan(accumulate, zeros, (
          jnp.arange(m), jax.tree.map(lambda a: _micro_batches(a, m), xs)))
      values = _unmicro_batch(values)
      # Equal-sized micro-batches: the mean of their means is the batch mean.
      loss, grads = jax.tree.map(lambda g: g / m, (loss, grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        ema_params=ema_update(state.ema_params, params, config.optim.ema_decay))
    if sampler:
      new_state = new_state.replace(loss_history=sampler.update(
          state.loss_history, t, values))
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': lr_schedule(state.step)}
    return new_state, metrics

  return train_step


def make_multi_step(train_step):
  """(state, k batches) -> (state, metrics of each step, shape (k,)).

  One lax.scan over the stacked batches, as score_sde does: one dispatch per
  k steps. Metrics keep a leading k axis so logging and the NaN check still
  see every step.
  """
  def multi_step(state: TrainState, batches: tuple):
    stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches)
    return jax.lax.scan(train_step, state, stacked)

  return multi_step


def jit_train_step(train_step, mesh, steps_per_call: int = 1):
  """Jits a step; with steps_per_call > 1 it takes a tuple of k batches."""
  repl = parallel.replicated(mesh)
  if steps_per_call > 1:
    train_step = make_multi_step(train_step)
  return jax.jit(train_step, in_shardings=(repl, parallel.batch_sharded(mesh)),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def sampling_model_fn(config, model, schedule, params, num: int):
  """(x, t) -> what the samplers consume for a batch of `num` samples: the
  network with classifier-free guidance for a conditional model (labels from
  config.sample), converted to eps for the ddpm samplers."""
  apply_fn = network_fn(config, model, params)
  if config.model.num_classes:
    labels = guidance.class_labels(num, config.model.num_classes,
                                   config.sample.class_label)
    model_fn = guidance.guided_model(
        apply_fn, labels, null_label=config.model.num_classes,
        scale=config.sample.guidance_scale, channels=config.data.channels)
  else:
    model_fn = lambda x, t: apply_fn(x, t, None)
  if is_continuous(config):
    return model_fn
  return losses.eps_model(model_fn, schedule, config.diffusion.loss)


def sampling_process(config, process: sde.Process) -> sde.Process:
  """The process with the t at which sampling stops (config.sample.t_min;
  0: 1e-3 for vp, whose late steps score_sde skips, else the training
  t_min)."""
  t_min = config.sample.t_min or (max(process.t_min, 1e-3)
                                  if process.kind == 'vp' else process.t_min)
  return dataclasses.replace(process, t_min=t_min)


def make_sample_fn(config, model, schedule, mesh, x0_at=()):
  """(params, x_T, rng) -> images in [-1, 1]; x_T sharded over 'data'.

  x_T is standard normal noise (a continuous sampler scales it to its prior).
  With x0_at (0-based timesteps, ddpm only) it returns (images, x0
  predictions at those steps), the predictions shaped (len(x0_at), batch,
  H, W, C).
  """
  s = config.sample

  def sample(params, x_T, rng):
    model_fn = sampling_model_fn(config, model, schedule, params,
                                 x_T.shape[0])
    if is_continuous(config):
      if x0_at:
        raise ValueError('progressive_timesteps need the ddpm process')
      out = sde_samplers.sample(
          model_fn, sampling_process(config, schedule),
          losses.PREDICTIONS[config.diffusion.loss], x_T, rng,
          sampler=s.sampler,
          num_steps=s.num_steps or config.diffusion.num_timesteps,
          snr=s.snr, corrector_steps=s.corrector_steps,
          denoise=schedule.kind != 'rectified_flow')
      return jnp.clip(out, -1.0, 1.0) if config.diffusion.clip_denoised else out
    return samplers.sample(
        model_fn, schedule, x_T, rng, sampler=s.sampler,
        num_steps=s.num_steps, eta=s.ddim_eta,
        variance=config.diffusion.sampler_variance,
        clip_denoised=config.diffusion.clip_denoised, x0_at=x0_at)
  batch = parallel.batch_sharded(mesh)
  out = (batch, NamedSharding(mesh, P(None, parallel.DATA_AXIS))) if x0_at else batch
  return jax.jit(sample, in_shardings=(parallel.replicated(mesh), batch, None),
                 out_shardings=out,
                 compiler_options=conv.inference_compiler_options())


def sample_noise(config, num: int, seed_offset: int, mesh) -> jax.Array:
  """A fixed x_T, the same on any device layout."""
  shape = (num, *image_shape(config))
  make = jax.jit(lambda k: jax.random.normal(k, shape),
                 out_shardings=parallel.batch_sharded(mesh))
  return make(jax.random.fold_in(jax.random.key(config.seed), seed_offset))


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded array as one numpy array on every process (a plain
  device_get only sees this process's shards on a multi-host run)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir)  # Local or gs://.
    path.mkdir(parents=True, exist_ok=True)
    (path / 'config.json').write_text(
        config.to_json_best_effort(indent=2, sort_keys=True))


def _flush_metrics(pending, first_step, writer, checkpointer, t_last, t_now):
  """Pulls per-step metrics to host, fails on NaN/inf, writes means."""
  # Each entry holds one call's metrics: scalars, or (k,) with steps_per_call.
  host = jax.device_get(pending)
  cat = lambda key: np.concatenate([np.atleast_1d(m[key]) for m in host])
  losses_, grads, lrs = cat('loss'), cat('grad_norm'), cat('learning_rate')
  bad = np.flatnonzero(~(np.isfinite(losses_) & np.isfinite(grads)))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    checkpointer.wait_until_finished()
    raise NonFiniteLossError(
        f'non-finite loss ({losses_[bad[0]]}) or gradient norm at step {step}. '
        f'The last good checkpoint (step {checkpointer.latest_step()}) in '
        f'{checkpointer.directory} is kept untouched; lower '
        'config.optim.learning_rate, raise config.optim.warmup_steps or check '
        'the data, then rerun to resume from it.')
  last_step = first_step + len(losses_)
  summary = {'loss': float(losses_.mean()), 'grad_norm': float(grads.mean()),
             'learning_rate': float(lrs[-1])}
  if t_now > t_last:
    summary['steps_per_sec'] = len(losses_) / (t_now - t_last)
  writer.write_scalars(last_step, summary)
  return summary


def _write_samples(config, workdir, writer, step, sample_fn, params, x_T):
  images = visualization.to_uint8(gather(
      sample_fn(params, x_T, jax.random.key(config.seed))))
  grid = visualization.make_grid(images)
  if jax.process_index() == 0:
    path = visualization.save_png(
        os.path.join(workdir, 'samples', f'ema_step_{step:08d}.png'), grid)
    logging.info('EMA samples at step %d: %s', step, path)
  writer.write_images(step, {'ema_samples': grid[None]})


def _write_sample_quality(config, workdir, writer, step, mesh, ema_params,
                          inception_params):
  """Periodic FID / IS / KID of EMA samples (config.fid) to TensorBoard."""
  from diffusion_jax import sample_metrics  # pylint: disable=g-import-not-at-top
  quality = sample_metrics.compute_sample_metrics(
      config, workdir, mesh, ema_params,
      num_samples=config.fid.train_num_samples,
      inception_params=inception_params, reference=config.fid.reference,
      resize_to=config.fid.resize_to, cache_dir=config.fid.cache_dir or None)
  writer.write_scalars(step, {f'sample_quality/{k}': quality[k]
                              for k in ('fid', 'is_mean', 'kid_mean')
                              if quality.get(k) is not None})
  logging.info('Step %d: FID %.3f vs %s statistics over %d EMA samples%s',
               step, quality['fid'], quality['fid_vs'], quality['num_samples'],
               '' if quality['comparable_to_published'] else
               ' (not comparable to published numbers)')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh=None) -> TrainState:
  """Trains (resuming from workdir if it holds a checkpoint); returns state."""
  mesh = parallel.create_mesh() if mesh is None else mesh
  check_config(config, mesh)
  model, schedule = create_model_and_schedule(config)
  optimizer = create_optimizer(config.optim)
  abstract_state = abstract_train_state(config, model, optimizer, mesh)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), max_to_keep=config.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    # Fails on a checkpoint of another model before anything compiles.
    checkpointer.check_compatible(abstract_state, latest)

  train_iter = input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      sharding=parallel.batch_sharded(mesh), start_step=latest or 0,
      with_labels=bool(config.model.num_classes))
  write_config(config, workdir)

  if latest is not None:
    state, data_state = checkpointer.restore(abstract_state, latest)
    train_iter.set_state(data_state)
    logging.info('Resumed from %s step %d', checkpointer.directory, latest)
  else:
    state = init_train_state(config, model, optimizer, mesh,
                             jax.random.key(config.seed))
  start_step = int(jax.device_get(state.step))
  k = config.steps_per_call
  if start_step % k:
    raise ValueError(
        f'resuming at step {start_step}, which is not a multiple of '
        f'config.steps_per_call={k} (the run that wrote it used another '
        'value): set config.steps_per_call to a divisor of '
        f'{start_step} and of the intervals.')

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  num_params = parameter_overview.count_parameters(state.params)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(state.params)
  per_device = config.batch_size // mesh.devices.size
  logging.info(
      'Model: %s, %s parameters. Mesh: %s over %d devices (%s) on %d '
      'process(es). Global batch %d, per device %d.', config.model.name,
      f'{num_params:,}', dict(mesh.shape), mesh.devices.size,
      jax.devices()[0].platform, jax.process_count(), config.batch_size,
      per_device)
  writer.write_hparams({'num_params': num_params, 'batch_size': config.batch_size,
                        'num_devices': int(mesh.devices.size)})

  train_step = jit_train_step(
      make_train_step(config, model, schedule, optimizer), mesh, k)
  sample_fn = x_T = None
  if config.sample_every_steps:
    sample_fn = make_sample_fn(config, model, schedule, mesh)
    x_T = sample_noise(config, config.num_sample_images, 1, mesh)

  inception_params = None
  if config.fid.every_steps:
    # sample_metrics builds on this module (sampling); imported lazily.
    from diffusion_jax import sample_metrics  # pylint: disable=g-import-not-at-top
    inception_params = sample_metrics.load_inception(config.fid.weights_path)

  num_steps = config.num_train_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps,
                                           writer=writer, every_secs=None,
                                           every_steps=config.log_every_steps)
  bar = tqdm.tqdm(total=num_steps, initial=start_step, unit='step',
                  dynamic_ncols=True, disable=jax.process_index() > 0,
                  desc='train')
  pending, first_pending = [], start_step
  t_last = time.perf_counter()
  eta_logged = False
  timing_start = None
  preempted = False
  with PreemptionGuard() as guard:
    try:
      for done in range(start_step + k, num_steps + 1, k):
        batch = next(train_iter) if k == 1 else tuple(
            next(train_iter) for _ in range(k))
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        bar.update(k)
        for s in range(done - k + 1, done + 1):
          report(s)  # It insists on being called at every step.
        calls = (done - start_step) // k
        if timing_start is None and calls == 2:
          jax.block_until_ready(state.step)  # first calls include compilation
          timing_start = (done, time.perf_counter())
        elif (not eta_logged and timing_start and
              done - timing_start[0] >= max(10, k)):
          jax.block_until_ready(state.step)
          sec = (time.perf_counter() - timing_start[1]) / (done - timing_start[0])
          logging.info('Measured %.4f s/step (%.1f images/s): %d steps take '
                       'about %s.', sec, config.batch_size / sec, num_steps,
                       _hms(sec * (num_steps - start_step)))
          eta_logged = True
        is_last = done == num_steps
        # Every process asks at every call with the same id (done // k).
        preempted = guard.reached(done // k) and not is_last
        save_now = (done % config.checkpoint_every_steps == 0 or is_last or
                    preempted)
        if done % config.log_every_steps == 0 or save_now:
          t_now = time.perf_counter()
          summary = _flush_metrics(pending, first_pending, writer,
                                   checkpointer, t_last, t_now)
          if 'steps_per_sec' in summary:
            writer.write_scalars(done, {'images_per_sec':
                                        summary['steps_per_sec'] *
                                        config.batch_size})
          bar.set_postfix(loss=f"{summary['loss']:.4f}")
          pending, first_pending, t_last = [], done, t_now
        if save_now:
          # The loss of the last step was computed before its update; check
          # the updated params too so a diverged state is never written.
          if not np.isfinite(float(optax.tree.norm(state.params))):
            checkpointer.wait_until_finished()
            raise NonFiniteLossError(
                f'non-finite parameters after step {done}. The last good '
                f'checkpoint (step {checkpointer.latest_step()}) is kept; '
                'lower config.optim.learning_rate and rerun to resume from '
                'it.')
          checkpointer.save(done, state, train_iter.get_state())
        if preempted:
          break
        if sample_fn and (done % config.sample_every_steps == 0 or is_last):
          _write_samples(config, workdir, writer, done, sample_fn,
                         state.ema_params, x_T)
        if inception_params and (done % config.fid.every_steps == 0
                                 or is_last):
          _write_sample_quality(config, workdir, writer, done, mesh,
                                state.ema_params, inception_params)
    finally:
      # Join the prefetch thread: a daemon thread still inside XLA when the
      # interpreter exits aborts the process (exit code 134, not 0).
      train_iter.close()
      bar.close()
      checkpointer.wait_until_finished()
      writer.flush()
  if preempted:
    step = int(jax.device_get(state.step))
    logging.warning(
        'Preempted (SIGTERM) at step %d of %d: saved checkpoint step %d in '
        '%s. Re-run the same command to resume from it.', step, num_steps,
        step, checkpointer.directory)
    checkpointer.close()
    return state
  logging.info('Finished at step %d. Checkpoints: %s; samples: %s; '
               'TensorBoard logs: %s', int(jax.device_get(state.step)),
               checkpointer.directory, os.path.join(workdir, 'samples'),
               workdir)
  checkpointer.close()
  return state


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
