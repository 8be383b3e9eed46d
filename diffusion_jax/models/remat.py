"""Activation checkpointing (remat) of whole blocks, by config.model.remat.

Backpropagation keeps every intermediate of the forward pass; for big
models at big batches those activations, not the parameters, fill a
device. Wrapping each block in `nn.remat` (jax.checkpoint) keeps only what
its policy saves and recomputes the rest in the backward pass (Chen et al.
2016, "Training deep nets with sublinear memory cost"):

  'none'           keep everything (fastest; the default);
  'dots_saveable'  keep the matmul/convolution outputs, recompute the
                   cheap elementwise ops between them (norms, swish, adds):
                   most of the speed, part of the memory back;
  'full'           keep only each block's inputs and recompute the whole
                   block (the least memory, about one more forward pass).

Parameter names do not change (a wrapped block keeps its name), so
checkpoints move freely between policies; values are equal up to float
reassociation of the recomputed ops. Measured per policy in BENCHMARKS.md
(benchmarks/remat_memory.py).
"""

import flax.linen as nn
import jax

POLICIES = {
    'none': None,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}


def checkpointed(block: type[nn.Module], remat: str,
                 static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`block` itself for remat='none', else nn.remat(block) with the
  policy. static_argnums counts the module as argument 0 (Python values the
  block branches on, e.g. a `train` flag, must be static)."""
  if remat not in POLICIES:
    raise ValueError(f'config.model.remat={remat!r}: use one of '
                     f'{", ".join(map(repr, POLICIES))}')
  if remat == 'none':
    return block
  return nn.remat(block, policy=POLICIES[remat],
                  static_argnums=static_argnums)
