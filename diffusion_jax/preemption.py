"""Preemption: SIGTERM (the cloud's notice) becomes a clean, synchronised stop."""

import signal
import threading

import jax
from jax.experimental import multihost_utils


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
