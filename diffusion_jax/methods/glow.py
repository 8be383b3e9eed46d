"""Glow as a method: exact likelihood of dequantised 8-bit images.

The flow (models/glow.py; Kingma & Dhariwal 2018) maps dequantised images
y to latents that are standard normal under the model; training minimises
the negative log-likelihood in bits/dim, eval mode reports the same number
on the eval split, sampling inverts the flow from tempered normal noise.

Dequantisation and bits/dim (openai/glow's preprocess and objective):
an image in [-1, 1] holds 8-bit levels k = (x + 1) / 2 * 255 (floored to
n_bits bits: k // 2^(8 - n_bits)); with u ~ U[0, 1)^D and n_bins =
2^n_bits the flow sees y = (k + u) / n_bins - 1/2 in [-1/2, 1/2)^D, one
bin of width 1/n_bins per level. The density of y relates to the
probability of the discrete image by P(k) >= exp(E_u[log p(y)]) /
n_bins^D (Jensen; Theis et al. 2016), so the per-draw estimate is

    bits/dim = (-log p(y) + D log n_bins) / (D ln 2),
    log p(y) = sum_i log N(eps_i; 0, I) + log |det d eps / d y|.

For D = H W C this is the convention of the paper's Table 2 (CIFAR-10:
3.35 bits/dim): a uniform density on [-1/2, 1/2)^D (log p = 0) scores
exactly n_bits = 8 bits/dim, the cost of storing the raw bytes.

Actnorm's data-dependent initialisation (paper sec. 3.1) needs a batch,
which Method.init does not get: init creates actnorm as the identity and
`train_step` at step 0 first runs the data pass on that step's
dequantised batch (lax.cond on the step, so the compiled step is one
program), then the ordinary update. The resulting parameters are part of
the checkpointed state, so a resumed run (step > 0) never re-initialises
and resumes exactly.
"""

import math

import jax
import jax.numpy as jnp

from diffusion_jax.methods.base import OneOptimizerMethod, one_optimizer_kwargs
from diffusion_jax.models import glow as glow_model
from diffusion_jax.models import glow_layers


def bits_per_dim(log_density: jax.Array, num_dims: int,
                 n_bits: int = 8) -> jax.Array:
  """-log2 P(k) / D from log p(y) of the dequantised y on [-1/2, 1/2)^D:
  (-log p(y) + D log 2^n_bits) / (D ln 2) (module docstring)."""
  return (-log_density / num_dims + n_bits * math.log(2.0)) / math.log(2.0)


def dequantize(images: jax.Array, rng: jax.Array, n_bits: int = 8
               ) -> jax.Array:
  """Images in [-1, 1] (8-bit levels) -> y = (k + u) / 2^n_bits - 1/2,
  u ~ U[0, 1), the flow's input (module docstring). Same shape."""
  levels = jnp.round((images.astype(jnp.float32) + 1.0) / 2.0 * 255.0)
  levels = jnp.floor(levels / 2 ** (8 - n_bits))
  noise = jax.random.uniform(rng, images.shape, jnp.float32)
  return (levels + noise) / 2 ** n_bits - 0.5


def quantize(y: jax.Array, n_bits: int = 8) -> jax.Array:
  """The flow's output y -> images in [-1, 1] on the 8-bit grid: the bin
  floor((y + 1/2) 2^n_bits), clipped to the valid ones, scaled to 8 bits
  as openai/glow's postprocess. A sample whose inverse overflowed (exp of
  a coupling's scale far in the tails at temperature 1, common early in
  training, rare once trained) has +-inf pixels clipped to the end bins
  and keeps its NaN ones, so sample mode and sample quality count them
  (visualization.nonfinite_samples) before drawing them mid-grey."""
  n_bins = 2 ** n_bits
  level = jnp.clip(jnp.floor((y + 0.5) * n_bins), 0, n_bins - 1)
  return (2.0 * level * (256 // n_bins) - 255.0) / 255.0  # exactly +-1 at ends


def _standard_normal_log_density(latents) -> jax.Array:
  """sum over the latents of log N(eps; 0, I), per example (B,)."""
  flat = glow_model.flatten_latents(latents)
  return -0.5 * jnp.sum(jnp.square(flat) + math.log(2 * math.pi), axis=1)


class GlowMethod(OneOptimizerMethod):
  """Trains Glow by maximum likelihood (the loss is bits/dim)."""

  name = 'glow'

  def __init__(self, *, model: glow_model.Glow, image_shape, n_bits: int = 8,
               temperature: float = 1.0, **optim):
    super().__init__(**optim)
    self.model = model
    self.image_shape = tuple(image_shape)
    self.n_bits, self.temperature = n_bits, temperature
    self.latent_shapes = glow_model.latent_shapes(self.image_shape,
                                                  model.levels)

  @classmethod
  def from_config(cls, config) -> 'GlowMethod':
    """The method of config.glow, config.data's image shape and
    config.optim; bad values named with a fix."""
    g, data = config.glow, config.data
    if config.model.num_classes:
      raise ValueError(
          f'config.model.num_classes={config.model.num_classes}: '
          "config.method='glow' is unconditional (Glow's y-conditioning is "
          'not implemented); set config.model.num_classes=0')
    for key in ('levels', 'steps_per_level', 'hidden_channels'):
      if isinstance(g[key], bool) or not isinstance(g[key], int) or g[key] < 1:
        raise ValueError(f'config.glow.{key}={g[key]!r} must be an integer '
                         '>= 1')
    if g.coupling not in glow_layers.COUPLINGS:
      raise ValueError(f'config.glow.coupling={g.coupling!r}: use one of '
                       f'{", ".join(map(repr, glow_layers.COUPLINGS))}')
    if g.permutation not in glow_layers.PERMUTATIONS:
      raise ValueError(f'config.glow.permutation={g.permutation!r}: use one '
                       f'of {", ".join(map(repr, glow_layers.PERMUTATIONS))}')
    if not (math.isfinite(g.temperature) and g.temperature >= 0):
      raise ValueError(f'config.glow.temperature={g.temperature!r} must be '
                       '>= 0 (1: the model\'s distribution; Glow shows '
                       'samples at 0.7)')
    if g.n_bits not in range(1, 9):
      raise ValueError(f'config.glow.n_bits={g.n_bits!r}: use 1..8 (8: the '
                       'data as it is; Glow\'s CelebA-HQ: 5)')
    check_levels(data.image_size, g.levels)
    model = glow_model.Glow(
        levels=g.levels, steps_per_level=g.steps_per_level,
        hidden_channels=g.hidden_channels, coupling=g.coupling,
        permutation=g.permutation, learn_top=g.learn_top)
    return cls(
        model=model,
        image_shape=(data.image_size, data.image_size, data.channels),
        n_bits=g.n_bits, temperature=g.temperature,
        **one_optimizer_kwargs(config))

  def describe(self) -> str:
    m = self.model
    return (f'glow: L={m.levels} levels x K={m.steps_per_level} steps, '
            f'{m.coupling} coupling, {m.permutation}, {m.hidden_channels} '
            f'hidden channels, {self.n_bits}-bit data')

  # ------------------------------------------------------------ networks --

  def init_params(self, rng):
    """Data-free: actnorm starts as the identity (module docstring)."""
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.model.init(rng, x)['params']

  def data_init(self, params, y: jax.Array):
    """params with every actnorm set from the batch y (B, H, W, C) of
    dequantised images (glow_layers.ActNorm): its outputs on y then have
    zero mean and unit variance per channel."""
    _, variables = self.model.apply({'params': params}, y, data_init=True,
                                    mutable=['params'])
    return variables['params']

  def log_density(self, params, y: jax.Array) -> dict:
    """Per-example (B,) log N(eps) and log-determinant of y -> eps."""
    latents, logdet = self.model.apply({'params': params}, y)
    return {'log_prior': _standard_normal_log_density(latents),
            'logdet': logdet}

  def bits_per_dim_terms(self, params, y: jax.Array) -> dict:
    """(B,) arrays: total_bpd = prior_bpd + logdet_bpd + n_bits, the
    terms -log N(eps) / (D ln 2) and -logdet / (D ln 2)."""
    d = math.prod(self.image_shape)
    terms = self.log_density(params, y)
    return {'total_bpd': bits_per_dim(terms['log_prior'] + terms['logdet'],
                                      d, self.n_bits),
            'prior_bpd': -terms['log_prior'] / (d * math.log(2.0)),
            'logdet_bpd': -terms['logdet'] / (d * math.log(2.0))}

  # ------------------------------------------------------------ training --

  def draw(self, batch, rng, aux_state):
    """The dequantised batch: fresh uniform noise at every step."""
    del aux_state
    return dequantize(batch, rng, self.n_bits)

  def loss(self, params, y, rng):
    """Mean bits/dim of the dequantised batch (a non-finite logdet makes
    it non-finite, which stops the trainer)."""
    del rng  # the flow is deterministic
    bpd = self.bits_per_dim_terms(params, y)['total_bpd']
    return jnp.mean(bpd), bpd

  def _step_draw_rng(self, step):
    # OneOptimizerMethod.train_step's split: the draw of the same step.
    rng = jax.random.fold_in(jax.random.key(self.seed), step)
    return jax.random.split(rng)[0]

  def data_init_state(self, state, batch):
    """state with actnorm initialised from this step's dequantised batch,
    in the parameters and every EMA of them (they equal the parameters
    at step 0)."""
    y = self.draw(batch, self._step_draw_rng(state.step), None)
    params = self.data_init(state.params, y)
    power_ema = (None if state.power_ema is None
                 else tuple(params for _ in state.power_ema))
    return state.replace(params=params, ema_params=params,
                         power_ema=power_ema)

  def train_step(self, state, batch):
    state = jax.lax.cond(state.step == 0, self.data_init_state,
                         lambda s, _: s, state, batch)
    return super().train_step(state, batch)

  # ------------------------------------------------- sampling, evaluation --

  def latents_from_noise(self, noise: jax.Array) -> list[jax.Array]:
    """noise of noise_shape(n) -> the per-level latents, times the
    temperature."""
    return glow_model.split_latents(noise * self.temperature,
                                    self.latent_shapes)

  def sample(self, params, noise, rng):
    """inverse(T eps), eps the noise (n, H, W, C) split into the levels'
    latents; quantised to the 8-bit grid, so in [-1, 1] (or NaN where
    the inverse overflowed, see quantize)."""
    del rng  # the flow is deterministic
    y, _ = self.model.apply({'params': params},
                            self.latents_from_noise(noise),
                            method=glow_model.Glow.inverse)
    return quantize(y, self.n_bits)

  def network_calls(self) -> int:
    return 1  # one inverse pass

  def log_likelihood(self, params, images, rng) -> dict:
    """Per-image bits/dim of one dequantisation draw (an upper bound on
    -log2 P(image) / D in expectation) and its terms."""
    return self.bits_per_dim_terms(params,
                                   dequantize(images, rng, self.n_bits))


def check_levels(image_size: int, levels: int) -> None:
  """ValueError naming config.data.image_size and config.glow.levels unless
  each of the L levels can halve the image (2x2 squeeze)."""
  if image_size % 2 ** levels == 0:
    return
  working = [n for n in range(1, levels) if image_size % 2 ** n == 0]
  fix = (f'use config.glow.levels in 1..{working[-1]} for this size'
         if working else 'no number of levels works for an odd size')
  raise ValueError(
      f'config.data.image_size={image_size} cannot be squeezed '
      f'config.glow.levels={levels} times: each level halves the image '
      f'(2x2 space-to-depth), so it must be divisible by 2^{levels}='
      f'{2 ** levels}: {fix}, or an image size that is a multiple of '
      f'{2 ** levels} (e.g. {2 ** levels * max(1, -(-image_size // 2 ** levels))}'
      "; config.data.resize='pad' pads smaller images)")
