"""The training loop: any method's jitted step, checkpoints, logs, samples.

It receives an `experiment.Experiment` and calls only the method interface
(methods/base.py): init, train_step, sample_params, sample. Data parallelism
is `jax.jit` over a 1-D device mesh: the batch is sharded on the 'data'
axis, the state is replicated, XLA inserts the gradient all-reduce. The same
code runs on 1 CPU, a TPU v3-8 or many hosts.

Scale-out: SIGTERM (a preemption notice) makes every process save at the
same step and return cleanly (preemption.PreemptionGuard); the loop runs
loop.steps_per_call steps per compiled call. Work directories may be gs://
paths (etils.epath), never passed to os.path.abspath/os.makedirs.
"""

import os
import time

from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
import jax
import numpy as np
import optax
import tqdm

from diffusion_jax import checkpointing, experiment, parallel, posthoc_ema
from diffusion_jax import sharding
from diffusion_jax import report
from diffusion_jax import visualization
from diffusion_jax import errors
from diffusion_jax import flops
from diffusion_jax.experiment import GRID_STREAM, Experiment
from diffusion_jax.metrics import sample_quality
from diffusion_jax.models import conv
from diffusion_jax.preemption import PreemptionGuard


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """Training diverged; the message names the step and the kept checkpoint."""


def _finite(tree) -> bool:
  """Whether every float leaf of a state is finite."""
  floats = [x for x in jax.tree.leaves(tree)
            if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  # One jitted program: leaf-by-leaf eager reductions of an fsdp-sharded
  # state put dozens of small all-reduce programs in flight at once, which
  # the XLA CPU runtime can deadlock on (a rendezvous timeout).
  norm = jax.jit(optax.tree.norm,
                 compiler_options=conv.one_shot_compiler_options())
  return bool(np.isfinite(float(norm(floats))))


def _kept_checkpoint(checkpointer) -> str:
  latest = checkpointer.latest_step()
  if latest is None:
    return 'There is no checkpoint yet: nothing to resume; '
  return (f'The last good checkpoint (step {latest}) in '
          f'{checkpointer.directory} is kept untouched; ')


def _check_finite(host_metrics, first_step, checkpointer):
  """Raises NonFiniteLossError naming the first step whose metrics are not
  finite. host_metrics: list of calls' metrics (scalars, or (k,) arrays with
  steps_per_call), the first one's first step being first_step + 1."""
  values = {key: np.concatenate([np.atleast_1d(m[key]) for m in host_metrics])
            for key in host_metrics[0]}
  for key, v in values.items():
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
      step = first_step + int(bad[0]) + 1
      checkpointer.wait_until_finished()
      raise NonFiniteLossError(
          f'non-finite {key} ({v[bad[0]]}) at step {step}. '
          f'{_kept_checkpoint(checkpointer)}lower '
          'config.optim.learning_rate, raise config.optim.warmup_steps or '
          'check the data, then rerun.')
  return values


def _flush_metrics(pending, first_step, writer, checkpointer, t_last, t_now,
                   diagnose=None):
  """Pulls per-step metrics to host, fails on NaN/inf, writes means; fails
  too when diagnose(means) (the method's) returns a message."""
  # Each entry holds one call's metrics: scalars, or (k,) with steps_per_call.
  values = _check_finite(jax.device_get(pending), first_step, checkpointer)
  num_steps = len(next(iter(values.values())))
  summary = {key: float(v[-1] if key == 'learning_rate' else v.mean())
             for key, v in values.items()}
  if t_now > t_last:
    summary['steps_per_sec'] = num_steps / (t_now - t_last)
  writer.write_scalars(first_step + num_steps, summary)
  message = diagnose(summary) if diagnose else None
  if message:  # raised before this step's checkpoint is written
    checkpointer.wait_until_finished()
    raise NonFiniteLossError(
        f'stopped at step {first_step + num_steps} (means over steps '
        f'{first_step + 1}-{first_step + num_steps}): {message}. '
        f'{_kept_checkpoint(checkpointer)}apply a fix and rerun.')
  return summary


def _write_grid(exp: Experiment, workdir, writer, step, sample_fn, params,
                noise):
  images = parallel.gather(sample_fn(params, noise, exp.sample_rng(0)))
  nonfinite = int(visualization.nonfinite_samples(images).sum())
  grid = visualization.make_grid(visualization.to_uint8(images))
  if jax.process_index() == 0:
    visualization.warn_nonfinite(nonfinite, len(images),
                                 f'EMA samples at step {step}')
    path = visualization.save_png(
        os.path.join(workdir, 'samples', f'ema_step_{step:08d}.png'), grid)
    logging.info('EMA samples at step %d: %s', step, path)
  # Upscaled like the PNG: TensorBoard's slider then shows learning.
  writer.write_images(step, {'ema_samples': visualization.upscale(grid)[None]})


def _write_sample_quality(exp: Experiment, workdir, writer, step, params,
                          network, sample_fn, floor=None):
  """Periodic FD / IS / KID of EMA samples (and the real floor) to
  TensorBoard; returns the floor, which the next call reuses (the real images
  do not change during a run, so it is computed once)."""
  q = exp.quality
  quality = sample_quality.compute_sample_quality(
      exp.sample_batch_fn(params, exp.eval_batch_size, sample_fn),
      data_config=exp.data, mesh=exp.mesh, batch_size=exp.eval_batch_size,
      num_samples=exp.loop.quality_num_samples, network=network,
      seed=exp.seed, reference=q.reference, floor_seeds=q.floor_seeds,
      floor=floor, cache_dir=_quality_cache(exp, workdir))
  writer.write_scalars(step, sample_quality.scalar_summaries(quality))
  floor = (f' (real images: {quality["floor_fd_mean"]:.3f} +- '
           f'{quality["floor_fd_std"]:.3f})' if 'floor_fd_mean' in quality
           else '')
  logging.info('Step %d: %s FD %.3f%s vs %s over %d EMA samples%s', step,
               network.kind, quality['fd'], floor, quality['fd_vs'],
               quality['num_samples'],
               '' if quality['comparable_to_published'] else
               ' (not comparable to published numbers)')
  return sample_quality.floor_entries(quality)


def _quality_cache(exp: Experiment, workdir) -> str:
  return exp.quality.cache_dir or os.path.join(workdir, 'fid_stats')


def _restore_or_init(exp: Experiment, checkpointer):
  """(state, train iterator) from the newest readable checkpoint (unreadable
  newer ones are moved aside, see checkpointing.py), or fresh ones."""
  restored = checkpointer.restore_readable(exp.abstract_state())
  if restored is None:
    return exp.init_state(), exp.train_iterator(start_step=0)
  state, data_state, step = restored
  train_iter = exp.train_iterator(start_step=step)
  train_iter.set_state(data_state)
  logging.info('Resumed from %s step %d', checkpointer.directory, step)
  return state, train_iter


def train_and_evaluate(exp: Experiment, workdir: str):
  """Trains (resuming from workdir if it holds a checkpoint); returns the
  final state."""
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      max_to_keep=exp.loop.keep_checkpoints)
  try:
    return _train(exp, workdir, checkpointer)
  finally:
    # On every exit path, errors included: Orbax's background work must
    # never outlive the run (it printed the last word at shutdown).
    checkpointer.close()


def _train(exp: Experiment, workdir: str, checkpointer):
  loop, mesh, method = exp.loop, exp.mesh, exp.method
  # A checkpoint of another model fails here, before anything compiles.
  state, train_iter = _restore_or_init(exp, checkpointer)
  start_step = int(jax.device_get(state.step))
  if start_step >= loop.num_train_steps:
    train_iter.close()
    logging.info(
        '%s already holds step %d, %s config.num_train_steps=%d: nothing to '
        'train; the checkpoints are left as they are. Raise '
        'config.num_train_steps to train further.', checkpointer.directory,
        start_step, 'the requested' if start_step == loop.num_train_steps
        else 'beyond', loop.num_train_steps)
    return state
  experiment.write_config(exp.config, workdir)
  k = loop.steps_per_call
  if start_step % k:
    train_iter.close()
    raise errors.ConfigError(
        f'resuming at step {start_step}, which is not a multiple of '
        f'config.steps_per_call={k} (the run that wrote it used another '
        'value): set config.steps_per_call to a divisor of '
        f'{start_step} and of the intervals.')

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  params = method.sample_params(state)
  num_params = parameter_overview.count_parameters(params)
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(params)
  logging.info(
      'Method %s; %s parameters. Mesh: %s over %d devices (%s) on %d '
      'process(es). Global batch %d, per device %d.', method.describe(),
      f'{num_params:,}', dict(mesh.shape), mesh.devices.size,
      jax.devices()[0].platform, jax.process_count(), loop.batch_size,
      loop.batch_size // mesh.devices.size)
  # What config.mesh.fsdp buys: each device's share of the state.
  logging.info('Mesh %s; train state %s.', dict(mesh.shape),
               sharding.describe_bytes(sharding.bytes_per_device(state)))
  writer.write_hparams({'num_params': num_params,
                        'batch_size': loop.batch_size,
                        'num_devices': int(mesh.devices.size)})

  train_step = exp.jit_train_step()
  # MFU (flops.py): XLA's FLOPs of the step, counted at the first call.
  peak_tflops, peak_source = flops.device_peak()
  flops_per_step = None
  logging.info('Peak for MFU: %s TFLOP/s per device (%s).', peak_tflops,
               peak_source)
  sample_fn = grid_noise = network = floor = None
  if loop.grid_every_steps or loop.quality_every_steps:
    sample_fn = exp.jit_sample_fn()
  if loop.grid_every_steps:
    grid_noise = exp.sample_noise(loop.grid_num_images, GRID_STREAM)
  if loop.quality_every_steps:
    network = sample_quality.load_network(exp.quality, exp.data,
                                          _quality_cache(exp, workdir),
                                          exp.seed)

  num_steps = loop.num_train_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps,
                                           writer=writer, every_secs=None,
                                           every_steps=loop.log_every_steps)
  bar = tqdm.tqdm(total=num_steps, initial=start_step, unit='step',
                  dynamic_ncols=True, disable=jax.process_index() > 0,
                  desc='train')
  snapshots = posthoc_ema.SnapshotWriter.create(exp, workdir)  # None: off
  pending, first_pending, previous = [], start_step, None
  t_last = time.perf_counter()
  eta_logged, timing_start, preempted = False, None, False
  with PreemptionGuard() as guard:
    try:
      for done in range(start_step + k, num_steps + 1, k):
        batch = next(train_iter) if k == 1 else tuple(
            next(train_iter) for _ in range(k))
        if done == start_step + k:
          per_call = flops.step_flops(train_step.lower(state, batch))
          flops_per_step = per_call / k if per_call else None
        state, metrics = train_step(state, batch)
        # NaN/inf stop within one call of the first bad step: the previous
        # call's few scalars are ready (or nearly) once this one is queued,
        # so reading them costs no pipeline stall.
        if previous is not None:
          _check_finite(jax.device_get([previous[0]]), previous[1],
                        checkpointer)
        previous = (metrics, done - k)
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
                       'about %s.%s', sec, loop.batch_size / sec, num_steps,
                       _hms(sec * (num_steps - start_step)),
                       _mfu_line(flops_per_step, 1.0 / sec, mesh.devices.size,
                                 peak_tflops, peak_source))
          eta_logged = True
        is_last = done == num_steps
        # Every process asks at every call with the same id (done // k).
        preempted = guard.reached(done // k) and not is_last
        save_now = (done % loop.checkpoint_every_steps == 0 or is_last or
                    preempted)
        if done % loop.log_every_steps == 0 or save_now:
          t_now = time.perf_counter()
          summary = _flush_metrics(pending, first_pending, writer,
                                   checkpointer, t_last, t_now,
                                   method.diagnose)
          rates = {}
          if 'steps_per_sec' in summary:
            rates = {'images_per_sec': summary['steps_per_sec'] *
                                       loop.batch_size,
                     **flops.throughput(flops_per_step,
                                        summary['steps_per_sec'],
                                        mesh.devices.size, peak_tflops)}
            writer.write_scalars(done, rates)
          if 'loss' in summary:
            bar.set_postfix(loss=f"{summary['loss']:.4f}",
                            **({'mfu': f"{rates['mfu']:.1%}"}
                               if 'mfu' in rates else {}))
          pending, first_pending, t_last = [], done, t_now
        if save_now:
          # The loss of the last step was computed before its update; check
          # the updated state too so a diverged state is never written.
          if not _finite(state):
            checkpointer.wait_until_finished()
            raise NonFiniteLossError(
                f'non-finite parameters after step {done}. '
                f'{_kept_checkpoint(checkpointer)}lower '
                'config.optim.learning_rate and rerun.')
          checkpointer.save(done, state, train_iter.get_state())
        if snapshots:
          snapshots.after_step(state, done, is_last)
        if preempted:
          break
        if grid_noise is not None and (
            done % loop.grid_every_steps == 0 or is_last):
          _write_grid(exp, workdir, writer, done, sample_fn,
                      method.sample_params(state), grid_noise)
        if network and (done % loop.quality_every_steps == 0 or is_last):
          floor = _write_sample_quality(exp, workdir, writer, done,
                                        method.sample_params(state), network,
                                        sample_fn, floor)
    finally:
      # Join the prefetch thread: a daemon thread still inside XLA when the
      # interpreter exits aborts the process (exit code 134, not 0).
      train_iter.close()
      bar.close()
      checkpointer.wait_until_finished()
      writer.flush()
  step = int(jax.device_get(state.step))
  if preempted:
    logging.warning(
        'Preempted (SIGTERM) at step %d of %d: saved checkpoint step %d in '
        '%s. Re-run the same command to resume from it.', step, num_steps,
        step, checkpointer.directory)
  else:
    logging.info('Finished at step %d. Checkpoints: %s; samples: %s; '
                 'TensorBoard logs: %s', step, checkpointer.directory,
                 os.path.join(workdir, 'samples'), workdir)
    if jax.process_index() == 0:
      _write_report(workdir)
  return state


def _write_report(workdir):
  """report.html; a finished run never fails because its report did."""
  try:
    logging.info('Run report: %s', report.write_report(workdir))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Could not write %s/report.html (%s: %s); the run itself '
                    'is complete. Retry with python -m diffusion_jax.report '
                    '%s', workdir, type(e).__name__, e, workdir)


def _mfu_line(flops_per_step, steps_per_sec, num_devices, peak_tflops,
              peak_source) -> str:
  """' XLA counts ... MFU ...' for the projection line, or ''."""
  rates = flops.throughput(flops_per_step, steps_per_sec, num_devices,
                           peak_tflops)
  if not rates:
    return ''
  line = (f' XLA counts {flops_per_step / 1e9:.3g} GFLOP per step: '
          f'{rates["tflops_per_device"]:.3g} TFLOP/s per device')
  if 'mfu' in rates:
    line += (f', MFU {rates["mfu"]:.1%} of {peak_tflops:.4g} TFLOP/s '
             f'({peak_source})')
  return line + '.'


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
