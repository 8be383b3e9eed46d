"""PixelCNN++'s discretised logistic mixture likelihood and its sampler.

Salimans et al. 2017 (ICLR), sec. 2.1-2.2. A sub-pixel x in [-1, 1] is one
of 256 levels v / 127.5 - 1, 2/255 apart; each mixture component puts on it
the mass of a logistic(mu, s) over its bin [x - 1/255, x + 1/255], the
first and last bins stretched to -inf and +inf (eq. 2):

  P(x | pi, mu, s) = sum_k pi_k [sigmoid((x + 1/255 - mu_k) / s_k)
                                 - sigmoid((x - 1/255 - mu_k) / s_k)].

For RGB (sec. 2.2) the component is shared by the three channels and the
means of green and blue are linear in the channels before them:

  mu_g = mu_g' + alpha r,   mu_b = mu_b' + beta r + gamma g,

alpha, beta, gamma = tanh(...) per component; for one channel it is the
plain mixture. The network's output per pixel is laid out as
openai/pixel-cnn's `discretized_mix_logistic_loss` reads it: K mixture
logits, then per channel [K means, K log-scales, K coefficients (RGB
only)], so P = 10 K numbers per pixel for RGB and 3 K for grey.

Everything is in log space with openai's numerically stable form: the
edge bins through log sigmoid, the middle ones through log of the sigmoid
difference, and where that difference is below 1e-5 (float32 cancellation)
the log density at the bin centre times the bin width.
"""

import jax
import jax.numpy as jnp

# openai/pixel-cnn clamps log-scales from below (a logistic narrower than
# e^-7 ~ 1/1100 is far inside one bin of width 2/255 anyway).
LOG_SCALE_MIN = -7.0
HALF_BIN = 1.0 / 255.0  # half a bin: levels are 2/255 apart on [-1, 1]
EDGE = 0.999  # |x| above this: the first or last level
# Uniform draws stay in [U_MIN, 1 - U_MIN], as openai's sampler, so the
# Gumbel and logistic transforms stay finite.
U_MIN = 1e-5


def num_coupling(channels: int) -> int:
  """Linear coefficients per component: alpha, beta, gamma for RGB."""
  return channels * (channels - 1) // 2


def num_params(channels: int, num_mix: int) -> int:
  """Network outputs per pixel: K logits + K (means, log-scales) per
  channel + K coefficients per coupling: 3 K (grey), 10 K (RGB)."""
  return num_mix * (1 + 2 * channels + num_coupling(channels))


def _check_channels(channels: int) -> None:
  if channels not in (1, 3):
    raise ValueError(f'the logistic mixture is defined for 1 or 3 channels '
                     f'(PixelCNN++ sec. 2.2), got {channels}')


def unpack(net_out: jax.Array, channels: int, num_mix: int):
  """(..., P) -> (logits (..., K), means (..., C, K), log_scales (..., C, K)
  clamped at LOG_SCALE_MIN, coeffs (..., C, K) = tanh(...) for RGB (row 0:
  alpha, 1: beta, 2: gamma; openai's layout) or None for one channel)."""
  _check_channels(channels)
  k = num_mix
  if net_out.shape[-1] != num_params(channels, k):
    raise ValueError(f'network output has {net_out.shape[-1]} numbers per '
                     f'pixel, the mixture needs {num_params(channels, k)}')
  per_channel = 3 if channels == 3 else 2
  rest = net_out[..., k:].reshape(*net_out.shape[:-1], channels,
                                  per_channel * k)
  log_scales = jnp.maximum(rest[..., k:2 * k], LOG_SCALE_MIN)
  coeffs = jnp.tanh(rest[..., 2 * k:3 * k]) if channels == 3 else None
  return net_out[..., :k], rest[..., :k], log_scales, coeffs


def coupled_means(means: jax.Array, coeffs: jax.Array | None,
                  x: jax.Array) -> jax.Array:
  """Sec. 2.2: each channel's per-component mean plus the linear terms of
  the channels before it. means (..., C, K), x (..., C) -> (..., C, K)."""
  if coeffs is None:
    return means
  # x and the parameters may have different (broadcastable) leading shapes.
  means = jnp.broadcast_to(means, jnp.broadcast_shapes(
      means.shape, (*x.shape[:-1], *means.shape[-2:])))
  r, g = x[..., 0:1], x[..., 1:2]  # (..., 1), broadcast over K
  return jnp.stack([
      means[..., 0, :],
      means[..., 1, :] + coeffs[..., 0, :] * r,
      means[..., 2, :] + coeffs[..., 1, :] * r + coeffs[..., 2, :] * g],
      axis=-2)


def bin_log_probs(x: jax.Array, means: jax.Array,
                  log_scales: jax.Array) -> jax.Array:
  """log of eq. 2's bin mass of each component at each sub-pixel.

  x (..., C, 1) on the 8-bit grid, means and log_scales (..., C, K) ->
  (..., C, K). Every branch is finite, so jnp.where's unused branches pass
  no NaN into the gradient (openai's 1e-12 guard)."""
  centred = x - means
  inv_scale = jnp.exp(-log_scales)
  plus_in = inv_scale * (centred + HALF_BIN)
  min_in = inv_scale * (centred - HALF_BIN)
  # log sigmoid(plus_in): the first level's bin (-inf, -1 + 1/255].
  log_cdf_plus = plus_in - jax.nn.softplus(plus_in)
  # log (1 - sigmoid(min_in)): the last level's bin [1 - 1/255, inf).
  log_one_minus_cdf_min = -jax.nn.softplus(min_in)
  cdf_delta = jax.nn.sigmoid(plus_in) - jax.nn.sigmoid(min_in)
  # Where the difference cancels in float32: the logistic log-density at
  # the bin centre, log f(x) = m - log s - 2 softplus(m), times the bin
  # width 2/255 = 1/127.5.
  mid_in = inv_scale * centred
  log_pdf_mid = mid_in - log_scales - 2.0 * jax.nn.softplus(mid_in)
  middle = jnp.where(cdf_delta > 1e-5,
                     jnp.log(jnp.maximum(cdf_delta, 1e-12)),
                     log_pdf_mid - jnp.log(127.5))
  return jnp.where(x < -EDGE, log_cdf_plus,
                   jnp.where(x > EDGE, log_one_minus_cdf_min, middle))


def marginal_log_probs(x: jax.Array, net_out: jax.Array,
                       num_mix: int) -> jax.Array:
  """log p(x_1, ..., x_c) of each pixel's first c channels, c = 1..C.

  x (..., C) in [-1, 1] on the 8-bit grid, net_out (..., P) ->
  (..., C); the last entry is the pixel's log-likelihood. Each component
  is a product of per-channel conditionals that each sum to one, so
  marginalising the later channels drops their factors: entry c depends
  on the pixel's channels 1..c only (the coupling is causal)."""
  logits, means, log_scales, coeffs = unpack(net_out, x.shape[-1], num_mix)
  means = coupled_means(means, coeffs, x)
  per_channel = bin_log_probs(x[..., None], means, log_scales)
  joint = (jax.nn.log_softmax(logits, axis=-1)[..., None, :]
           + jnp.cumsum(per_channel, axis=-2))  # (..., C, K)
  return jax.nn.logsumexp(joint, axis=-1)


def log_prob(x: jax.Array, net_out: jax.Array, num_mix: int) -> jax.Array:
  """log p(x) per pixel, nats: x (..., C), net_out (..., P) -> (...)."""
  return marginal_log_probs(x, net_out, num_mix)[..., -1]


def quantize(x: jax.Array) -> jax.Array:
  """The nearest of the 256 levels, clipped to [-1, 1]: a continuous
  logistic draw rounded to its bin is a draw of eq. 2's discrete mass
  (the edge bins take the tails)."""
  return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def sample(net_out: jax.Array, rng: jax.Array, channels: int,
           num_mix: int) -> jax.Array:
  """One draw per pixel: (..., P) -> (..., C) on the 8-bit grid.

  The component by Gumbel-max over the logits, then channel by channel a
  logistic draw mu + s (log u - log(1 - u)) whose mean is coupled to the
  channels already drawn (sec. 2.2), rounded to its level. openai's sampler
  clips but does not round (its coupling then sees the unrounded values);
  rounding makes the draw exactly one of the distribution log_prob scores.
  """
  logits, means, log_scales, coeffs = unpack(net_out, channels, num_mix)
  k_rng, u_rng = jax.random.split(rng)
  u_k = jax.random.uniform(k_rng, logits.shape, minval=U_MIN,
                           maxval=1.0 - U_MIN)
  component = jnp.argmax(logits - jnp.log(-jnp.log(u_k)), axis=-1)
  pick = lambda a: jnp.take_along_axis(
      a, component[..., None, None], axis=-1)[..., 0]  # (..., C, K) -> (..., C)
  mu, log_s = pick(means), pick(log_scales)
  u = jax.random.uniform(u_rng, mu.shape, minval=U_MIN, maxval=1.0 - U_MIN)
  noise = jnp.exp(log_s) * (jnp.log(u) - jnp.log1p(-u))
  if coeffs is None:
    return quantize(mu + noise)
  c = pick(coeffs)
  r = quantize(mu[..., 0] + noise[..., 0])
  g = quantize(mu[..., 1] + c[..., 0] * r + noise[..., 1])
  b = quantize(mu[..., 2] + c[..., 1] * r + c[..., 2] * g + noise[..., 2])
  return jnp.stack([r, g, b], axis=-1)
