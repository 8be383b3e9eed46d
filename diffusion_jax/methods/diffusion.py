"""Diffusion as a method: one network, any process, prediction and loss.

The process (discrete DDPM or a continuous path), the prediction target, the
loss and the sampler are chosen once from their registries
(diffusion/processes.py, losses.py, sampling.py); the network is wrapped
once into a denoiser (diffusion/denoiser.py) that every sampler and the
bits/dim bound go through.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import models
from diffusion_jax.data import captions as captions_lib
from diffusion_jax.diffusion import (bound_report, denoiser, guidance,
                                     likelihood, losses, processes, sampling,
                                     sde)
from diffusion_jax.methods.base import OneOptimizerMethod, one_optimizer_kwargs


class DiffusionMethod(OneOptimizerMethod):
  """Trains network(x_t, t[, y]) to predict `prediction` under `loss`.

  Batches are images, or (images, labels) for a class-conditional network
  (num_classes > 0), whose labels are replaced by the null class with
  probability label_dropout (classifier-free guidance, Ho & Salimans 2022),
  or (images, (token ids (B, L), mask (B, L))) of captions (config.data.
  captions) for a network that cross-attends to them, whose masks are set
  all False (the null sequence) with probability context_dropout.
  t is drawn per example: uniformly, importance-sampled from the loss
  history in the state (ddpm with hybrid/vlb), logit-normal (continuous
  processes) or log-normal in sigma (edm); under importance sampling each example's loss is weighted by
  1 / (T p_t).
  """

  name = 'diffusion'

  def __init__(self, *, network: nn.Module, process, prediction: str,
               loss: str, image_shape: tuple[int, ...],
               sample_settings: sampling.SampleSettings,
               time_sampling: str = 'uniform', logit_normal_mean: float = 0.0,
               logit_normal_std: float = 1.0, num_classes: int = 0,
               label_dropout: float = 0.1, guidance_scale: float = 0.0,
               class_label: int = -1,
               captions: captions_lib.CaptionContext | None = None,
               context_dropout: float = 0.1, **optim):
    super().__init__(**optim)
    self.network, self.process = network, process
    self.prediction, self.loss_name = prediction, loss
    self.image_shape = tuple(image_shape)
    self.sample_settings = sample_settings
    self.time_sampling = time_sampling
    self.logit_normal = (logit_normal_mean, logit_normal_std)
    self.num_classes, self.label_dropout = num_classes, label_dropout
    self.with_labels = num_classes > 0
    self.guidance_scale, self.class_label = guidance_scale, class_label
    self.captions, self.context_dropout = captions, context_dropout
    self.with_context = captions is not None
    self.importance = (losses.ImportanceSampler(process.num_timesteps)
                       if time_sampling == 'importance' else None)
    self._per_example = losses.per_example_loss(loss, prediction)

  @classmethod
  def from_config(cls, config, *, network: nn.Module | None = None,
                  image_shape: tuple[int, ...] | None = None
                  ) -> 'DiffusionMethod':
    """The method of config.diffusion / model / sample / optim, checked.
    `network` and `image_shape` replace the config's (e.g. an MLP on 2-D
    points)."""
    d, s = config.diffusion, config.sample
    losses.check_config(d)
    process = processes.create_process(d)
    settings = sampling.SampleSettings.from_config(config)
    sampling.check(process, d.prediction, settings)
    m, captioned = config.model, bool(config.data.get('captions', ''))
    if s.guidance_scale and not (m.num_classes or captioned):
      raise ValueError(
          f'config.sample.guidance_scale={s.guidance_scale} needs a class-'
          'conditional model (config.model.num_classes > 0) or captions '
          '(config.data.captions)')
    if m.num_classes:
      guidance.class_labels(1, m.num_classes, s.class_label)
    if captioned != bool(m.get('context_dim', 0)) or (
        captioned and m.num_classes):
      raise ValueError(
          f'config.data.captions={config.data.get("captions", "")!r} and '
          f'config.model.context_dim={m.get("context_dim", 0)} go together '
          f'(and without config.model.num_classes={m.num_classes}): set both '
          'or neither, and num_classes=0 with captions')
    captions = captions_lib.CaptionContext.from_config(config) if (
        captioned) else None
    if image_shape is None:
      data = config.data
      image_shape = (data.image_size, data.image_size, data.channels)
    if network is None:
      channels = image_shape[-1] * (2 if losses.learns_variance(d.loss) else 1)
      network = models.create_model(config.model, out_channels=channels,
                                    image_size=image_shape[0])
    return cls(
        network=network, process=process, prediction=d.prediction,
        loss=d.loss, image_shape=image_shape, sample_settings=settings,
        time_sampling=d.time_sampling, logit_normal_mean=d.logit_normal_mean,
        logit_normal_std=d.logit_normal_std,
        num_classes=config.model.num_classes,
        label_dropout=config.model.label_dropout,
        guidance_scale=s.guidance_scale, class_label=s.class_label,
        captions=captions, context_dropout=m.get('context_dropout', 0.1),
        **one_optimizer_kwargs(config))

  def describe(self) -> str:
    kind = 'ddpm' if self.process.is_discrete else self.process.kind
    return (f'diffusion: {kind} process, {self.prediction} prediction, '
            f'{self.loss_name} loss, {self.sample_settings.sampler} sampler'
            + (', cross-attending to captions' if self.with_context else ''))

  # ------------------------------------------------------------ networks --

  def init_params(self, rng):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.network.init({'params': rng}, x, jnp.zeros((1,), jnp.float32),
                             train=False)['params']

  @property
  def takes_guidance(self) -> bool:
    """The network takes the guidance weight as an input (a guidance-
    conditioned distillation student): sampling feeds it
    config.sample.guidance_scale instead of combining two predictions."""
    return getattr(self.network, 'guidance_input', False)

  def network_fn(self, params, labels=None, *, train: bool = False,
                 dropout_rng=None, guidance=None, context=None,
                 context_mask=None) -> denoiser.NetworkFn:
    """(x_t, t) -> the network's output at the process's time t (the
    network sees process.model_time(t)); labels None: the null class;
    guidance: (B,) weights for a network that takes them; context (B, L)
    ids or (B, L, D) embeddings and context_mask (B, L) for one that
    cross-attends (None: the null sequence)."""
    rngs = {'dropout': dropout_rng} if train else None
    extra = {} if guidance is None else {'guidance': guidance}
    if context is not None:
      extra.update(context=context, context_mask=context_mask)
    return lambda x, t: self.network.apply(
        {'params': params}, x, self.process.model_time(t), labels,
        train=train, rngs=rngs, **extra)

  # ------------------------------------------------------------ training --

  def init_aux_state(self):
    return self.importance.init() if self.importance else None

  def draw(self, batch, rng, loss_history):
    if self.with_context:
      images, (ids, mask) = batch
    else:
      images, labels = batch if self.with_labels else (batch, None)
    t_rng, label_rng = jax.random.split(rng)
    n = images.shape[0]
    weights = jnp.ones((n,), jnp.float32)
    if self.process.is_discrete:
      probs = self.importance.probs(loss_history) if self.importance else None
      t, noise = losses.draw_t_and_noise(self.process, images, t_rng, probs)
      if self.importance:
        weights = self.importance.weights(probs, t)
    elif self.process.kind == 'edm':
      time_rng, noise_rng = jax.random.split(t_rng)
      t = self.process.sample_time(time_rng, n)
      noise = jax.random.normal(noise_rng, images.shape, images.dtype)
    else:
      time_rng, noise_rng = jax.random.split(t_rng)
      t = sde.sample_time(time_rng, n, method=self.time_sampling,
                          t_min=self.process.t_min,
                          logit_mean=self.logit_normal[0],
                          logit_std=self.logit_normal[1])
      noise = jax.random.normal(noise_rng, images.shape, images.dtype)
    if self.with_labels:
      drop = jax.random.bernoulli(label_rng, self.label_dropout, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)
    if self.with_context:  # label_rng is free: captions exclude labels
      return dict(x0=images, t=t, noise=noise, weights=weights,
                  **self.drop_context(ids, mask, label_rng))
    return dict(x0=images, t=t, noise=noise, weights=weights, labels=labels)

  def drop_context(self, ids, mask, rng) -> dict:
    """The network's context of a batch's captions, each row's mask set
    all False (the null sequence) with probability context_dropout."""
    context, context_mask = self.captions.network_context(ids, mask)
    drop = jax.random.bernoulli(rng, self.context_dropout, (ids.shape[0],))
    return dict(labels=None, context=context,
                context_mask=context_mask & ~drop[:, None])

  def loss(self, params, xs, rng):
    network_fn = self.network_fn(params, xs['labels'], train=True,
                                 dropout_rng=rng, context=xs.get('context'),
                                 context_mask=xs.get('context_mask'))
    values = self._per_example(network_fn, self.process, xs['x0'], xs['t'],
                               xs['noise'])
    return jnp.mean(xs['weights'] * values), values

  def update_aux_state(self, loss_history, xs, values):
    if self.importance is None:
      return loss_history
    return self.importance.update(loss_history, xs['t'], values)

  # ------------------------------------------------------------ sampling --

  def denoiser(self, params, num: int) -> denoiser.DenoiseFn:
    """The network as a denoiser for a batch of `num` samples, with
    classifier-free guidance for a conditional model (labels from
    config.sample.class_label), or w as the input of a network that takes
    it."""
    if self.takes_guidance:  # one call at w (Meng et al. 2023)
      labels = guidance.class_labels(num, self.num_classes, self.class_label)
      network_fn = self.network_fn(
          params, labels,
          guidance=jnp.full((num,), self.guidance_scale, jnp.float32))
    elif self.with_context:  # captions of config.sample.captions, cycled
      context = self.captions.network_context(*self.captions.sample_tokens(
          num))
      apply_fn = lambda x, t, c: self.network_fn(
          params, context=c[0], context_mask=c[1])(x, t)
      network_fn = guidance.guided_condition(
          apply_fn, context, (context[0], jnp.zeros_like(context[1])),
          scale=self.guidance_scale, channels=self.image_shape[-1])
    elif self.num_classes:
      labels = guidance.class_labels(num, self.num_classes, self.class_label)
      apply_fn = lambda x, t, y: self.network_fn(params, y)(x, t)
      network_fn = guidance.guided_model(
          apply_fn, labels, null_label=self.num_classes,
          scale=self.guidance_scale, channels=self.image_shape[-1])
    else:
      network_fn = self.network_fn(params)
    return denoiser.make_denoiser(network_fn, self.process, self.prediction)

  def sample_captions(self, num: int) -> list[str] | None:
    """The caption each of `num` images of one `sample` call is drawn for
    (None without captions): what sample mode should write beside them."""
    return self.captions.sample_captions_of(num) if self.with_context else None

  def sample(self, params, noise, rng):
    return sampling.run(self.denoiser(params, noise.shape[0]), self.process,
                        noise, rng, self.sample_settings)

  def evaluations_per_call(self) -> int:
    """Network evaluations per image in one denoiser call: 2 under
    classifier-free guidance (conditional and null-class rows), else 1."""
    guided = (self.num_classes or self.with_context) and self.guidance_scale
    return 2 if guided and not self.takes_guidance else 1

  def network_calls(self) -> int:
    return (sampling.network_calls(self.process, self.sample_settings)
            * self.evaluations_per_call())

  def sample_progressive(self, params, noise, rng, x0_at):
    """(images, x0_hat at the 0-based timesteps x0_at): DDPM sec. 4.3."""
    return sampling.run(self.denoiser(params, noise.shape[0]), self.process,
                        noise, rng, self.sample_settings, x0_at=x0_at)

  # ---------------------------------------------------------- evaluation --

  def log_likelihood(self, params, images, rng) -> dict[str, Any] | None:
    """The variational bound (DDPM eq. 5) in bits/dim and its terms, for
    the discrete process; a conditional model is scored with the null
    class. None for the continuous processes (no bound implemented)."""
    if not self.process.is_discrete:
      return None
    denoise_fn = denoiser.make_denoiser(self.network_fn(params), self.process,
                                        self.prediction)
    return likelihood.vlb_terms(
        denoise_fn, self.process, images, rng,
        variance=self.sample_settings.variance,
        clip_denoised=self.sample_settings.clip_denoised)

  def summarize_likelihood(self, means: dict) -> dict:
    return bound_report.summarize(means, self.process.num_timesteps)

  def write_likelihood_figures(self, metrics: dict, out_dir) -> None:
    bound_report.plot_curves(metrics, out_dir / 'curve.png')
