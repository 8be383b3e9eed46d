"""The train state sharded over the mesh's 'fsdp' axis (ZeRO-3 / FSDP).

Logical axis names, by rule. Every parameter gets the names Flax's
`nn.with_logical_partitioning` would attach to it, derived from its path and
shape here instead of written into each layer: every model, present and
future (U-Net, DiT, autoencoder, discriminator, MLP, text encoder, the other
families), is named without per-layer edits, and one table states the
project's convention:

  scalar ()                          -> ()                  (replicated)
  nn.Embed 'embedding' (V, D)        -> ('vocab', 'embed_out')
  vector (D,): bias, norm scale      -> ('vector',)
  dense kernel, table (I, O)         -> ('embed_in', 'embed_out')
  conv kernel (kh, kw, I, O)         -> ('conv_h', 'conv_w', 'embed_in',
                                          'embed_out'); (k, I, O) and
                                          (kd, kh, kw, I, O) alike

`logical_axis_rules` (config.mesh.logical_axis_rules, Flax's format: pairs
(logical name, mesh axis or None), first match wins, each mesh axis used
once per array) turn names into a PartitionSpec (`nn.logical_to_mesh_axes`).
The default shards 'embed_out' over 'fsdp' and, where the output width does
not divide (an RGB output conv (3, 3, 128, 3)), 'embed_in' instead: every
matrix and kernel is then split (memory / fsdp), while vectors stay
replicated (under 1% of the parameters; each would cost one latency-bound
all-gather per step). A parameter whose named dimensions the fsdp size
divides nowhere falls back to replication with one log line, or fails with
the sizes that would work when config.mesh.replicate_indivisible is False.

Which leaves are parameters: those whose last path entry is a dict key.
Flax parameters are nested dicts and optax's moments (mu, nu) mirror them,
so params, EMA params, power EMAs and Adam moments get the same sharding
leaf for leaf; the step, optax's counts and a method's aux state (dataclass
fields) are replicated.
"""

import dataclasses
import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import parallel

VOCAB, VECTOR, EMBED_IN, EMBED_OUT = 'vocab', 'vector', 'embed_in', 'embed_out'
_CONV = ('conv_d', 'conv_h', 'conv_w')

DEFAULT_RULES = ((EMBED_OUT, parallel.FSDP_AXIS),
                 (EMBED_IN, parallel.FSDP_AXIS))

Rules = tuple[tuple[str, Any], ...]


# ------------------------------------------------------- logical names --

def _key(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def is_parameter(path) -> bool:
  """A leaf of a Flax parameter dict (or of a tree mirroring one)."""
  return bool(path) and isinstance(path[-1], jax.tree_util.DictKey)


def param_name(path) -> str:
  """'blocks_0/attn/qkv/kernel': the trailing dict keys of a path (the same
  for a parameter, its EMA and its Adam moments)."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(_key(entry))
  return '/'.join(reversed(keys))


def logical_axes(path, shape: Sequence[int]) -> tuple[str, ...]:
  """The logical names of one parameter's dimensions (module docstring)."""
  ndim = len(shape)
  if ndim == 0:
    return ()
  if ndim == 1:
    return (VECTOR,)
  if ndim == 2 and path and _key(path[-1]) == 'embedding':
    return (VOCAB, EMBED_OUT)
  spatial = ndim - 2
  conv = (_CONV[len(_CONV) - spatial:] if spatial <= len(_CONV) else
          tuple(f'conv_{i}' for i in range(spatial)))
  return (*conv, EMBED_IN, EMBED_OUT)


def param_logical_axes(params) -> Any:
  """The tree of logical names of a parameter tree (leaf: tuple of str)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: logical_axes(p, _shape(x)), params)


def logically_partitioned(params) -> Any:
  """The parameters boxed as `nn.with_logical_partitioning` would box them
  (nn.LogicallyPartitioned): `nn.get_partition_spec` and
  `nn.logical_to_mesh_sharding` then apply to them as to Flax's own."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: nn.LogicallyPartitioned(x, logical_axes(p, _shape(x))),
      params)


# --------------------------------------------------------------- rules --

@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """config.mesh's logical_axis_rules and replicate_indivisible."""
  rules: Rules = DEFAULT_RULES
  replicate_indivisible: bool = True

  @classmethod
  def from_config(cls, mesh_config) -> 'ShardingRules':
    if mesh_config is None:
      return cls()
    rules = mesh_config.get('logical_axis_rules', DEFAULT_RULES)
    out = []
    for rule in rules:
      ok = (isinstance(rule, (tuple, list)) and len(rule) == 2
            and isinstance(rule[0], str))
      axes = _mesh_axes(rule[1]) if ok else ()
      if not ok or any(a not in parallel.MESH_AXES for a in axes):
        raise ValueError(
            f'config.mesh.logical_axis_rules={tuple(rules)!r}: each rule is '
            f'a pair (logical name, mesh axis), the axis one of '
            f'{parallel.MESH_AXES} or None, e.g. {DEFAULT_RULES!r}')
      out.append((rule[0], rule[1] if not isinstance(rule[1], list)
                  else tuple(rule[1])))
    return cls(tuple(out),
               bool(mesh_config.get('replicate_indivisible', True)))


def _mesh_axes(target) -> tuple[str, ...]:
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def partition_spec(name: str, shape: Sequence[int], names: Sequence[str],
                   mesh: Mesh, rules: ShardingRules) -> P:
  """The PartitionSpec of one parameter: the rules whose mesh axes exist in
  `mesh` with size > 1 and divide the named dimension, through
  nn.logical_to_mesh_axes. A mesh axis some rule wanted for this parameter
  but no dimension could take: one log line, or a ValueError."""
  usable, indivisible = [], []
  for logical, target in rules.rules:
    axes = tuple(a for a in _mesh_axes(target)
                 if mesh.shape.get(a, 1) > 1)
    if not axes:
      continue
    if logical in names:
      dim = shape[names.index(logical)]
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        indivisible.append((logical, dim, axes, size))
        continue
    usable.append((logical, axes[0] if len(axes) == 1 else axes))
  spec = nn.logical_to_mesh_axes(tuple(names), usable)
  taken = {a for entry in spec for a in _mesh_axes(entry)}
  missed = [x for x in indivisible if not set(x[2]) <= taken]
  if missed:
    logical, dim, axes, size = missed[0]
    keys = ' x '.join(f'config.mesh.{a}={mesh.shape[a]}' for a in axes)
    works = [d for d in range(1, dim + 1) if dim % d == 0]
    message = (f'parameter {name} {tuple(shape)}: its {logical} dimension '
               f'({dim}) does not split over {keys}, nor does any other '
               f'dimension the rules shard (sizes that divide {dim}: '
               f'{", ".join(map(str, works))})')
    if not rules.replicate_indivisible:
      raise ValueError(
          f'{message}. Use such a size, change config.mesh.'
          'logical_axis_rules, or set config.mesh.replicate_indivisible='
          'True to replicate it.')
    logging.info('%s: replicated.', message)
  # P() rather than P(None, ...): the very sharding parallel.replicated
  # gives, which jit accepts for an argument it expects replicated.
  return spec if taken else P()


def state_shardings(abstract_state, mesh: Mesh,
                    rules: ShardingRules = ShardingRules()) -> Any:
  """A NamedSharding for every leaf of a state (shapes suffice): parameter
  leaves by their logical names and the rules, the rest replicated. Logs
  (or raises for) each indivisible parameter once."""
  replicated = parallel.replicated(mesh)
  specs: dict[tuple[str, tuple[int, ...]], P] = {}

  def one(path, leaf):
    shape = _shape(leaf)
    if not is_parameter(path) or not shape:
      return replicated
    key = (param_name(path), shape)
    if key not in specs:  # an EMA or moment of a parameter seen already
      specs[key] = partition_spec(key[0], shape, logical_axes(path, shape),
                                  mesh, rules)
    return NamedSharding(mesh, specs[key])
  return jax.tree_util.tree_map_with_path(one, abstract_state)


# --------------------------------------------------------------- bytes --

def _part(path) -> str:
  """Which budget a state leaf counts to, by its top-level field."""
  top = _key(path[0]) if path else ''
  if 'opt' in top:
    return 'optimizer'
  if 'ema' in top:
    return 'ema'
  if 'params' in top:
    return 'params'
  return 'other'


def bytes_per_device(state, shardings=None) -> dict[str, int]:
  """{'params', 'ema', 'optimizer', 'other', 'total'}: the bytes one device
  holds of a state (live arrays, or shapes with `shardings`), from each
  leaf's shard shape; 'unsharded': the total a replicated state would
  hold."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, state)
  out = dict.fromkeys(('params', 'ema', 'optimizer', 'other'), 0)
  unsharded = 0
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
    itemsize = np.dtype(leaf.dtype).itemsize
    out[_part(path)] += math.prod(sharding.shard_shape(leaf.shape)) * itemsize
    unsharded += math.prod(leaf.shape) * itemsize
  out['total'] = sum(out.values())
  out['unsharded'] = unsharded
  return out


def describe_bytes(sizes: dict[str, int]) -> str:
  mib = lambda b: f'{b / 2**20:.2f} MiB'
  return (f'params {mib(sizes["params"])}, EMA {mib(sizes["ema"])}, '
          f'optimizer {mib(sizes["optimizer"])}, other '
          f'{mib(sizes["other"])}: {mib(sizes["total"])} per device of '
          f'{mib(sizes["unsharded"])} unsharded')
