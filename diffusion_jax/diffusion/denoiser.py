"""The one denoiser: any prediction target over (alpha_t, sigma_t) -> (x0, eps).

Every process of this package is a Gaussian path x_t = alpha_t x0 +
sigma_t eps: the discrete DDPM schedule at integer t (alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t); schedules.py) and the continuous vp, ve and
rectified-flow paths at t in [0, 1] (sde.py). Both expose
`alpha_sigma(t)`, the continuous ones also `derivatives(t)`, and the network
sees `process.model_time(t)`. A network predicts one of

  eps, x0   the two halves of x_t;
  v         alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4);
  velocity  dx_t/dt = alpha' x0 + sigma' eps (rectified flow's eps - x0;
            continuous processes only);
  edm       F of EDM's preconditioning (Karras et al. 2022, eq. 7 and
            Table 1): D = c_skip x~ + c_out F(c_in x~) with x~ = x_t / alpha
            and sigma~ = sigma / alpha, any process. Its MSE is EDM's loss
            lambda(sigma) ||D - x0||^2 with lambda = 1 / c_out^2 (eq. 8).

Each is a fixed linear combination of (x0, eps) at t, so with x_t it
determines both (`to_x0_eps`), the way EDM's preconditioning turns every
formulation into one denoiser D(x; sigma). Losses regress onto `target`;
samplers and the bound only ever see `Denoised(x0, eps, variance)`.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

PREDICTIONS = ('eps', 'x0', 'v', 'velocity', 'edm')
# EDM's sigma_data: the data's standard deviation the preconditioning
# assumes (sec. 5, Table 1: 0.5 for images in [-1, 1]).
SIGMA_DATA = 0.5


class Denoised(NamedTuple):
  """What a sampler needs from the network at (x_t, t)."""
  x0: jax.Array
  eps: jax.Array
  # improved DDPM's variance interpolation in [-1, 1] (the network's extra C
  # channels, eq. 15), or None for a fixed variance.
  variance: Optional[jax.Array] = None


# denoise_fn(x_t, t) -> Denoised; t is (B,) (an index for the discrete
# schedule, a float in [0, 1] for the continuous processes).
DenoiseFn = Callable[[jax.Array, jax.Array], Denoised]
# network_fn(x_t, t) -> the network's raw output for the process's t.
NetworkFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_prediction(prediction: str, discrete: bool = False) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f'unknown prediction {prediction!r}: set '
                     f'config.diffusion.prediction to one of {PREDICTIONS}')
  if discrete and prediction == 'velocity':
    raise ValueError(
        "config.diffusion.prediction='velocity' needs a continuous process "
        "(config.diffusion.process='rectified_flow', 'vp' or 've'); with "
        "'ddpm' predict eps, x0 or v")


def bcast(coef: jax.Array, x: jax.Array) -> jax.Array:
  """coef of shape (B,) (or ()) reshaped to broadcast against x (B, ...)."""
  coef = jnp.asarray(coef)
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim)).astype(x.dtype)


def _coefficients(process, t, x):
  alpha, sigma = process.alpha_sigma(t)
  return bcast(alpha, x), bcast(sigma, x)


def edm_coefficients(sigma_tilde: jax.Array, sigma_data: float = SIGMA_DATA):
  """(c_skip, c_out, c_in) of EDM Table 1 at noise level sigma~: unit-
  variance network inputs and targets at every sigma."""
  s2, d2 = jnp.square(sigma_tilde), sigma_data * sigma_data
  root = jnp.sqrt(s2 + d2)
  return d2 / (s2 + d2), sigma_tilde * sigma_data / root, 1.0 / root


def network_input(process, prediction: str, x_t: jax.Array,
                  t: jax.Array) -> jax.Array:
  """What the network sees at (x_t, t): x_t, or for 'edm' c_in x~ =
  x_t / sqrt(sigma^2 + alpha^2 sigma_data^2), unit variance at every t."""
  if prediction != 'edm':
    return x_t
  a, s = _coefficients(process, t, x_t)
  return x_t * jax.lax.rsqrt(s * s + a * a * SIGMA_DATA ** 2)


def q_sample(process, x0: jax.Array, t: jax.Array,
             eps: jax.Array) -> jax.Array:
  """x_t = alpha_t x0 + sigma_t eps (DDPM eq. 4; Song et al. 2021 eq. 29)."""
  a, s = _coefficients(process, t, x0)
  return a * x0 + s * eps


def target(process, prediction: str, x0: jax.Array, eps: jax.Array,
           t: jax.Array) -> jax.Array:
  """What a network predicting `prediction` regresses onto at (x0, eps, t)."""
  check_prediction(prediction)
  if prediction == 'eps':
    return eps
  if prediction == 'x0':
    return x0
  if prediction == 'v':
    a, s = _coefficients(process, t, x0)
    return a * eps - s * x0
  if prediction == 'edm':
    # (x0 - c_skip x~) / c_out with x~ = x0 + sigma~ eps; with sigma_data = 1
    # and a VP process this is -v.
    a, s = _coefficients(process, t, x0)
    sigma_tilde, d = s / a, SIGMA_DATA
    return ((sigma_tilde * x0 - d * d * eps)
            * jax.lax.rsqrt(sigma_tilde ** 2 + d * d) / d)
  d_alpha, d_sigma = process.derivatives(t)
  return bcast(d_alpha, x0) * x0 + bcast(d_sigma, eps) * eps


def to_x0_eps(process, prediction: str, x_t: jax.Array, t: jax.Array,
              output: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x0_hat, eps_hat) from a prediction: the exact inverse of `target`.

  With y = c_x x0 + c_e eps and x_t = alpha x0 + sigma eps, a 2x2 system:
    eps:      x0 = (x_t - sigma y) / alpha (DDPM eq. 15; singular where
              alpha = 0, rectified flow at t = 1);
    x0:       eps = (x_t - alpha y) / sigma (singular where sigma = 0);
    v:        determinant alpha^2 + sigma^2 > 0 (1 for DDPM and VP);
    velocity: determinant alpha sigma' - sigma alpha';
    edm:      x0 = c_skip x_t / alpha + c_out y, eps from x0 as for x0.
  The pair always satisfies x_t = alpha x0_hat + sigma eps_hat.
  """
  check_prediction(prediction)
  a, s = _coefficients(process, t, x_t)
  if prediction == 'eps':
    return (x_t - s * output) / a, output
  if prediction == 'x0':
    return output, (x_t - a * output) / s
  if prediction == 'v':
    norm = a * a + s * s
    return (a * x_t - s * output) / norm, (s * x_t + a * output) / norm
  if prediction == 'edm':
    c_skip, c_out, _ = edm_coefficients(s / a)
    x0 = c_skip * x_t / a + c_out * output
    return x0, (x_t - a * x0) / s
  d_alpha, d_sigma = process.derivatives(t)
  da, ds = bcast(d_alpha, x_t), bcast(d_sigma, x_t)
  det = a * ds - s * da
  return (ds * x_t - s * output) / det, (a * output - da * x_t) / det


def score_from_eps(process, t: jax.Array, eps: jax.Array) -> jax.Array:
  """grad_x log q(x_t) estimate -eps / sigma_t (Song et al. 2021, eq. 1)."""
  return -eps / bcast(process.alpha_sigma(t)[1], eps)


def split_output(out: jax.Array, channels: int
                 ) -> tuple[jax.Array, Optional[jax.Array]]:
  """(prediction, variance) of a 2C-channel output, (out, None) of C."""
  if out.shape[-1] == channels:
    return out, None
  if out.shape[-1] != 2 * channels:
    raise ValueError(f'model output has {out.shape[-1]} channels; expected '
                     f'{channels} (the prediction) or {2 * channels} (and a '
                     'learned variance)')
  return out[..., :channels], out[..., channels:]


def make_denoiser(network_fn: NetworkFn, process,
                  prediction: str) -> DenoiseFn:
  """The network, whatever it predicts, as (x_t, t) -> Denoised."""
  check_prediction(prediction)

  def denoise(x_t, t):
    out, variance = split_output(
        network_fn(network_input(process, prediction, x_t, t), t),
        x_t.shape[-1])
    x0, eps = to_x0_eps(process, prediction, x_t, t, out)
    return Denoised(x0, eps, variance)
  return denoise
