"""The device mesh ('data', 'fsdp'), the batch and replicated shardings,
gather. The state's sharding over 'fsdp' is sharding.py's."""

import math

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
MESH_AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1
               ) -> tuple[int, int]:
  """(data, fsdp) sizes multiplying to num_devices; -1 = the rest (one of
  them at most). Fails naming config.mesh.* and the device count."""
  for key, value in (('data', data), ('fsdp', fsdp)):
    if value == 0 or value < -1:
      raise ValueError(f'config.mesh.{key}={value}: use a positive size or '
                       '-1 (the devices left over)')
  if data == -1 and fsdp == -1:
    raise ValueError('config.mesh.data and config.mesh.fsdp are both -1: '
                     'set one of them to a size')
  known = fsdp if data == -1 else data if fsdp == -1 else data * fsdp
  if num_devices % known or (data != -1 and fsdp != -1 and
                             known != num_devices):
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    raise ValueError(
        f'config.mesh.data={data} x config.mesh.fsdp={fsdp} does not fit the '
        f'{num_devices} devices ({jax.process_count()} process(es)): the '
        f'sizes must multiply to {num_devices} (-1 = the rest; sizes that '
        f'divide it: {", ".join(map(str, divisors))})')
  rest = num_devices // known
  return (rest if data == -1 else data, rest if fsdp == -1 else fsdp)


def create_mesh(devices=None, *, data: int = -1, fsdp: int = 1) -> Mesh:
  """A 2-D mesh ('data', 'fsdp') over `devices` (default: all devices of all
  processes), in their order: device i holds batch block i (the batch is
  split over data x fsdp), so each process's devices hold one contiguous
  block of rows, the input pipeline's layout (data/pipeline.py). The
  default fsdp = 1 is plain data parallelism with a replicated state."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(len(devices), data, fsdp)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: data x fsdp (FSDP is data
  parallel too: each device computes on its own rows, with gathered
  weights)."""
  return tuple(a for a in MESH_AXES if a in mesh.axis_names)


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str) -> int:
  """Returns the per-device batch, or fails with what to change."""
  n = num_batch_shards(mesh)
  if global_batch_size <= 0 or global_batch_size % n:
    sizes = ' x '.join(f'{a} {mesh.shape[a]}' for a in batch_axes(mesh))
    raise ValueError(
        f'{what}={global_batch_size} does not divide across the {n} devices '
        f'of the mesh (batch split over {sizes}; {jax.process_count()} '
        f'process(es)): set {what} to a multiple of {n}')
  return global_batch_size // n


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded array as one numpy array on every process (a plain
  device_get only sees this process's shards on a multi-host run)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
