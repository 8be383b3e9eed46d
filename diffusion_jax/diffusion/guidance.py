"""Classifier-free guidance (Ho & Salimans 2022).

One network trained with labels dropped to a null class now and then is
both p(x | y) and p(x); sampling follows

  f_guided = (1 + w) f(x, t, y) - w f(x, t, null)

for whatever the network predicts (eps, x0, v, velocity: all are affine in
the score, so the combination is the guided score in any of them). w = 0 is
plain conditional sampling. The condition is a class label or a caption
(a context sequence whose null is the learned null sequence).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

# apply_fn(x, t, y) -> network output; y (B,) int labels or None.
ApplyFn = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


def class_labels(num: int, num_classes: int, class_label: int = -1
                 ) -> jax.Array:
  """Labels of a sample batch: all `class_label`, or (class_label < 0)
  0, 1, ..., K-1, 0, 1, ... so a grid shows every class in turn. A function
  of the batch position only, so samples do not depend on the mesh."""
  if class_label >= num_classes:
    raise ValueError(f'config.sample.class_label={class_label} is not a class '
                     f'of this model (0..{num_classes - 1}, or -1 for all)')
  if class_label >= 0:
    return jnp.full((num,), class_label, jnp.int32)
  return jnp.arange(num, dtype=jnp.int32) % num_classes


def guided_model(apply_fn: ApplyFn, labels: jax.Array, *, null_label: int,
                 scale: float | jax.Array, channels: int):
  """(x, t) -> the guided output of a class-conditional network, in ONE
  network call per step; `scale` is one w, or one per example ((B,): a
  guided distillation teacher's). See guided_condition."""
  return guided_condition(apply_fn, labels, jnp.full_like(labels, null_label),
                          scale=scale, channels=channels)


def guided_condition(apply_fn: Callable[[jax.Array, jax.Array, Any],
                                        jax.Array],
                     cond: Any, null: Any, *, scale: float | jax.Array,
                     channels: int):
  """(x, t) -> (1 + w) f(x, t, cond) - w f(x, t, null) in ONE network call
  per step, for any condition pytree whose leaves have the batch as leading
  axis: labels (B,), or a caption's (context (B, L[, D]), mask (B, L)) with
  null its all-False mask (the null sequence, models/text.py).

  The conditional and unconditional inputs are interleaved row by row
  (x_0, x_0, x_1, x_1, ...) into a batch of 2B rather than concatenated:
  with the batch sharded over devices, each device then evaluates its own
  rows twice and no data moves between devices. Only the first `channels`
  output channels (the mean prediction) are guided; a learned variance
  (extra channels) is taken from the conditional half.
  """
  if isinstance(scale, (int, float)) and scale == 0.0:
    return lambda x, t: apply_fn(x, t, cond)

  def guided(x, t):
    twice = lambda a: jnp.repeat(a, 2, axis=0)
    both = jax.tree.map(
        lambda c, u: jnp.stack([c, u], axis=1).reshape(-1, *c.shape[1:]),
        cond, null)
    out = apply_fn(twice(x), twice(t), both)
    out = out.reshape(x.shape[0], 2, *out.shape[1:])
    cond_out, uncond = out[:, 0], out[:, 1]
    w = jnp.reshape(scale, jnp.shape(scale) + (1,) * (cond_out.ndim - 1)
                    if jnp.ndim(scale) else ())
    mean = ((1.0 + w) * cond_out[..., :channels]
            - w * uncond[..., :channels])
    return jnp.concatenate([mean, cond_out[..., channels:]], axis=-1)

  return guided
