"""The VAE as a method: the ELBO in bits/dim, an importance-weighted bound.

Kingma & Welling 2014: an encoder's diagonal Gaussian q(z|x), the prior
p(z) = N(0, I), and a decoder p(x|z) factorised over pixels, trained by the
reparameterisation trick (z = mu + sigma * eps, their eq. 10) on the
negative ELBO with the KL in closed form (their eq. 10 / appendix B):

  -ELBO(x) = E_q[-log p(x|z)] + KL(q(z|x) || p(z)).

p(x|z) is a distribution over the 256 values of 8-bit data, so log p(x) is
a log-probability and bits/dim compare with DDPM's (diffusion/likelihood.py
and its convention: x in [-1, 1] on the grid -1 + 2k/255, bin k is
[x - 1/255, x + 1/255], the edge bins at -1 and +1 open to -inf and +inf):

  'logistic': a logistic CDF differenced on the bins (Kingma et al. 2016's
      IAF decoder; PixelCNN++'s mixture with one component, Salimans et al.
      2017 sec. 2.1), per pixel and channel.
  'gaussian': a Gaussian CDF differenced on the bins (DDPM's L_0 decoder,
      Ho et al. 2020 eq. 13), likelihood.discretized_gaussian_log_likelihood.

Each has a location and a log-scale per pixel from the decoder; log-scales
are floored at MIN_LOG_SCALE (PixelCNN++'s -7: a bin holds at most
~1 - 1e-3 of the mass, not 1 - 1e-300, so a confident wrong pixel cannot
dominate the gradient).

Training minimises recon + beta * KL in bits/dim (nats / (D ln 2), D =
H W C); beta rises linearly from 0 to 1 over config.vae.kl_warmup_steps
(0: always 1; Bowman et al. 2016's KL annealing against posterior
collapse). Only beta = 1 is a bound on -log p(x): the logged loss during
warm-up is not one, and eval always uses beta = 1.

Evaluation (log_likelihood) reports, per image, Burda et al. 2016's
importance-weighted bound (their eq. 8) with k = eval_importance_samples
draws z_i ~ q(z|x) and log-weights log w_i = log p(x|z_i) + log p(z_i) -
log q(z_i|x):

  total_bpd = -(logsumexp_i log w_i - log k) / (D ln 2)   (an upper bound on
                                                            -log2 p(x) / D,
                                                            falling with k)
  elbo_bpd  = -mean_i log w_i / (D ln 2) = recon_bpd + kl_bpd

with recon_bpd the mean of -log p(x|z_i) and kl_bpd the same draws' Monte
Carlo KL (whose expectation is the closed form training uses). By Jensen's
inequality total_bpd <= elbo_bpd for every image and every draw.

Samples decode z ~ N(0, I) and return the *mean* of p(x|z) over the 256
values (discretized_mean), not a draw from it: pixels drawn independently
given z are speckle; the mean is the smooth image the decoder describes.
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from diffusion_jax.diffusion import likelihood
from diffusion_jax.methods.base import OneOptimizerMethod, one_optimizer_kwargs
from diffusion_jax.models import vae as vae_model

DECODERS = ('logistic', 'gaussian')
# Floor of the decoder's log-scale (PixelCNN++ clamps log_scales at -7).
MIN_LOG_SCALE = -7.0
_HALF_BIN = 1.0 / 255.0  # half an 8-bit bin on [-1, 1], as likelihood.py
_EDGE = 1.0 - 1e-3  # |x| beyond this is an edge bin, as likelihood.py
_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------ math --


def _sum_per_image(v):
  """(B, ...) -> (B,)."""
  return jnp.sum(v.reshape(v.shape[0], -1), axis=1)


def _log1mexp(d):
  """log(1 - e^d) for d < 0, accurate on both sides of -ln 2 (Maechler
  2012)."""
  d = jnp.minimum(d, -1e-30)
  return jnp.where(d > -math.log(2.0), jnp.log(-jnp.expm1(d)),
                   jnp.log1p(-jnp.exp(d)))


def discretized_logistic_log_likelihood(x, loc, log_scale):
  """log P(x) of 8-bit data under a logistic(loc, e^log_scale) integrated
  over x's bin; edge bins open. Shapes broadcast; nats, each <= 0.

  With a < b the standardised bin edges, sigma(b) - sigma(a) =
  sigma(b) sigma(-a) (1 - e^(a - b)) exactly, so

    log P = log_sigmoid(b) + log_sigmoid(-a) + log1mexp(-(2/255) / s),

  every term finite and accurate without PixelCNN++'s branch to the
  density at the bin centre when the CDF difference underflows. An open
  edge drops its factor (sigma(+inf) = 1, e^(-inf) = 0).
  """
  inv_scale = jnp.exp(-log_scale)
  a = (x - loc - _HALF_BIN) * inv_scale
  b = (x - loc + _HALF_BIN) * inv_scale
  lower_open, upper_open = x <= -_EDGE, x >= _EDGE
  log_prob = (jnp.where(upper_open, 0.0, jax.nn.log_sigmoid(b))
              + jnp.where(lower_open, 0.0, jax.nn.log_sigmoid(-a))
              + jnp.where(lower_open | upper_open, 0.0,
                          _log1mexp(-2.0 * _HALF_BIN * inv_scale)))
  return jnp.minimum(log_prob, 0.0)


def decoder_log_prob(decoder: str, x, loc, log_scale):
  """log p(x|z) per pixel (nats, x's shape) for `decoder` in DECODERS."""
  log_scale = jnp.maximum(log_scale, MIN_LOG_SCALE)
  if decoder == 'logistic':
    return discretized_logistic_log_likelihood(x, loc, log_scale)
  return likelihood.discretized_gaussian_log_likelihood(x, loc, log_scale)


def discretized_mean(decoder: str, loc, log_scale):
  """E[x] under the discretised decoder, in [-1, 1]; loc and log_scale
  broadcast.

  With x_k = -1 + 2k/255, P_k = F(e_(k+1)) - F(e_k), e_0 = -inf, e_256 =
  +inf and interior edges e_k = -1 + (2k - 1)/255, summation by parts
  gives sum_k x_k P_k = 1 - (2/255) sum_(k=1..255) F(e_k): 255 CDFs, summed
  in a loop so memory stays that of one image batch.
  """
  cdf = jax.nn.sigmoid if decoder == 'logistic' else ndtr
  inv_scale = jnp.exp(-jnp.maximum(log_scale, MIN_LOG_SCALE))

  def add(k, total):
    edge = -1.0 + (2.0 * k - 1.0) * _HALF_BIN
    return total + cdf((edge - loc) * inv_scale)

  shape = jnp.broadcast_shapes(jnp.shape(loc), jnp.shape(log_scale))
  total = jax.lax.fori_loop(1, 256, add, jnp.zeros(shape, jnp.float32))
  return jnp.clip(1.0 - 2.0 * _HALF_BIN * total, -1.0, 1.0)


def gaussian_kl(mean, logvar):
  """KL(N(mean, e^logvar) || N(0, I)) per example, nats, (B,): Kingma &
  Welling 2014 appendix B, -1/2 sum(1 + logvar - mean^2 - e^logvar)."""
  return _sum_per_image(0.5 * (jnp.square(mean) + jnp.expm1(logvar)
                               - logvar))


def importance_weighted_terms(encode, log_likelihood, x, rng,
                              num_samples: int) -> dict:
  """Burda et al. 2016 eq. 8 and the ELBO of the same draws, bits/dim.

  Args:
    encode: x -> (mean, logvar) of q(z|x), each (B, *latent).
    log_likelihood: (x, z) -> log p(x|z) per image, (B,) nats.
    x: (B, ...) data; D = the size of one row.
    rng: key of the draws; num_samples: k >= 1, drawn one at a time (a
      scan: memory of one decoder batch).

  Returns:
    {'total_bpd', 'elbo_bpd', 'recon_bpd', 'kl_bpd'}, each (B,) (module
    docstring); nats = bpd * D ln 2.
  """
  mean, logvar = encode(x)
  std = jnp.exp(0.5 * logvar)

  def one_draw(_, key):
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    z = mean + std * eps
    log_pz = -0.5 * _sum_per_image(jnp.square(z) + _LOG_2PI)
    # log q(z|x) from eps = (z - mean) / std: no cancellation in z - mean.
    log_qz = -0.5 * _sum_per_image(jnp.square(eps) + _LOG_2PI + logvar)
    return None, (log_likelihood(x, z), log_pz - log_qz)

  _, (log_px, log_ratio) = jax.lax.scan(
      one_draw, None, jax.random.split(rng, num_samples))
  log_w = log_px + log_ratio  # (k, B)
  iw = jax.nn.logsumexp(log_w, axis=0) - math.log(num_samples)
  to_bpd = -1.0 / (math.prod(x.shape[1:]) * math.log(2.0))
  return {'total_bpd': to_bpd * iw,
          'elbo_bpd': to_bpd * jnp.mean(log_w, axis=0),
          'recon_bpd': to_bpd * jnp.mean(log_px, axis=0),
          'kl_bpd': to_bpd * jnp.mean(log_ratio, axis=0)}


# ---------------------------------------------------------------- config --


def _check_config(config) -> None:
  """ValueError naming the key, the value and a fix."""
  v, data = config.vae, config.data
  if config.model.num_classes:
    raise ValueError(
        f'config.model.num_classes={config.model.num_classes}: '
        "config.method='vae' is unconditional; set it to 0")
  if v.decoder not in DECODERS:
    raise ValueError(f'config.vae.decoder={v.decoder!r}: use one of '
                     f'{", ".join(map(repr, DECODERS))}')
  k = v.eval_importance_samples
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(
        f'config.vae.eval_importance_samples={k!r} must be an integer >= 1 '
        '(1: the ELBO; Burda et al. 2016 use 5000): set e.g. 64')
  if v.kl_warmup_steps < 0:
    raise ValueError(f'config.vae.kl_warmup_steps={v.kl_warmup_steps} must '
                     'be >= 0 (0: no KL annealing)')
  widths = tuple(v.widths)
  if not widths or any(w <= 0 for w in widths):
    raise ValueError(f'config.vae.widths={widths} must be one or more '
                     'positive channel counts, e.g. (32, 64)')
  if v.blocks_per_level < 0:
    raise ValueError(f'config.vae.blocks_per_level={v.blocks_per_level} '
                     'must be >= 0')
  if v.norm_groups < 0 or (v.norm_groups and any(
      w % v.norm_groups for w in widths)):
    raise ValueError(
        f'config.vae.norm_groups={v.norm_groups} must divide every width of '
        f'config.vae.widths={widths} (0: no GroupNorm): change either')
  f, size = vae_model.down_factor(widths), data.image_size
  if size % f:
    raise ValueError(
        f'config.data.image_size={size} is not divisible by the encoder\'s '
        f'down factor f={f} (2^(len(config.vae.widths) - 1), widths='
        f'{widths}): use fewer widths or another image size')
  shape = tuple(v.latent_shape)
  if len(shape) not in (1, 3) or any(
      isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in shape):
    raise ValueError(
        f'config.vae.latent_shape={shape} must be (H/f, W/f, C) or (d,) of '
        f'positive integers, e.g. ({size // f}, {size // f}, 4) or (32,)')
  if len(shape) == 3 and shape[:2] != (size // f, size // f):
    raise ValueError(
        f'config.vae.latent_shape={shape}: the encoder (widths={widths}, '
        f'f={f}) makes {size}x{size} images into {size // f}x{size // f} '
        f'latents: set it to ({size // f}, {size // f}, {shape[2]}), or '
        'change config.vae.widths, or use a flat (d,)')


# ---------------------------------------------------------------- method --


class VAEMethod(OneOptimizerMethod):
  """Trains models/vae.py's VAE on the negative ELBO (module docstring)."""

  name = 'vae'

  def __init__(self, *, model: vae_model.VAE, decoder: str,
               eval_importance_samples: int, kl_warmup_steps: int = 0,
               **optim):
    super().__init__(**optim)
    self.model, self.decoder = model, decoder
    self.image_shape = (model.image_size, model.image_size, model.channels)
    self.latent_shape = tuple(model.latent_shape)
    self.eval_importance_samples = eval_importance_samples
    self.kl_warmup_steps = kl_warmup_steps

  @classmethod
  def from_config(cls, config) -> 'VAEMethod':
    """The method of config.vae, config.data and config.optim, checked."""
    _check_config(config)
    v, data = config.vae, config.data
    model = vae_model.VAE(
        widths=tuple(v.widths), blocks_per_level=v.blocks_per_level,
        num_groups=v.norm_groups, latent_shape=tuple(v.latent_shape),
        image_size=data.image_size, channels=data.channels)
    return cls(
        model=model, decoder=v.decoder,
        eval_importance_samples=v.eval_importance_samples,
        kl_warmup_steps=v.kl_warmup_steps,
        **one_optimizer_kwargs(config))

  def describe(self) -> str:
    warmup = (f', KL warm-up over {self.kl_warmup_steps} steps'
              if self.kl_warmup_steps else '')
    return (f'vae: latent {self.latent_shape}, discretised {self.decoder} '
            f'decoder, importance-weighted bound with k='
            f'{self.eval_importance_samples} at eval{warmup}')

  # ------------------------------------------------------------ networks --

  def init_params(self, rng):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    eps = jnp.zeros((1, *self.latent_shape), jnp.float32)
    return self.model.init({'params': rng}, x, eps)['params']

  def encode(self, params, x):
    return self.model.apply({'params': params}, x,
                            method=vae_model.VAE.encode)

  def decode(self, params, z):
    return self.model.apply({'params': params}, z,
                            method=vae_model.VAE.decode)

  def log_px(self, params, x, z):
    """log p(x|z) per image, (B,) nats."""
    loc, log_scale = self.decode(params, z)
    return _sum_per_image(decoder_log_prob(self.decoder, x, loc, log_scale))

  # ------------------------------------------------------------ training --

  def kl_weight(self, step):
    """beta at `step`: step / kl_warmup_steps up to 1; 1 without warm-up."""
    if self.kl_warmup_steps <= 0:
      return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, step.astype(jnp.float32) / self.kl_warmup_steps)

  def train_step(self, state, batch):
    # beta depends on the step, which only the state holds: it rides along
    # with the batch to `draw`, which broadcasts it per example.
    beta = self.kl_weight(state.step)
    state, metrics = super().train_step(state, {'images': batch,
                                                'beta': beta})
    if self.kl_warmup_steps:
      metrics['kl_weight'] = beta
    return state, metrics

  def draw(self, batch, rng, aux_state):
    """The images, eps ~ N(0, I) of the reparameterisation (from (seed,
    step): a resumed run draws the same) and beta, each per example."""
    del aux_state
    images = batch['images']
    n = images.shape[0]
    eps = jax.random.normal(rng, (n, *self.latent_shape), jnp.float32)
    return {'images': images, 'eps': eps,
            'beta': jnp.full((n,), batch['beta'], jnp.float32)}

  def negative_elbo_bpd(self, params, images, eps, beta=1.0):
    """-log p(x|z) + beta KL(q(z|x) || N(0, I)) per image in bits/dim,
    (B,), one reparameterised draw z = mean + sigma eps (eps (B,
    *latent))."""
    loc, log_scale, mean, logvar = self.model.apply({'params': params},
                                                    images, eps)
    recon = -_sum_per_image(decoder_log_prob(self.decoder, images, loc,
                                             log_scale))
    nats = recon + beta * gaussian_kl(mean, logvar)
    return nats / (math.prod(self.image_shape) * math.log(2.0))

  def loss(self, params, xs, rng):
    del rng  # all randomness is in xs['eps']
    values = self.negative_elbo_bpd(params, xs['images'], xs['eps'],
                                    xs['beta'])
    return jnp.mean(values), values

  # ------------------------------------------------- sampling, evaluation --

  def noise_shape(self, num: int) -> tuple[int, ...]:
    """(num, *latent_shape): z ~ N(0, I), the prior."""
    return (num, *self.latent_shape)

  def sample(self, params, noise, rng):
    """The mean of p(x|z) for z = noise (module docstring), in [-1, 1]."""
    del rng  # deterministic given z
    loc, log_scale = self.decode(params, noise)
    return discretized_mean(self.decoder, loc, log_scale)

  def network_calls(self) -> int:
    return 1  # one decoder call per image

  def log_likelihood(self, params, images, rng) -> dict:
    """Per image (B,): total_bpd (importance-weighted, k =
    eval_importance_samples), elbo_bpd, recon_bpd, kl_bpd; beta = 1."""
    return importance_weighted_terms(
        lambda x: self.encode(params, x),
        lambda x, z: self.log_px(params, x, z), images, rng,
        self.eval_importance_samples)

  def reconstruct(self, params, images, rng):
    """The mean of p(x|z) at the posterior mean z = E[z|x]: deterministic,
    so eval mode's MSE / PSNR do not depend on a draw."""
    del rng
    mean, _ = self.encode(params, images)
    loc, log_scale = self.decode(params, mean)
    return discretized_mean(self.decoder, loc, log_scale)
