"""Latent diffusion's KL autoencoder as a method: two networks, two optimizers.

The autoencoder (models/autoencoder.py, Rombach et al. 2022 sec. 3.1) is
trained against a patch discriminator (models/discriminator.py) with LDM's
LPIPSWithDiscriminator loss (methods/autoencoder_losses.py). Each train
step is taming-transformers' alternation on one batch (Esser et al. 2021;
PyTorch Lightning's two optimizers in LDM): first the autoencoder's update,
then the discriminator's on the batch and its reconstructions. Those are
the autoencoder step's own (stop-gradient), not recomputed after its
update as Lightning's second training_step does: one autoencoder forward
pass less per step, for a discriminator input one update staler.

The state holds both parameter sets and both Adam states with an int
`step`, so the trainer checkpoints and resumes it as any other. Sampling
decodes z ~ N(0, I) in the latent shape (poor images at kl_weight 1e-6:
q(z|x) is barely pulled to the prior; latent diffusion samples z instead);
evaluation reconstructs the eval split (posterior mean, models' mode()).
"""

from typing import Any

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax.methods import autoencoder_losses as losses
from diffusion_jax.methods.base import Method, require_float32_params
from diffusion_jax.models import autoencoder
from diffusion_jax.models.discriminator import PatchDiscriminator
from diffusion_jax.train_state import ema_update, learning_rate_schedule


@flax.struct.dataclass
class AutoencoderState:
  """Everything a run needs to continue; the RNG is derived from (seed,
  step)."""
  step: jax.Array
  # {'autoencoder': AutoencoderKL params, 'logvar': LDM's scalar log-scale
  # of the NLL}: what the autoencoder's optimizer updates.
  params: Any
  # EMA of params['autoencoder'] (diffusers' AutoencoderKL layout): what
  # sampling and evaluation use.
  ema_params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any


def _adam(learning_rate, b1: float, b2: float, eps: float, clip: float):
  chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  return optax.chain(*chain, optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def _last_layer(tree):
  """G_L of Esser et al. eq. 7: the decoder's output convolution's kernel."""
  return tree['autoencoder']['decoder']['conv_out']['kernel']


class AutoencoderMethod(Method):
  """Trains AutoencoderKL with reconstruction, KL and patch-GAN terms."""

  name = 'autoencoder'

  def __init__(self, *, model: autoencoder.AutoencoderKL,
               discriminator: PatchDiscriminator,
               image_shape: tuple[int, ...], kl_weight: float, rec_loss: str,
               learn_logvar: bool, logvar_init: float, disc_start: int,
               disc_weight: float, disc_loss: str,
               optimizer: optax.GradientTransformation,
               disc_optimizer: optax.GradientTransformation,
               learning_rate_fn, ema_decay: float, ema_warmup: bool,
               seed: int):
    self.model, self.discriminator = model, discriminator
    self.image_shape = tuple(image_shape)
    self.kl_weight, self.rec_loss = kl_weight, rec_loss
    self.learn_logvar, self.logvar_init = learn_logvar, logvar_init
    self.disc_start, self.disc_weight = disc_start, disc_weight
    self.disc_loss = disc_loss
    self.optimizer, self.disc_optimizer = optimizer, disc_optimizer
    self.learning_rate_fn = learning_rate_fn
    self.ema_decay, self.ema_warmup = ema_decay, ema_warmup
    self.seed = seed

  @classmethod
  def from_config(cls, config) -> 'AutoencoderMethod':
    """The method of config.autoencoder and config.optim (learning rate,
    warm-up, clipping, eps, EMA; the Adam betas are config.autoencoder's).
    Sizes were checked by config_checks (image size a multiple of f, the
    discriminator's logit map at least 1x1)."""
    a, optim, data = config.autoencoder, config.optim, config.data
    require_float32_params(config, 'autoencoder')
    if a.lpips_weights_path:
      raise ValueError(
          f'config.autoencoder.lpips_weights_path={a.lpips_weights_path!r}: '
          'the LPIPS perceptual loss (VGG16 features and linear heads) is '
          'not available yet; set it to "" to train without the term')
    if a.perceptual_weight > 0:
      logging.info('config.autoencoder.lpips_weights_path is empty: the '
                   'perceptual (LPIPS) term of weight %g is skipped.',
                   a.perceptual_weight)
    if config.posthoc_ema.sigma_rels:
      raise ValueError(
          'config.posthoc_ema.sigma_rels is not supported by config.method='
          "'autoencoder' (its state has no power EMAs): set it to ()")
    if config.grad_accum_steps != 1:
      raise ValueError(
          f'config.grad_accum_steps={config.grad_accum_steps}: the '
          "'autoencoder' method does not accumulate gradients (its adaptive "
          'weight needs the whole batch\'s); set it to 1')
    model = autoencoder.AutoencoderKL(
        block_out_channels=tuple(a.block_out_channels),
        latent_channels=a.latent_channels,
        layers_per_block=a.layers_per_block,
        norm_num_groups=a.norm_num_groups, out_channels=data.channels)
    return cls(
        model=model,
        discriminator=PatchDiscriminator(ch=a.disc_ch,
                                         num_layers=a.disc_layers),
        image_shape=(data.image_size, data.image_size, data.channels),
        kl_weight=a.kl_weight, rec_loss=a.rec_loss,
        learn_logvar=a.learn_logvar, logvar_init=a.logvar_init,
        disc_start=a.disc_start, disc_weight=a.disc_weight,
        disc_loss=a.disc_loss,
        optimizer=_adam(learning_rate_schedule(optim), a.adam_b1, a.adam_b2,
                        optim.adam_eps, optim.grad_clip_norm),
        disc_optimizer=_adam(a.disc_learning_rate, a.adam_b1, a.adam_b2,
                             optim.adam_eps, optim.grad_clip_norm),
        learning_rate_fn=learning_rate_schedule(optim),
        ema_decay=optim.ema_decay, ema_warmup=optim.ema_warmup,
        seed=config.seed)

  def describe(self) -> str:
    return (f'autoencoder: KL-f{self.model.down_factor} with '
            f'{self.model.latent_channels} latent channels, {self.rec_loss} '
            f'+ {self.kl_weight:g} KL, {self.disc_loss} patch GAN from step '
            f'{self.disc_start}')

  # ------------------------------------------------------------ networks --

  def init(self, rng: jax.Array) -> AutoencoderState:
    ae_rng, disc_rng = jax.random.split(rng)
    ae_params = autoencoder.init_params(self.model, ae_rng,
                                        in_channels=self.image_shape[-1])
    disc_params = self.discriminator.init(
        disc_rng, jnp.zeros((1, *self.image_shape), jnp.float32))['params']
    params = {'autoencoder': ae_params,
              'logvar': jnp.full((), self.logvar_init, jnp.float32)}
    return AutoencoderState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=ae_params,
        opt_state=self.optimizer.init(params), disc_params=disc_params,
        disc_opt_state=self.disc_optimizer.init(disc_params))

  def _ema_decay_at(self, step):
    """OneOptimizerMethod's schedule: min(decay, (1 + n) / (10 + n)) with
    ema_warmup, else the constant decay."""
    if not self.ema_warmup:
      return self.ema_decay
    n = step.astype(jnp.float32)
    return jnp.minimum(self.ema_decay, (1.0 + n) / (10.0 + n))

  # ------------------------------------------------------------ training --

  def generator_terms(self, params, disc_params, images, rng):
    """([NLL, KL, L_G] as one (3,) array, (mean per-element rec loss,
    reconstructions)) of the autoencoder's reconstruction of images from
    z ~ q(z|x)."""
    rec, mean, logvar_q = self.model.apply({'params': params['autoencoder']},
                                           images, rng)
    logvar = params['logvar']
    if not self.learn_logvar:
      logvar = jax.lax.stop_gradient(logvar)
    rec_elementwise = losses.pixel_loss(images, rec, self.rec_loss)
    logits_fake = self.discriminator.apply({'params': disc_params}, rec)
    terms = jnp.stack([
        losses.nll(rec_elementwise, logvar),
        jnp.mean(autoencoder.kl_divergence(mean, logvar_q)),
        losses.generator_loss(logits_fake, self.disc_loss)])
    return terms, (jnp.mean(rec_elementwise), rec)

  def generator_grads(self, params, disc_params, images, rng, disc_factor):
    """(gradient of L_AE, reconstructions, metrics) from one forward pass
    and its pullback applied three times: to the NLL and to L_G for the
    adaptive weight, of which only the last layer's slice is used (so
    under jit XLA drops everything but that layer's gradient and, for L_G,
    the backward pass through D), then to L_AE's weights for the one full
    backward pass. The KL does not reach the decoder: its slice would be
    zero."""
    terms, vjp_fn, (rec_loss, rec) = jax.vjp(
        lambda p: self.generator_terms(p, disc_params, images, rng), params,
        has_aux=True)
    nll, kl, g_loss = terms[0], terms[1], terms[2]
    pull = lambda *w: vjp_fn(jnp.stack(w).astype(jnp.float32))[0]
    weight = self.disc_weight * losses.adaptive_weight(
        _last_layer(pull(1.0, 0.0, 0.0)), _last_layer(pull(0.0, 0.0, 1.0)))
    scale = disc_factor * weight
    grads = pull(1.0, self.kl_weight, scale)
    metrics = {'loss': nll + self.kl_weight * kl + scale * g_loss,
               'rec': rec_loss, 'nll': nll, 'kl': kl, 'g_loss': g_loss,
               'adaptive_weight': weight, 'logvar': params['logvar']}
    return grads, rec, metrics

  def discriminator_loss_fn(self, disc_params, real, fake, disc_factor):
    """(disc_factor * L_D, (mean logit of real, of fake)). Before disc_start
    the factor is 0: the gradient is zero and Adam (m = v = 0) leaves the
    discriminator's parameters exactly as they were (LDM's way; its Adam
    step count still advances)."""
    logits_real = self.discriminator.apply({'params': disc_params}, real)
    logits_fake = self.discriminator.apply({'params': disc_params}, fake)
    loss = disc_factor * losses.discriminator_loss(logits_real, logits_fake,
                                                   self.disc_loss)
    return loss, (jnp.mean(logits_real), jnp.mean(logits_fake))

  def train_step(self, state: AutoencoderState, images):
    rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
    factor = losses.disc_factor(state.step, self.disc_start)
    grads, fake, metrics = self.generator_grads(
        state.params, state.disc_params, images, rng, factor)
    updates, opt_state = self.optimizer.update(grads, state.opt_state,
                                               state.params)
    params = optax.apply_updates(state.params, updates)
    (d_loss, (logits_real, logits_fake)), d_grads = jax.value_and_grad(
        self.discriminator_loss_fn, has_aux=True)(
            state.disc_params, images, jax.lax.stop_gradient(fake), factor)
    d_updates, disc_opt_state = self.disc_optimizer.update(
        d_grads, state.disc_opt_state, state.disc_params)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        ema_params=ema_update(state.ema_params, params['autoencoder'],
                              self._ema_decay_at(state.step)),
        disc_params=optax.apply_updates(state.disc_params, d_updates),
        disc_opt_state=disc_opt_state)
    metrics.update(d_loss=d_loss, logits_real=logits_real,
                   logits_fake=logits_fake, disc_factor=factor,
                   grad_norm=optax.tree.norm(grads),
                   learning_rate=self.learning_rate_fn(state.step))
    return new_state, metrics

  # ------------------------------------------------- sampling, evaluation --

  def noise_shape(self, num: int) -> tuple[int, ...]:
    """The latent shape (num, H/f, W/f, C): sample decodes N(0, I) there."""
    f = self.model.down_factor
    height, width = self.image_shape[:2]
    return (num, height // f, width // f, self.model.latent_channels)

  def sample(self, params, noise, rng):
    """decode(z), z ~ N(0, I) the prior of the KL term; clipped to [-1, 1]."""
    del rng  # decoding is deterministic
    images = self.model.apply({'params': params}, noise,
                              method=autoencoder.AutoencoderKL.decode)
    return jnp.clip(images, -1.0, 1.0)

  def network_calls(self) -> int:
    return 1  # one decoder call per image

  def reconstruct(self, params, images, rng):
    """decode(E[z|x]), clipped to [-1, 1]: deterministic (diffusers'
    sample_posterior=False), so eval mode's MSE does not depend on a draw."""
    del rng
    rec, _, _ = self.model.apply({'params': params}, images,
                                 sample_posterior=False)
    return jnp.clip(rec, -1.0, 1.0)
