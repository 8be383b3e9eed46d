"""The losses of latent diffusion's autoencoder, one function per term.

LDM's `LPIPSWithDiscriminator` (Rombach et al. 2022, sec. 3.1 and appendix
G), itself taming-transformers' VQGAN loss (Esser et al. 2021, eqs. 4-7)
with the codebook term replaced by a KL term:

  L_AE = NLL(x, x_hat; s) + kl_weight * KL(q(z|x) || N(0, I))
         + disc_factor * lambda * L_G(D(x_hat))
  L_D  = disc_factor * L_D(D(x), D(x_hat))

NLL is the reconstruction loss under a learned scalar log-scale s (below),
lambda the adaptive weight of Esser et al. eq. 7, disc_factor 0 before
config.autoencoder.disc_start and 1 after. The KL's closed form is
models/autoencoder.kl_divergence.
"""

import jax
import jax.numpy as jnp

DISC_LOSSES = ('hinge', 'non_saturating')
REC_LOSSES = ('l1', 'l2')
# Esser et al. eq. 7: delta = 1e-6 in the paper, 1e-4 in its code (and
# LDM's), which is what the published models trained with; the clip keeps
# lambda finite when the GAN gradient vanishes.
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


def pixel_loss(images: jax.Array, reconstructions: jax.Array,
               kind: str) -> jax.Array:
  """|x - x_hat| ('l1', LDM's choice) or (x - x_hat)^2 ('l2') per element."""
  diff = images.astype(jnp.float32) - reconstructions.astype(jnp.float32)
  return jnp.abs(diff) if kind == 'l1' else jnp.square(diff)


def nll(rec: jax.Array, logvar: jax.Array) -> jax.Array:
  """Batch mean of sum over elements of rec / exp(s) + s (LDM's nll_loss).

  With rec = |x - x_hat| this is the negative log-likelihood of a Laplace
  decoder of scale b = e^s, up to D log 2 (with rec = (x - x_hat)^2 a
  Gaussian's, times 2, with s = log sigma^2). Learning s (LDM: one scalar,
  initialised at 0) sets b to the mean error, so the reconstruction term
  weighs more against the fixed-weight KL as the reconstructions improve;
  the adaptive weight below normalises the GAN term against it either way.
  Summed over pixels, not averaged: kl_weight = 1e-6 is relative to sums.
  """
  per_example = jnp.sum(rec / jnp.exp(logvar) + logvar,
                        axis=tuple(range(1, rec.ndim)))
  return jnp.mean(per_example)


def generator_loss(logits_fake: jax.Array, kind: str) -> jax.Array:
  """L_G of the autoencoder (the generator) on D's logits of x_hat.

  'hinge': -E[D(x_hat)], taming's and LDM's generator loss (Lim & Ye 2017).
  'non_saturating': E[softplus(-D(x_hat))] = -E[log sigmoid(D(x_hat))]
  (Goodfellow et al. 2014, sec. 3). taming pairs its 'vanilla' D loss with
  -E[D(x_hat)] as well; here each D loss has its own generator loss.
  """
  logits_fake = logits_fake.astype(jnp.float32)
  if kind == 'hinge':
    return -jnp.mean(logits_fake)
  return jnp.mean(jax.nn.softplus(-logits_fake))


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array,
                       kind: str) -> jax.Array:
  """L_D, halved as in taming (hinge_d_loss, vanilla_d_loss).

  'hinge': (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) / 2.
  'non_saturating': the cross-entropy of real vs fake,
  (E[softplus(-D(x))] + E[softplus(D(x_hat))]) / 2.
  """
  real = logits_real.astype(jnp.float32)
  fake = logits_fake.astype(jnp.float32)
  if kind == 'hinge':
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real))
                  + jnp.mean(jax.nn.relu(1.0 + fake)))
  return 0.5 * (jnp.mean(jax.nn.softplus(-real))
                + jnp.mean(jax.nn.softplus(fake)))


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array) -> jax.Array:
  """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_G|| + delta), clipped
  to [0, 1e4] (Esser et al. 2021, eq. 7): the gradients w.r.t. the last
  layer G_L of the decoder, so the GAN term moves that layer as much as
  the reconstruction term does. A constant for the update (stop-gradient,
  LDM's .detach())."""
  weight = jnp.linalg.norm(rec_grad.ravel()) / (
      jnp.linalg.norm(gan_grad.ravel()) + ADAPTIVE_WEIGHT_EPS)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, ADAPTIVE_WEIGHT_MAX))


def disc_factor(step: jax.Array, disc_start: int) -> jax.Array:
  """0 before step disc_start (0-based), 1 from it on (taming's
  adopt_weight): the autoencoder first learns to reconstruct, then the GAN
  term and the discriminator's updates switch on together."""
  return jnp.where(step >= disc_start, 1.0, 0.0).astype(jnp.float32)
