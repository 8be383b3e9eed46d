"""DC-GAN as a method: a generator and a discriminator, two Adams.

Goodfellow et al. 2014's minimax game (eq. 1) with D = sigmoid(logit),
written with softplus on logits (-log sigmoid(l) = softplus(-l), -log(1 -
sigmoid(l)) = softplus(l)) so that no probability is rounded to 0 or 1:

  discriminator: L_D = E_x[-log D(x)] + E_z[-log(1 - D(G(z)))]
  generator:     L_G = E_z[-log D(G(z))]  (non-saturating, sec. 3)

The minimax generator loss E_z[log(1 - D(G(z)))] has gradient -D(G(z))
with respect to the fake logit, which vanishes early in training when D
rejects the samples confidently; the non-saturating loss has gradient
-(1 - D(G(z))), near -1 there (Goodfellow et al. sec. 3; tests/test_gan.py).
Optional R1 penalty (Mescheder et al. 2018, eq. 9): gamma/2 E_x ||grad_x
logit(x)||^2 on real data, added to L_D.

Each train step, on one batch, as DC-GAN's reference code: one generator
forward pass G(z), one discriminator update on (x, G(z)), then one
generator update through the updated discriminator, reusing that forward
pass (its linearisation), so the generator's BatchNorm statistics update
once per step. Sampling and evaluation use an EMA of the generator's
parameters (Karras et al. 2018, sec. A.1: decay 0.999); with BatchNorm the
EMA generator keeps its own running statistics, updated by a forward pass of
the EMA parameters on the step's z (the live generator's statistics belong
to other weights). The RNG is key(seed) folded with the step, so a resumed
run draws the same z (exact resume).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import visualization
from diffusion_jax.methods.base import Method, require_float32_params
from diffusion_jax.models import dcgan
from diffusion_jax.train_state import ema_update

# Eval mode's interpolation.png: rows of pairs (z0, z1), columns of steps.
INTERPOLATION_PAIRS, INTERPOLATION_STEPS = 8, 10


@flax.struct.dataclass
class GanState:
  """Everything a run needs to continue; the RNG is derived from (seed,
  step). None where a choice leaves nothing to keep."""
  step: jax.Array
  gen_params: Any
  gen_opt_state: Any
  # The generator's BatchNorm running statistics (generator_norm='batch').
  gen_stats: Any
  disc_params: Any
  disc_opt_state: Any
  # The discriminator's power-iteration vectors u (spectral_norm=True).
  disc_spectral: Any
  # EMA of gen_params, and (BatchNorm) the EMA generator's own statistics:
  # what sampling and evaluation use.
  ema_params: Any
  ema_stats: Any


def discriminator_loss(logits_real: jax.Array,
                       logits_fake: jax.Array) -> jax.Array:
  """E[-log D(x)] + E[-log(1 - D(G(z)))] (Goodfellow et al. eq. 1, negated)
  of logits (B,)."""
  return (jnp.mean(jax.nn.softplus(-logits_real))
          + jnp.mean(jax.nn.softplus(logits_fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """The non-saturating E[-log D(G(z))] of logits (B,): what G minimises."""
  return jnp.mean(jax.nn.softplus(-logits_fake))


def minimax_generator_loss(logits_fake: jax.Array) -> jax.Array:
  """E[log(1 - D(G(z)))], the generator's side of eq. 1 (saturating; not
  trained with, kept to state the difference, see the module docstring)."""
  return -jnp.mean(jax.nn.softplus(logits_fake))


def _adam(learning_rate: float, b1: float, b2: float, eps: float,
          clip: float) -> optax.GradientTransformation:
  """Adam at a constant learning rate (DC-GAN sec. 4: 2e-4, beta_1 0.5)."""
  chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  return optax.chain(*chain, optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def _fitting_levels(image_size: int) -> str:
  """The generator depths that output image_size, for error messages."""
  fits = [f'{n} (base {image_size >> n}x{image_size >> n})'
          for n in range(1, 6) if dcgan.generator_base_size(image_size, n)]
  return ', '.join(fits) or 'none: use an even image size'


def _check_config(config) -> None:
  """ValueError naming the key, its value and a fix, before compiling."""
  g, data = config.gan, config.data
  require_float32_params(config, 'gan')
  if config.model.num_classes:
    raise ValueError(
        f'config.model.num_classes={config.model.num_classes}: the gan '
        'method is unconditional (its data batches carry no labels); set '
        'config.model.num_classes=0')
  if config.grad_accum_steps != 1:
    raise ValueError(
        f'config.grad_accum_steps={config.grad_accum_steps}: the gan method '
        'does not accumulate gradients (each step is two updates on one '
        'batch); set it to 1')
  if config.posthoc_ema.sigma_rels:
    raise ValueError(
        'config.posthoc_ema.sigma_rels is not supported by config.method='
        "'gan' (its state has no power EMAs): set it to ()")
  for key in ('z_dim',):
    if isinstance(g[key], bool) or not isinstance(g[key], int) or g[key] < 1:
      raise ValueError(f'config.gan.{key}={g[key]!r} must be an integer '
                       '>= 1 (DC-GAN: 100)')
  for key in ('generator_widths', 'discriminator_widths'):
    widths = tuple(g[key])
    if not widths or any(isinstance(w, bool) or not isinstance(w, int)
                         or w < 1 for w in widths):
      raise ValueError(f'config.gan.{key}={widths!r}: give one positive '
                       'integer width per level, e.g. (128, 64)')
  for key, choices in (('generator_norm', dcgan.GENERATOR_NORMS),
                       ('discriminator_norm', dcgan.DISCRIMINATOR_NORMS)):
    if g[key] not in choices:
      raise ValueError(f'config.gan.{key}={g[key]!r}: use one of {choices}')
  for key in ('gen_learning_rate', 'disc_learning_rate', 'r1_gamma'):
    if not g[key] >= 0:
      raise ValueError(f'config.gan.{key}={g[key]!r} must be >= 0')
  for key in ('adam_b1', 'adam_b2', 'ema_decay'):
    if not 0 <= g[key] < 1:
      raise ValueError(f'config.gan.{key}={g[key]!r} must be in [0, 1)')
  levels = len(g.generator_widths)
  if dcgan.generator_base_size(data.image_size, levels) is None:
    raise ValueError(
        f'the generator of config.gan.generator_widths='
        f'{tuple(g.generator_widths)} doubles the side {levels} times, so it '
        f'outputs multiples of {2 ** levels}, not config.data.image_size='
        f'{data.image_size}: give generator_widths one of these numbers of '
        f'widths: {_fitting_levels(data.image_size)}')


class GanMethod(Method):
  """DC-GAN trained with the non-saturating loss; samples G_ema(z)."""

  name = 'gan'

  def __init__(self, *, generator: dcgan.Generator,
               discriminator: dcgan.Discriminator, z_dim: int,
               image_shape: tuple[int, ...], r1_gamma: float,
               gen_optimizer: optax.GradientTransformation,
               disc_optimizer: optax.GradientTransformation,
               ema_decay: float, ema_warmup: bool, seed: int,
               diagnose_thresholds: tuple[float, float, float] | None = None,
               learning_rates: tuple[float, float] = (0.0, 0.0)):
    self.generator, self.discriminator = generator, discriminator
    self.z_dim = z_dim
    self.image_shape = tuple(image_shape)
    self.r1_gamma = r1_gamma
    self.gen_optimizer, self.disc_optimizer = gen_optimizer, disc_optimizer
    self.ema_decay, self.ema_warmup = ema_decay, ema_warmup
    self.seed = seed
    # (d_real above, d_fake below, g_loss above), or None: never diagnose.
    self.diagnose_thresholds = diagnose_thresholds
    self.learning_rates = learning_rates  # (generator, discriminator): logs

  @classmethod
  def from_config(cls, config) -> 'GanMethod':
    """The method of config.gan (config_checks does not know its keys: they
    are checked here, before anything compiles); Adam's eps and gradient
    clipping are config.optim's, the EMA warm-up optim.ema_warmup."""
    g, optim, data = config.gan, config.optim, config.data
    _check_config(config)
    widths = tuple(g.generator_widths)
    base = dcgan.generator_base_size(data.image_size, len(widths))
    thresholds = (g.diagnose_d_real_above, g.diagnose_d_fake_below,
                  g.diagnose_g_loss_above) if g.diagnose else None
    adam = lambda lr: _adam(lr, g.adam_b1, g.adam_b2, optim.adam_eps,
                            optim.grad_clip_norm)
    return cls(
        generator=dcgan.Generator(widths=widths, base=base,
                                  channels=data.channels,
                                  norm=g.generator_norm),
        discriminator=dcgan.Discriminator(
            widths=tuple(g.discriminator_widths), norm=g.discriminator_norm,
            spectral_norm=g.spectral_norm),
        z_dim=g.z_dim, image_shape=(data.image_size, data.image_size,
                                    data.channels),
        r1_gamma=g.r1_gamma, gen_optimizer=adam(g.gen_learning_rate),
        disc_optimizer=adam(g.disc_learning_rate), ema_decay=g.ema_decay,
        ema_warmup=optim.ema_warmup, seed=config.seed,
        diagnose_thresholds=thresholds,
        learning_rates=(g.gen_learning_rate, g.disc_learning_rate))

  def describe(self) -> str:
    g, d = self.generator, self.discriminator
    return (f'gan: DC-GAN, z_dim {self.z_dim}, generator {g.norm} norm '
            f'{g.base}x{g.base}x{g.widths[0]} -> widths {g.widths}, '
            f'discriminator widths {d.widths} ({d.norm} norm'
            f'{", spectral norm" if d.spectral_norm else ""}), R1 gamma '
            f'{self.r1_gamma:g}')

  # ------------------------------------------------------------ networks --

  def init(self, rng: jax.Array) -> GanState:
    g_rng, d_rng = jax.random.split(rng)
    g_vars = self.generator.init(g_rng, jnp.zeros((1, self.z_dim)))
    d_vars = self.discriminator.init(
        d_rng, jnp.zeros((1, *self.image_shape), jnp.float32))
    g_params, d_params = g_vars['params'], d_vars['params']
    stats = g_vars.get(dcgan.BATCH_STATS)
    return GanState(
        step=jnp.zeros((), jnp.int32), gen_params=g_params,
        gen_opt_state=self.gen_optimizer.init(g_params), gen_stats=stats,
        disc_params=d_params,
        disc_opt_state=self.disc_optimizer.init(d_params),
        disc_spectral=d_vars.get(dcgan.SPECTRAL), ema_params=g_params,
        ema_stats=stats)

  def generate(self, params, stats, z, train: bool):
    """(images (B, H, W, C), updated BatchNorm statistics) of z (B, z_dim);
    train=True normalises with the batch's statistics and updates them."""
    variables = {'params': params}
    if stats is None:
      return self.generator.apply(variables, z, train=train), None
    variables[dcgan.BATCH_STATS] = stats
    if not train:
      return self.generator.apply(variables, z, train=False), stats
    images, updates = self.generator.apply(variables, z, train=True,
                                           mutable=[dcgan.BATCH_STATS])
    return images, updates[dcgan.BATCH_STATS]

  def discriminate(self, params, spectral, images, update_stats=False):
    """(logits (B,), power-iteration vectors, updated with update_stats)."""
    variables = {'params': params}
    if spectral is None:
      return self.discriminator.apply(variables, images), None
    variables[dcgan.SPECTRAL] = spectral
    logits, updates = self.discriminator.apply(
        variables, images, update_stats=update_stats,
        mutable=[dcgan.SPECTRAL])
    return logits, updates[dcgan.SPECTRAL]

  # ------------------------------------------------------------ training --

  def discriminator_terms(self, params, spectral, real, fake):
    """(L_D + R1, (D(x) mean, D(G(z)) mean, E||grad_x logit||^2, u)).

    The squared input gradient of the real logits is always measured (a
    sharpness diagnostic); it enters the loss only when r1_gamma > 0.
    Each image's logit depends on its image alone (no BatchNorm in D), so
    the gradient of their sum with respect to the batch is the per-image
    gradients."""
    logits_real, vjp_fn, new_spectral = jax.vjp(
        lambda x: self.discriminate(params, spectral, x, update_stats=True),
        real, has_aux=True)
    (grad_x,) = vjp_fn(jnp.ones_like(logits_real))
    r1 = jnp.mean(jnp.sum(jnp.square(grad_x), axis=tuple(
        range(1, grad_x.ndim))))
    # The same params and stored u: the same sigma as the real call.
    logits_fake, _ = self.discriminate(params, spectral, fake)
    loss = discriminator_loss(logits_real, logits_fake)
    if self.r1_gamma > 0:
      loss = loss + 0.5 * self.r1_gamma * r1  # Mescheder et al. eq. 9
    return loss, (jnp.mean(jax.nn.sigmoid(logits_real)),
                  jnp.mean(jax.nn.sigmoid(logits_fake)), r1, new_spectral)

  def _ema_decay_at(self, step):
    """min(decay, (1 + n) / (10 + n)) with ema_warmup (OneOptimizerMethod's
    schedule), else the constant decay."""
    if not self.ema_warmup:
      return self.ema_decay
    n = step.astype(jnp.float32)
    return jnp.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))

  def train_step(self, state: GanState, images):
    rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
    z = jax.random.normal(rng, (images.shape[0], self.z_dim))
    # G(z) once, linearised: a constant for D's update, then pulled back
    # through the updated D for G's.
    fake, g_pullback, gen_stats = jax.vjp(
        lambda p: self.generate(p, state.gen_stats, z, train=True),
        state.gen_params, has_aux=True)

    (d_loss, (d_real, d_fake, r1, spectral)), d_grads = jax.value_and_grad(
        self.discriminator_terms, has_aux=True)(
            state.disc_params, state.disc_spectral, images,
            jax.lax.stop_gradient(fake))
    d_updates, disc_opt_state = self.disc_optimizer.update(
        d_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)

    g_loss, grad_fake = jax.value_and_grad(
        lambda x: generator_loss(self.discriminate(disc_params, spectral,
                                                   x)[0]))(fake)
    (g_grads,) = g_pullback(grad_fake)
    g_updates, gen_opt_state = self.gen_optimizer.update(
        g_grads, state.gen_opt_state, state.gen_params)
    gen_params = optax.apply_updates(state.gen_params, g_updates)

    ema_params = ema_update(state.ema_params, gen_params,
                            self._ema_decay_at(state.step))
    ema_stats = state.ema_stats
    if ema_stats is not None:  # the EMA generator's own BatchNorm statistics
      _, ema_stats = self.generate(ema_params, ema_stats, z, train=True)
    new_state = state.replace(
        step=state.step + 1, gen_params=gen_params,
        gen_opt_state=gen_opt_state, gen_stats=gen_stats,
        disc_params=disc_params, disc_opt_state=disc_opt_state,
        disc_spectral=spectral, ema_params=ema_params, ema_stats=ema_stats)
    metrics = {'loss': g_loss, 'g_loss': g_loss, 'd_loss': d_loss,
               'd_real': d_real, 'd_fake': d_fake, 'r1': r1,
               'g_grad_norm': optax.tree.norm(g_grads),
               'd_grad_norm': optax.tree.norm(d_grads)}
    return new_state, metrics

  def diagnose(self, metrics_means: dict) -> str | None:
    """A message when the discriminator has won outright over a logging
    interval: D(x) ~ 1 on real and D(G(z)) ~ 0 on generated images with the
    generator's loss high. G's gradient then comes from a D that is
    saturated near its samples, and DC-GAN training rarely recovers from
    there."""
    if self.diagnose_thresholds is None:
      return None
    real_above, fake_below, g_above = self.diagnose_thresholds
    m = metrics_means
    if not (m.get('d_real', 0.0) > real_above and
            m.get('d_fake', 1.0) < fake_below and
            m.get('g_loss', 0.0) > g_above):
      return None
    return (
        f'the discriminator won: mean D(x) {m["d_real"]:.4f}, D(G(z)) '
        f'{m["d_fake"]:.1e}, generator loss {m["g_loss"]:.2f} (config.gan.'
        'diagnose_* thresholds). Fixes: lower config.gan.disc_learning_rate '
        f'({self.learning_rates[1]:g}), an R1 penalty (config.gan.r1_gamma='
        f'{self.r1_gamma:g}; try 1-10) or config.gan.spectral_norm=True (a '
        'new work directory)')

  # ------------------------------------------------- sampling, evaluation --

  def sample_params(self, state: GanState):
    """The EMA generator: {'params': ...} and, with BatchNorm, 'stats': its
    running statistics (no None leaf: the trainer's parameter count reads
    every value)."""
    if state.ema_stats is None:
      return {'params': state.ema_params}
    return {'params': state.ema_params, 'stats': state.ema_stats}

  def noise_shape(self, num: int) -> tuple[int, ...]:
    return (num, self.z_dim)

  def sample(self, params, noise, rng):
    """G_ema(z) for z = noise (B, z_dim): images (B, H, W, C) in [-1, 1]
    (tanh); BatchNorm with the EMA generator's running statistics."""
    del rng  # one deterministic network call
    return self.generate(params['params'], params.get('stats'), noise,
                         train=False)[0]

  def network_calls(self) -> int:
    return 1

  def interpolate(self, params, z0: jax.Array, z1: jax.Array,
                  steps: int) -> jax.Array:
    """Pure: images (P, steps, H, W, C) of G_ema along the great circle
    from z0 (P, z_dim) to z1 (P, z_dim), t = 0, 1/(steps-1), ..., 1."""
    zs = dcgan.slerp(z0, z1, jnp.linspace(0.0, 1.0, steps))  # (P, steps, z_dim)
    images = self.sample(params, zs.reshape(-1, self.z_dim), None)
    return images.reshape(z0.shape[0], steps, *images.shape[1:])

  def write_eval_figures(self, params, out_dir, rng) -> None:
    """interpolation.png: INTERPOLATION_PAIRS rows of two random z and
    INTERPOLATION_STEPS images between them (DC-GAN sec. 6.1: smooth
    transitions, not memorisation). Host copies of params: eval mode calls
    this on process 0 only, so nothing may run on the global mesh."""
    params = jax.device_get(params)
    z0, z1 = jax.random.normal(rng, (2, INTERPOLATION_PAIRS, self.z_dim))
    images = jax.jit(self.interpolate, static_argnums=3)(
        params, z0, z1, INTERPOLATION_STEPS)
    tiles = visualization.to_uint8(np.asarray(images).reshape(
        -1, *self.image_shape))
    visualization.save_png(
        str(out_dir / 'interpolation.png'),
        visualization.make_grid(tiles, ncols=INTERPOLATION_STEPS))
