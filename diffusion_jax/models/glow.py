"""Glow's multi-scale flow (Kingma & Dhariwal 2018, sec. 3 and Fig. 2).

    x (H, W, C) -> squeeze -> [K flow steps -> split]  x (L - 1)
                           -> K flow steps -> top prior

Each flow step is actnorm -> invertible 1x1 convolution (or a fixed
permutation) -> coupling (models/glow_layers.py). After every level but
the last, half of the channels are factored out with a learned prior
conditioned on the kept half (RealNVP's multi-scale architecture; openai's
split2d) and the kept half is squeezed again, as openai/glow orders it:
one squeeze before the first level, then one after each split, so the
image size must be divisible by 2^L.

`Glow.__call__` (x -> latents, logdet) and `Glow.inverse` (latents -> x,
logdet) are pure functions of the parameters. The latents are the eps of
each prior: (z - mean) / scale, standard normal under the model; the
priors' scales are in logdet, so

    log p(x) = sum_i log N(eps_i; 0, I) + logdet        (paper eq. 1-3)

and sampling at temperature T is inverse(T * eps), eps ~ N(0, I), as
openai's pz.sample2(eps_std * eps).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import glow_layers as layers


class FlowStep(nn.Module):
  """One step of flow (paper Fig. 2a): actnorm, channel mixing, coupling.
  (B, H, W, C) -> ((B, H, W, C), logdet (B,)); reverse runs the inverses in
  the opposite order. `seed` fixes a 'shuffle' permutation or the LU
  factorisation's P (glow_layers.InvConv1x1LU)."""
  hidden_channels: int
  coupling: str = 'affine'
  permutation: str = 'invconv'
  seed: int = 0

  @nn.compact
  def __call__(self, x, reverse: bool = False, data_init: bool = False):
    steps = [layers.ActNorm(name='actnorm'),
             layers.permutation_layer(self.permutation, self.seed, 'mix'),
             layers.Coupling(self.hidden_channels, self.coupling,
                             name='coupling')]
    logdet = jnp.zeros(x.shape[:1], x.dtype)
    for layer in (steps[::-1] if reverse else steps):
      x, step_logdet = layer(x, reverse=reverse, data_init=data_init)
      logdet = logdet + step_logdet
    return x, logdet


def check_image_shape(image_shape, levels: int) -> None:
  """ValueError unless every level can squeeze (H and W divisible by 2^L)."""
  height, width = image_shape[:2]
  if levels < 1 or height % 2 ** levels or width % 2 ** levels:
    raise ValueError(f'a {height}x{width} image cannot be squeezed {levels} '
                     f'times: its size must be divisible by 2^{levels}')


def latent_shapes(image_shape, levels: int) -> list[tuple[int, int, int]]:
  """The (h, w, c) of each latent, factored-out levels first, the top one
  last; their sizes add up to H W C. Level i (0-based) works at
  (H / 2^(i+1), W / 2^(i+1), 4 C 2^i) and factors out half of it."""
  check_image_shape(image_shape, levels)
  height, width, channels = image_shape
  shapes = []
  for level in range(levels):
    h, w = height >> (level + 1), width >> (level + 1)
    c = 4 * channels * 2 ** level
    shapes.append((h, w, c // 2 if level < levels - 1 else c))
  return shapes


def split_latents(flat: jax.Array, shapes) -> list[jax.Array]:
  """(B, ...) with prod(...) = sum of the latents' sizes -> the latents."""
  flat = flat.reshape(flat.shape[0], -1)
  sizes = [math.prod(s) for s in shapes]
  if flat.shape[1] != sum(sizes):
    raise ValueError(f'{flat.shape[1]} numbers per example for latents of '
                     f'{sum(sizes)}')
  out, start = [], 0
  for size, shape in zip(sizes, shapes):
    out.append(flat[:, start:start + size].reshape(-1, *shape))
    start += size
  return out


def flatten_latents(latents) -> jax.Array:
  """The inverse of split_latents: the latents -> (B, D)."""
  return jnp.concatenate([z.reshape(z.shape[0], -1) for z in latents], 1)


class Glow(nn.Module):
  """Glow with L levels of K steps. x (B, H, W, C) -> (latents, logdet):
  latents as latent_shapes (standard normal under the model), logdet (B,)
  the log |det| of the Jacobian of x -> flatten_latents(latents)."""
  levels: int
  steps_per_level: int
  hidden_channels: int
  coupling: str = 'affine'
  permutation: str = 'invconv'
  learn_top: bool = False

  def setup(self):
    self.steps = [
        FlowStep(self.hidden_channels, self.coupling, self.permutation,
                 seed=i) for i in range(self.levels * self.steps_per_level)]
    self.priors = [layers.SplitPrior() for _ in range(self.levels - 1)]
    self.top = layers.TopPrior(self.learn_top)

  def _level_steps(self, level: int):
    k = self.steps_per_level
    return self.steps[level * k:(level + 1) * k]

  def __call__(self, x, data_init: bool = False):
    """data_init=True (with mutable=['params']): actnorm's data-dependent
    initialisation from this batch (glow_layers.ActNorm)."""
    h = layers.squeeze2d(x)
    logdet = jnp.zeros(x.shape[:1], x.dtype)
    latents = []
    for level in range(self.levels):
      for step in self._level_steps(level):
        h, step_logdet = step(h, data_init=data_init)
        logdet = logdet + step_logdet
      if level < self.levels - 1:
        half = h.shape[-1] // 2
        kept = h[..., :half]
        eps, prior_logdet = self.priors[level](kept, h[..., half:])
        latents.append(eps)
        logdet = logdet + prior_logdet
        h = layers.squeeze2d(kept)
    eps, prior_logdet = self.top(h)
    latents.append(eps)
    return latents, logdet + prior_logdet

  def inverse(self, latents):
    """latents (as latent_shapes) -> (x (B, H, W, C), logdet of this map:
    minus the forward one at x)."""
    h, logdet = self.top(latents[-1], reverse=True)
    for level in reversed(range(self.levels)):
      if level < self.levels - 1:
        kept = layers.unsqueeze2d(h)
        z_b, prior_logdet = self.priors[level](kept, latents[level],
                                               reverse=True)
        h = jnp.concatenate([kept, z_b], -1)
        logdet = logdet + prior_logdet
      for step in self._level_steps(level)[::-1]:
        h, step_logdet = step(h, reverse=True)
        logdet = logdet + step_logdet
    return layers.unsqueeze2d(h), logdet
