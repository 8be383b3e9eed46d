"""Diffusion on an autoencoder's latents (Rombach et al. 2022; DiT).

config.method='diffusion' with config.latent.autoencoder set and
config.data.source='latents' builds this method: the network (U-Net or
DiT) is trained on scaled latents z = s * (mean + exp(logvar / 2) eps) of
q(z|x), read from a latent cache (latent/store.py, written once by `python
-m diffusion_jax.cache_latents`), and `sample` decodes its samples,
x = decoder(z / s), so the sample grids, --mode=sample and sample quality
see pixels in [-1, 1] as for any method.

Shapes: `image_shape` is the latent shape (H/f, W/f, C), the shape of the
network's input and of `noise_shape`; `pixel_shape` (H, W, channels) is the
shape of what `sample` returns. A training batch is the cache's moments,
(B, 2, H/f, W/f, C) [mean; logvar] (and labels), and `draw` samples z from
them with the step's random key, as it draws the diffusion noise (the input
pipeline sees only config.data, so config.latent.sample_posterior is
applied here); with sample_posterior False z is s * mean.

Where the autoencoder lives: only its decoder half (post_quant_conv and the
decoder; the encoder runs only when caching) is in the train state's
auxiliary slot, as a distillation student keeps its teacher
(methods/distillation.py). So it is checkpointed with the run and never
reaches the optimizer or the EMA; resuming, sample mode and eval decode
with exactly the decoder the run started from, without reading the
autoencoder's weights again; and `sample_params` hands it to `sample`
beside the EMA network parameters (the trainer's parameter count includes
it). Its weights are read once, in `prepare()`, where their hash is checked
against the cache's manifest; everything else about the cache (config
identity, shapes, scale, data) is checked when the method is built, before
anything compiles.

Sampling needs no cache: where config.data.data_dir holds no complete one
(sample mode of imported weights, convert/diffusers_cli.py; a run whose
cache was deleted) the method is built from the config alone, with the
scale config.latent.scale_factor or else the diffusers VAE's
scaling_factor, the decoder coming from the checkpoint. Training still
needs the cache: `prepare()` then raises the cache's error, before
anything compiles.
"""

import os

from absl import logging
import jax
import jax.numpy as jnp

from diffusion_jax.latent import autoencoder_source, store
from diffusion_jax.methods.diffusion import DiffusionMethod
from diffusion_jax.models import autoencoder as autoencoder_lib


class LatentDiffusion(DiffusionMethod):
  """DiffusionMethod on cached latents; samples are decoded to pixels."""

  name = 'latent_diffusion'
  # The cache's error where config.data.data_dir holds none (sampling only).
  missing_cache = None

  def setup_latent(self, *, info, scale: float, pixel_shape, manifest,
                   sample_posterior: bool) -> None:
    self.autoencoder_info = info
    self.autoencoder = info.model()
    self.scale = float(scale)
    self.pixel_shape = tuple(pixel_shape)
    self.manifest = manifest
    self.sample_posterior = sample_posterior

  @classmethod
  def from_config(cls, config, **kwargs) -> 'LatentDiffusion':
    """Checks the cache against the config (store.check), if there is one,
    and builds the network for the latent shape."""
    latent, data = config.latent, config.data
    info = autoencoder_source.describe(latent.autoencoder,
                                       latent.autoencoder_step)
    if info.in_channels != data.channels or data.image_size % info.down_factor:
      raise ValueError(
          f'config.latent.autoencoder={info.path!r} encodes '
          f'{info.in_channels}-channel images with sides divisible by '
          f'f={info.down_factor}: config.data.channels={data.channels} and '
          f'config.data.image_size={data.image_size} do not fit it')
    manifest, missing = _manifest_or_none(data.data_dir)
    if manifest is None:
      scale = _scale_without_cache(config, info, missing)
    else:
      scale = store.check(manifest, config, info, data.data_dir)
    latent_shape = info.latent_shape(data.image_size)
    _check_network(config.model, latent_shape)
    method = super().from_config(config, image_shape=latent_shape, **kwargs)
    method.setup_latent(
        info=info, scale=scale, manifest=manifest,
        pixel_shape=(data.image_size, data.image_size, data.channels),
        sample_posterior=latent.sample_posterior)
    method.missing_cache = missing
    return method

  def describe(self) -> str:
    h, w, c = self.image_shape
    return (f'latent {super().describe()}, on {h}x{w}x{c} latents of the '
            f'f={self.autoencoder_info.down_factor} autoencoder '
            f'{self.autoencoder_info.path} (scale {self.scale:.5g})')

  # -------------------------------------------------------------- state --

  def _loaded(self) -> autoencoder_source.Autoencoder:
    ae = autoencoder_source.load(self.autoencoder_info.path,
                                 self.autoencoder_info.step or 0)
    if self.manifest is None:  # an import (no cache to agree with)
      return ae
    cached = self.manifest['autoencoder']['params_sha256']
    if ae.params_sha256 != cached:
      raise store.LatentCacheError(
          f'the autoencoder in config.latent.autoencoder={ae.info.path!r} '
          'has other parameters than the one that wrote the latent cache '
          'in config.data.data_dir (same config, another checkpoint or '
          'weights file): point config.latent.autoencoder at that one, or '
          're-cache into a new config.data.data_dir')
    return ae

  def prepare(self):
    if self.missing_cache is not None:  # training reads the cache
      raise self.missing_cache
    self._loaded()  # outside jit; init closes over its arrays

  def init_aux_state(self):
    """The frozen decoder (and diffusion's loss history, if any)."""
    aux = {'decoder': jax.tree.map(jnp.asarray,
                                   self._loaded().decoder_params())}
    history = super().init_aux_state()
    if history is not None:
      aux['history'] = history
    return aux

  def abstract_init(self):
    def shapes(rng):
      full = autoencoder_lib.init_params(
          self.autoencoder, rng, in_channels=self.autoencoder_info.in_channels)
      aux = {'decoder': {k: full[k] for k in autoencoder_source.DECODER_PARTS}}
      history = DiffusionMethod.init_aux_state(self)
      if history is not None:
        aux['history'] = history
      return self.state_from(self.init_params(rng), aux)
    return jax.eval_shape(shapes, jax.random.key(0))

  def sample_params(self, state):
    return {'network': state.ema_params,
            'decoder': state.loss_history['decoder']}

  # ----------------------------------------------------------- training --

  def draw(self, batch, rng, aux):
    moments, labels = batch if self.with_labels else (batch, None)
    z_rng, rng = jax.random.split(rng)
    mean = moments[:, 0]
    if self.sample_posterior:
      z = autoencoder_lib.sample(mean, moments[:, 1], z_rng)
    else:
      z = mean
    z = self.scale * z
    return super().draw((z, labels) if self.with_labels else z, rng,
                        aux.get('history'))

  def update_aux_state(self, aux, xs, values):
    if 'history' not in aux:
      return aux
    return {**aux, 'history': super().update_aux_state(aux['history'], xs,
                                                       values)}

  # ----------------------------------------------------------- sampling --

  def decode(self, decoder_params, z):
    """Scaled latents -> images in [-1, 1] (pixel_shape)."""
    images = self.autoencoder.apply(
        {'params': decoder_params}, z / self.scale,
        method=autoencoder_lib.AutoencoderKL.decode)
    return jnp.clip(images, -1.0, 1.0)

  def sample(self, params, noise, rng):
    z = super().sample(params['network'], noise, rng)
    return self.decode(params['decoder'], z)

  def sample_progressive(self, params, noise, rng, x0_at):
    z, preds = super().sample_progressive(params['network'], noise, rng,
                                          x0_at)
    decoded = self.decode(params['decoder'],
                          preds.reshape(-1, *preds.shape[2:]))
    return (self.decode(params['decoder'], z),
            decoded.reshape(*preds.shape[:2], *decoded.shape[1:]))

  def log_likelihood(self, params, images, rng):
    """None: the diffusion bound is one of latents, not of the 8-bit
    images (LDM reports none either)."""
    del params, images, rng
    return None


def _manifest_or_none(data_dir: str):
  """(the cache's manifest, None), or (None, the LatentCacheError saying how
  to write one) where data_dir holds no manifest.json. A manifest that is
  there but of another format or version is an error at once."""
  try:
    return store.read_manifest(data_dir), None
  except store.LatentCacheError as e:
    if data_dir and '://' not in data_dir and os.path.isfile(
        os.path.join(store.cache_dir(data_dir), store.MANIFEST)):
      raise
    return None, e


def _scale_without_cache(config, info, missing) -> float:
  """The latent scale where no cache records one: config.latent.scale_factor,
  else the diffusers VAE's scaling_factor; an autoencoder run's scale (1/std
  of its training latents) is recorded only in its cache."""
  scale = config.latent.scale_factor or info.scaling_factor
  if not scale:
    raise store.LatentCacheError(
        f'{missing} -- and without the cache the latent scale of '
        f'config.latent.autoencoder={info.path!r} (an autoencoder run: 1/std '
        'of its cached training latents) is unknown: set '
        'config.latent.scale_factor to the scale_factor in the manifest.json '
        'of the cache the network was trained on')
  logging.info('No latent cache in config.data.data_dir=%r: sampling only '
               '(training needs it); scale %.6g from %s.',
               config.data.data_dir, scale,
               'config.latent.scale_factor' if config.latent.scale_factor
               else "the VAE's scaling_factor")
  return float(scale)


def _check_network(model, latent_shape) -> None:
  """The network's sizes fit the latents (create_model's messages name
  config.data.image_size, which is the pixels' here)."""
  size = latent_shape[0]
  if model.name == 'dit' and size % model.patch_size:
    raise ValueError(
        f'config.model.patch_size={model.patch_size} does not divide the '
        f'{size}x{size} latents (config.data.image_size / f): use a patch '
        'size that does, or another autoencoder')
  if model.name == 'unet' and size % 2 ** (len(model.ch_mult) - 1):
    raise ValueError(
        f'config.model.ch_mult={tuple(model.ch_mult)}: the U-Net cannot '
        f'halve the {size}x{size} latents {len(model.ch_mult) - 1} times; '
        'use fewer levels')
