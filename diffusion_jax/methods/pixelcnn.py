"""PixelCNN++ as a method (Salimans et al. 2017, ICLR): exact likelihood,
pixel-by-pixel sampling.

The network (models/pixelcnn.py) maps an image to, at every pixel, the
parameters of a discretised logistic mixture over that pixel's 8-bit values
given the pixels before it in raster order (models/logistic_mixture.py).
Training minimises the negative log-likelihood in bits/dim,

  -log2 p(x) / (H W C) = -sum_pixels log p(x_rc | x_<rc) / (H W C ln 2),

which for 8-bit data is the exact NLL (no dequantisation, no bound), so
`log_likelihood` is the same number without dropout and eval mode reports
it. Sampling runs H W network passes in one lax.fori_loop, each drawing
one pixel (its channels one after another, through the mixture's RGB
coupling) from the network's output at that pixel, with randomness from
rng folded with the pixel's index. The `noise` argument only gives the
number of images; its values are not used.

The learning rate is config.optim's (warm-up, then constant) times
config.pixelcnn.lr_decay^step: openai/pixel-cnn's train.py multiplies it by
0.999995 every step.
"""

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.methods.base import OneOptimizerMethod, one_optimizer_kwargs
from diffusion_jax.models import logistic_mixture
from diffusion_jax.models.pixelcnn import PixelCNNPP
from diffusion_jax.train_state import learning_rate_schedule


def decayed_learning_rate(optim_config, lr_decay: float):
  """step -> config.optim's schedule (linear warm-up, then constant) times
  lr_decay^step (openai/pixel-cnn: lr *= lr_decay before every step)."""
  base = learning_rate_schedule(optim_config)
  if lr_decay == 1.0:
    return base
  return lambda step: base(step) * jnp.power(
      jnp.float32(lr_decay), jnp.asarray(step, jnp.float32))


def _check_config(config) -> None:
  """Raises ValueError naming the key, the value and a fix."""
  p, data = config.pixelcnn, config.data
  for key, low, why in (
      ('nr_logistic_mix', 1, 'the number of logistic components per pixel; '
       'PixelCNN++ uses 10'),
      ('nr_resnet', 1, 'gated ResNet blocks per resolution; PixelCNN++ uses '
       '5'),
      ('nr_filters', 1, 'the width of both streams; PixelCNN++ uses 160'),
      ('num_resolutions', 1, 'the U-Net-like pass\'s levels; PixelCNN++ '
       'uses 3 (32, 16, 8)')):
    value = p[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'config.pixelcnn.{key}={value!r} must be an integer '
                       f'>= {low}: {why}')
  if not 0.0 <= p.dropout < 1.0:
    raise ValueError(f'config.pixelcnn.dropout={p.dropout!r} must be in '
                     '[0, 1): the probability of dropping a unit in each '
                     'gated ResNet block (PixelCNN++: 0.5)')
  if not 0.0 < p.lr_decay <= 1.0:
    raise ValueError(f'config.pixelcnn.lr_decay={p.lr_decay!r} must be in '
                     '(0, 1]: the learning rate is multiplied by it every '
                     'step (1.0: no decay; PixelCNN++: 0.999995)')
  factor = 2 ** (p.num_resolutions - 1)
  if data.image_size % factor:
    raise ValueError(
        f'config.data.image_size={data.image_size} is not divisible by '
        f'{factor}, the downsampling of config.pixelcnn.num_resolutions='
        f'{p.num_resolutions} (halved {p.num_resolutions - 1} times): use '
        'fewer resolutions or another image size')
  if data.channels not in (1, 3):
    raise ValueError(
        f'config.data.channels={data.channels}: the discretised logistic '
        'mixture is defined for 1 channel (the plain mixture) or 3 (RGB with '
        'PixelCNN++\'s linear channel coupling, sec. 2.2); use 1 or 3')
  if config.model.num_classes:
    raise ValueError(
        f'config.model.num_classes={config.model.num_classes}: the '
        "'pixelcnn' method is unconditional (class conditioning is not "
        'implemented); set it to 0')


class PixelCNNMethod(OneOptimizerMethod):
  """Trains PixelCNN++ by maximum likelihood; the state is TrainState."""

  name = 'pixelcnn'

  def __init__(self, *, network: PixelCNNPP, image_shape: tuple[int, ...],
               num_mix: int, **optim):
    super().__init__(**optim)
    self.network = network
    self.image_shape = tuple(image_shape)
    self.num_mix = num_mix

  @classmethod
  def from_config(cls, config) -> 'PixelCNNMethod':
    """The method of config.pixelcnn, config.data and config.optim (Adam
    with its betas, eps, clipping, warm-up and EMA), checked."""
    _check_config(config)
    p, data, optim = config.pixelcnn, config.data, config.optim
    image_shape = (data.image_size, data.image_size, data.channels)
    network = PixelCNNPP(
        out_channels=logistic_mixture.num_params(data.channels,
                                                 p.nr_logistic_mix),
        nr_resnet=p.nr_resnet, nr_filters=p.nr_filters,
        num_resolutions=p.num_resolutions, dropout=p.dropout)
    learning_rate_fn = decayed_learning_rate(optim, p.lr_decay)
    clip = ([optax.clip_by_global_norm(optim.grad_clip_norm)]
            if optim.grad_clip_norm > 0 else [])
    optimizer = optax.chain(*clip, optax.adam(
        learning_rate_fn, b1=optim.adam_b1, b2=optim.adam_b2,
        eps=optim.adam_eps))
    return cls(
        network=network, image_shape=image_shape,
        num_mix=p.nr_logistic_mix,
        **one_optimizer_kwargs(config, optimizer=optimizer,
                               learning_rate_fn=learning_rate_fn))

  def describe(self) -> str:
    n = self.network
    return (f'pixelcnn: PixelCNN++, {n.num_resolutions} resolutions, '
            f'nr_resnet {n.nr_resnet}, {n.nr_filters} filters, '
            f'{self.num_mix} logistics, dropout {n.dropout:g}')

  # ------------------------------------------------------------ networks --

  def init_params(self, rng):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.network.init({'params': rng}, x, train=False)['params']

  def bits_per_dim(self, params, images, *, train: bool = False,
                   dropout_rng=None) -> jax.Array:
    """-log2 p(images) / (H W C): (B, H, W, C) in [-1, 1] on the 8-bit
    grid -> (B,)."""
    out = self.network.apply(
        {'params': params}, images, train=train,
        rngs={'dropout': dropout_rng} if train else None)
    nats = -jnp.sum(logistic_mixture.log_prob(images, out, self.num_mix),
                    axis=(1, 2))
    return nats / (jnp.log(2.0) * images[0].size)

  # ------------------------------------------------------------ training --

  def loss(self, params, images, rng):
    bpd = self.bits_per_dim(params, images, train=True, dropout_rng=rng)
    return jnp.mean(bpd), bpd

  # ---------------------------------------------------------- evaluation --

  def log_likelihood(self, params, images, rng):
    """The exact NLL of the 8-bit images in bits/dim (no dropout)."""
    del rng  # deterministic
    return {'total_bpd': self.bits_per_dim(params, images)}

  # ------------------------------------------------------------ sampling --

  def sample(self, params, noise, rng):
    """noise.shape[0] images, (n, H, W, C) on the 8-bit grid in [-1, 1].

    Pixel i = r W + c is drawn at step i of one fori_loop from the full
    network's output at (r, c): the output there depends only on pixels
    already drawn (the rest are still zero), so one pass per pixel; the
    pixel's channels are drawn in order inside the mixture's sampler."""
    n = noise.shape[0]
    height, width, channels = self.image_shape

    def draw_pixel(i, images):
      row, col = i // width, i % width
      out = self.network.apply({'params': params}, images, train=False)
      at_pixel = jax.lax.dynamic_slice_in_dim(
          jax.lax.dynamic_slice_in_dim(out, row, 1, axis=1), col, 1, axis=2)
      value = logistic_mixture.sample(at_pixel, jax.random.fold_in(rng, i),
                                      channels, self.num_mix)
      return jax.lax.dynamic_update_slice(images, value.astype(images.dtype),
                                          (0, row, col, 0))

    images = jnp.zeros((n, height, width, channels), jnp.float32)
    return jax.lax.fori_loop(0, height * width, draw_pixel, images)

  def network_calls(self) -> int:
    return self.image_shape[0] * self.image_shape[1]
