"""Orbax checkpoints of the train state and the input position.

One small wrapper around `ocp.CheckpointManager` so the rest of the code
never touches Orbax directly. A checkpoint holds two items:
  state: the full `TrainState` (params, EMA params, optimizer state, step),
  data:  the input iterator's position (JSON): the next global step, the
         same on every process and device count (data/pipeline.py).
Arrays are saved as global arrays, each process writing its own shards in
parallel (Orbax's default); `restore` reads them onto the shardings of the
abstract state it is given, so a run saved with its state split over 8
devices (config.mesh.fsdp) resumes on any other mesh: other shardings of
the same global arrays, bit for bit.
Saves are asynchronous; a save that did not finish is never listed as a step
(Orbax commits a step by an atomic rename of a `*.orbax-checkpoint-tmp*`
directory, or a commit marker on gs://), so resume never picks it; the
temporary directories a killed run leaves behind are deleted when the next
run opens the directory.

A committed step that cannot be read (a truncated or missing array file, lost
metadata, a missing input position) is never deleted: `restore_readable`
moves it to `checkpoints_unreadable/` beside the checkpoints, logs why, and
resumes from the newest step that reads, so a restarted preemptible run needs
no person. A checkpoint of another model is not "unreadable": that stays an
error, and nothing is moved.
"""

import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax.errors import UserError, one_line


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be used for this run; the message says why."""


class UnreadableCheckpointError(CheckpointError):
  """A step whose files cannot be read (corrupt or incomplete), as opposed to
  a readable checkpoint of another model."""


def _key_name(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], Any]]:
  """'params/conv_in/kernel' -> (shape, dtype); the same names for a live
  tree and for Orbax metadata (which stores dataclasses and tuples as dicts)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))
  return {'/'.join(_key_name(k) for k in path):
              (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in flat if hasattr(leaf, 'shape')}


# Orbax splits a replicated array into one slice per replica so that the
# replicas' hosts write it together. On one host the same process writes
# every slice, and slicing costs a compiled program per array shape: 174 of
# them (10 s) at the tiny test U-Net's first save on 8 CPU devices. Across
# hosts it pays for large arrays, so it is kept where each replica's slice
# has at least this many bytes.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler():
  """Orbax's jax.Array handler (its metadata store kept, so files are as
  Orbax's default writes them), parallel over replicas only for slices of
  MIN_REPLICA_SLICE_BYTES or more. Once per process (Orbax logs each
  override)."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(default, '_min_slice_bytes_for_replica_parallel',
             None) == MIN_REPLICA_SLICE_BYTES:
    return
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=getattr(default, '_array_metadata_store'),
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
      override=True)


class Checkpointer:
  """Saves every N steps (decided by the caller), keeps the latest K."""

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               asynchronous: bool = True):
    _register_array_handler()
    self.directory = os.path.abspath(directory) if '://' not in directory else directory
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=asynchronous,
            # A SIGKILL during an async save leaves a tmp dir; drop it.
            cleanup_tmp_directories=True),
        # Handlers up front so metadata can be read before any save/restore.
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict | None = None) -> bool:
    """Starts an (async) save; never replaces an existing step."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {})), force=True)

  def check_compatible(self, abstract_state, step: int):
    """Fails naming the first tensor whose shape differs from this model;
    returns the checkpoint's state metadata tree."""
    try:
      meta = self._manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(one_line(
          f'checkpoint step {step} in {self.directory} is unreadable '
          f'({type(e).__name__}: {e}). Move that step directory aside to '
          'resume from an earlier one, or use a new --workdir.')) from e
    if meta is None:
      raise UnreadableCheckpointError(
          f'checkpoint step {step} in {self.directory} has no state metadata: '
          'it is corrupt or incomplete; move it aside or use a new --workdir.')
    want, have = _flat_shapes(abstract_state), _flat_shapes(meta)
    fix = ('Use a new --workdir or the config that wrote it (config.json '
           'beside the checkpoints).')
    for key in sorted(set(want) | set(have)):
      if key not in have or key not in want:
        where = 'only in this run' if key not in have else 'only in the checkpoint'
        hint = (' (a float32 master copy: config.optim.param_dtype differs)'
                if '/master/' in key else '')
        raise CheckpointError(
            f'{self.directory} holds a checkpoint of a different model: '
            f'tensor {key} exists {where}{hint}. {fix}')
      if want[key][0] != have[key][0]:
        raise CheckpointError(
            f'{self.directory} holds a checkpoint of a different model: '
            f'{key} has shape {have[key][0]} in the checkpoint but '
            f'{want[key][0]} in this run. {fix}')
      # Orbax casts on restore: harmless for float64 -> float32 (arrays a
      # tool wrote from numpy), but bfloat16 <-> float32 would change what
      # the run trains (config.optim.param_dtype), so that is refused.
      if want[key][1] != have[key][1] and min(
          want[key][1].itemsize, have[key][1].itemsize) < 4:
        raise CheckpointError(
            f'{self.directory} holds a checkpoint of a different model: '
            f'{key} is {have[key][1]} in the checkpoint but {want[key][1]} '
            f'in this run (config.optim.param_dtype?). {fix}')
    return meta

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, data_state) onto the shardings of abstract_state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    meta = self.check_compatible(abstract_state, step)
    if '://' not in self.directory and not os.path.isdir(
        os.path.join(self.directory, str(step), 'data')):
      # Orbax would restore a missing item as None: the run would resume
      # with the input pipeline at its start, silently.
      raise UnreadableCheckpointError(
          f'checkpoint step {step} in {self.directory} has no input-pipeline '
          'position (its data/ item is missing): it is incomplete.')
    target = abstract_state
    # Train states gained optional fields (loss_history, None unless t is
    # importance-sampled; power_ema, None unless post-hoc EMA is tracked);
    # checkpoints written before one lack its key. Restore those as a dict
    # of the fields they have.
    missing = [f for f in ('loss_history', 'power_ema')
               if getattr(abstract_state, f, 0) is None and f not in meta]
    legacy = bool(missing)
    if legacy:
      target = {k: v for k, v in vars(abstract_state).items()
                if k not in missing}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(one_line(
          f'checkpoint step {step} in {self.directory} could not be restored '
          f'({type(e).__name__}: {e}). It may be corrupt: move that step '
          'directory aside to resume from an earlier step.')) from e
    state = restored['state']
    if legacy:
      state = abstract_state.replace(**state)
    return state, dict(restored['data'] or {})

  def restore_readable(self, abstract_state):
    """(state, data_state, step) of the newest step that reads, or None when
    there are no steps. Unreadable newer steps are then moved aside (never
    deleted) with a warning. When no step reads, nothing is moved and the
    newest step's error is raised (a person should look); a checkpoint of
    another model raises at once."""
    unreadable = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(abstract_state, step)
      except UnreadableCheckpointError as e:
        unreadable.append((step, e))
        continue
      for bad, error in unreadable:
        moved = self.move_aside(bad)
        logging.warning('Skipped unreadable checkpoint step %d (%s); moved it '
                        'to %s. Resuming from step %d.', bad, error, moved,
                        step)
      return state, data_state, step
    if unreadable:
      raise UnreadableCheckpointError(one_line(
          f'no checkpoint in {self.directory} can be read; the newest: '
          f'{unreadable[0][1]}'))
    return None

  def move_aside(self, step: int) -> str:
    """Renames step `step` to ../checkpoints_unreadable/<step>[.<time>] (out
    of Orbax's sight, never deleted); returns the new path."""
    parent = os.path.dirname(self.directory.rstrip('/'))
    target = os.path.join(parent, 'checkpoints_unreadable', str(step))
    if jax.process_index() == 0:
      from etils import epath  # pylint: disable=g-import-not-at-top
      dest = epath.Path(target)
      if dest.exists():
        dest = epath.Path(f'{target}.{int(time.time())}')
      dest.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(self.directory, str(step)).rename(dest)
      target = str(dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved_aside_{step}')
    self._manager.reload()
    return target

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
