"""The variational bound of DDPM in bits/dim: pure, jit-able functions.

Ho et al. 2020, eq. 5 bounds the negative log-likelihood of 8-bit data by

  L = L_T + sum_{t=2..T} L_{t-1} + L_0,
  L_T     = KL(q(x_T | x0) || N(0, I))                       (prior),
  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) (eqs. 6-7),
  L_0     = -log p_theta(x0 | x1)          (discretized decoder, eq. 13),

where x_t ~ q(x_t | x0) is drawn once per term (a one-sample Monte Carlo
estimate of each expectation, as the DDPM code's `calc_bpd_loop`). Numbers
are in bits per dimension: nats / (ln 2 * H * W * C), so a bound of 8 means
"no better than storing the raw bytes".

Indexing: timestep index i is the paper's t = i + 1 (see schedules.py), so
the per-term matrix `terms_bpd[:, i]` is the paper's L_i: column 0 is the
decoder L_0, columns 1..T-1 are the KL terms L_1..L_{T-1}. The prior L_T is
returned separately.

The reverse process p_theta is the one the sampler draws from
(`samplers.p_mean_variance`): the posterior mean at the x0 estimate, with
sigma_t^2 = beta_t or beta~_t, and x0_hat clipped to [-1, 1] if requested.
The DDPM code evaluates its bits/dim with clipping on (`calc_bpd_loop`
defaults to clip_denoised=True; only the 'kl' *training* loss turns it off,
because clipping has no useful gradient). Clipping is a deterministic
function of x_t, so the clipped p_theta is still a valid reverse process and
the bound stays a bound on the likelihood of that model.
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from diffusion_jax.diffusion import denoiser, samplers, schedules
from diffusion_jax.diffusion.denoiser import DenoiseFn

# Half the width of one 8-bit bin after scaling 0..255 to [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Standardised bin edges are clamped here: log_ndtr(z) ~ -z^2/2 stays finite
# in float32 (|z| < ~1.8e19), so an absurdly confident, wrong decoder gives a
# huge but finite NLL instead of inf.
_Z_MAX = 1e15


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

  0.5 (v1/v2 - 1 - log(v1/v2) + (m1 - m2)^2 / v2), from log-variances so
  beta~ near 0 does not underflow. The variance part is written
  expm1(d) - d, d = log(v1/v2): the textbook -1 + e^d - d loses everything
  below float32 epsilon (~1e-7 nats per pixel), which is the size of the
  late-t terms (beta~_t/beta_t -> 1), and could even go negative.
  """
  d = logvar1 - logvar2
  return 0.5 * (jnp.expm1(d) - d
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log1mexp(d):
  """log(1 - e^d) for d <= 0 (Maechler 2012: two branches for accuracy)."""
  d = jnp.minimum(d, -1e-30)  # d = 0 would be log 0; only at |z| clamping.
  return jnp.where(d > -math.log(2.0), jnp.log(-jnp.expm1(d)),
                   jnp.log1p(-jnp.exp(d)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) of 8-bit data under a Gaussian integrated over each pixel bin.

  The L_0 decoder (DDPM eq. 13): data in [-1, 1] take the 256 values
  -1 + 2k/255; bin k is [x - 1/255, x + 1/255], except that the edge bins at
  -1 and +1 extend to -inf and +inf so the 256 probabilities sum to one.

  Exact and stable, unlike the DDPM code's tanh approximation of the CDF and
  its log(max(p, 1e-12)) clamp: with z_lo <= z_hi the standardised edges,
  log(Phi(z_hi) - Phi(z_lo)) = log_ndtr(z_hi) + log(1 - exp(log_ndtr(z_lo)
  - log_ndtr(z_hi))). A bin in the upper tail is first reflected
  (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)), so both CDFs are taken where they
  are small and keep their relative precision.

  Args:
    x: data in [-1, 1] on the 8-bit grid, any shape.
    means, log_scales: the decoder's mean and log standard deviation,
      broadcastable to x.

  Returns:
    log-probabilities (nats), shape of x; each <= 0 and finite.
  """
  inv_scale = jnp.exp(-log_scales)
  lo = jnp.clip((x - _HALF_BIN - means) * inv_scale, -_Z_MAX, _Z_MAX)
  hi = jnp.clip((x + _HALF_BIN - means) * inv_scale, -_Z_MAX, _Z_MAX)
  lo = jnp.where(x <= -1.0 + 1e-3, -jnp.inf, lo)  # open edge bins
  hi = jnp.where(x >= 1.0 - 1e-3, jnp.inf, hi)
  upper = lo > 0  # both edges above the mean: reflect
  lo, hi = jnp.where(upper, -hi, lo), jnp.where(upper, -lo, hi)
  log_hi = log_ndtr(hi)
  log_lo = log_ndtr(lo)  # -inf for an open lower edge -> log1mexp(-inf) = 0
  log_prob = log_hi + _log1mexp(log_lo - log_hi)
  return jnp.minimum(log_prob, 0.0)


def _mean_bits(nats):
  """(B, ...) nats -> (B,) bits/dim: mean over all but the batch axis."""
  return jnp.mean(nats.reshape(nats.shape[0], -1), axis=1) / math.log(2.0)


def prior_bpd(schedule: schedules.Schedule, x0: jax.Array) -> jax.Array:
  """L_T = KL(q(x_T | x0) || N(0, I)) per image, bits/dim (DDPM eq. 5).

  No parameters: it only measures how close abar_T is to 0 (for the linear
  1e-4..0.02 schedule, T = 1000 gives ~1e-5 bits/dim).
  """
  t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  mean, variance = schedules.q_mean_variance(schedule, x0, t)
  return _mean_bits(normal_kl(mean, jnp.log(variance), 0.0, 0.0))


def vlb_term_bpd(denoise_fn: DenoiseFn, schedule: schedules.Schedule,
                 x0: jax.Array, x_t: jax.Array, t: jax.Array, *,
                 variance: str = 'beta', clip_denoised: bool = True):
  """One term of the bound per image, bits/dim, and the model's x0 estimate.

  `t` is the 0-based index, x_t is the paper's x_{t+1}. For t > 0 (paper
  t + 1 >= 2) the term is the paper's L_t = KL(q(x_t | x_{t+1}, x0) ||
  p_theta(x_t | x_{t+1})), eqs. 5-7: two Gaussians, so closed form. The true
  posterior variance is beta~ with its log clipped at beta~_2 as in the DDPM
  code (that only matters at t = 0, where L_0 replaces the KL).
  For t == 0 (paper t = 1): L_0 = -log p_theta(x0 | x1) with the discretized
  decoder of eq. 13, mean mu_theta(x1, 1) and scale sigma_1 (the sampler's
  first variance, beta~_2 for both choices, as the DDPM code).

  Args:
    denoise_fn: (x_t, t) -> denoiser.Denoised.
    x0: data in [-1, 1], (B, H, W, C).
    x_t: a draw from q(x_t | x0) at index t.
    t: (B,) int timestep indices, 0-based.
    variance: sigma_t^2 of p_theta: 'beta' or 'beta_tilde'.
    clip_denoised: clip x0_hat to [-1, 1] inside p_theta's mean.

  Returns:
    (term, x0_hat): term (B,) in bits/dim, x0_hat like x0.
  """
  true_mean, _, true_log_var = schedules.q_posterior(schedule, x0, x_t, t)
  model_mean, model_log_var, x0_hat = samplers.p_mean_variance(
      denoise_fn, schedule, x_t, t, variance=variance,
      clip_denoised=clip_denoised)
  kl = _mean_bits(normal_kl(true_mean, true_log_var, model_mean,
                            model_log_var))
  decoder_nll = -_mean_bits(discretized_gaussian_log_likelihood(
      x0, model_mean, 0.5 * model_log_var))
  return jnp.where(t == 0, decoder_nll, kl), x0_hat


def vlb_terms(denoise_fn: DenoiseFn, schedule: schedules.Schedule, x0: jax.Array,
              rng: jax.Array, *, variance: str = 'beta',
              clip_denoised: bool = True) -> dict[str, jax.Array]:
  """All T + 1 terms of the bound for a batch, one `lax.scan` over t.

  The noise of term t is normal(fold_in(rng, t)) for the whole batch, so the
  result does not depend on the device layout (threefry is partitionable)
  and any term can be recomputed on its own.

  Returns a dict of per-image arrays, all bits/dim except x0_mse:
    total_bpd (B,): prior + sum of terms, the bound (eq. 5);
    prior_bpd (B,): L_T;
    terms_bpd (B, T): column i is the paper's L_i (column 0 the decoder);
    x0_mse (B, T): mean squared error of x0_hat(x_t) at index i, on the
      [-1, 1] scale: the distortion of the progressive-coding view (sec. 4.3).
  """
  samplers.check_variance(variance)
  batch = x0.shape[0]

  def term(_, t_index):
    noise = jax.random.normal(jax.random.fold_in(rng, t_index), x0.shape,
                              x0.dtype)
    t = jnp.full((batch,), t_index, jnp.int32)
    x_t = denoiser.q_sample(schedule, x0, t, noise)
    value, x0_hat = vlb_term_bpd(denoise_fn, schedule, x0, x_t, t,
                                 variance=variance,
                                 clip_denoised=clip_denoised)
    mse = jnp.mean(jnp.square(x0_hat - x0).reshape(batch, -1), axis=1)
    return None, (value, mse)

  _, (terms, mse) = jax.lax.scan(
      term, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
  terms, mse = terms.T, mse.T  # (T, B) -> (B, T)
  prior = prior_bpd(schedule, x0)
  return dict(total_bpd=prior + jnp.sum(terms, axis=1), prior_bpd=prior,
              terms_bpd=terms, x0_mse=mse)
