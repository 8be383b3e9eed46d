"""The device mesh, the two shardings a data-parallel run needs, gather."""

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices of all processes, axis 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str) -> int:
  """Returns the per-device batch, or fails with what to change."""
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f'{what}={global_batch_size} does not divide across the '
        f'{num_devices} devices of the mesh ({jax.process_count()} '
        f'process(es)): set {what} to a multiple of {num_devices}')
  return global_batch_size // num_devices


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded array as one numpy array on every process (a plain
  device_get only sees this process's shards on a multi-host run)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
