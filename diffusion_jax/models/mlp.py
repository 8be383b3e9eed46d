"""A time-conditioned residual MLP: the denoiser for low-dimensional data.

For 2-D toy distributions (where every objective and sampler can be checked
against the data in seconds) and, flattened, for tiny images. Inputs of any
shape (B, ...) are flattened to vectors and the output has the input's shape
with `out_channels` in the last axis, like the U-Net, so losses and samplers
take either network.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.unet import timestep_embedding


class MLP(nn.Module):
  """f(x_t, t[, y]) with LayerNorm-swish-Dense residual blocks.

  Attributes:
    out_channels: channels of the output's last axis (the input's last axis
      size, doubled when a variance is learned).
    hidden: width of the hidden layers.
    depth: residual blocks.
    temb_dim: sinusoidal time-embedding size.
    num_classes: 0, or K labelled classes plus a null class K (as the U-Net).
  """
  out_channels: int
  hidden: int = 256
  depth: int = 3
  temb_dim: int = 64
  num_classes: int = 0

  @nn.compact
  def __call__(self, x, t, y=None, *, train: bool = False):
    del train  # no dropout
    batch, shape = x.shape[0], x.shape[1:]
    emb = nn.Dense(self.hidden, name='time_embedding')(
        timestep_embedding(t, self.temb_dim))
    if self.num_classes:
      if y is None:
        y = jnp.full((batch,), self.num_classes, jnp.int32)
      emb += nn.Embed(self.num_classes + 1, self.hidden,
                      name='class_embedding')(y)
    h = nn.Dense(self.hidden, name='dense_in')(x.reshape(batch, -1)) + emb
    for i in range(self.depth):
      r = nn.Dense(self.hidden, name=f'block_{i}_0')(
          nn.swish(nn.LayerNorm(name=f'block_{i}_norm')(h)))
      h = h + nn.Dense(self.hidden, name=f'block_{i}_1')(nn.swish(r + emb))
    out_shape = (*shape[:-1], self.out_channels)
    out = nn.Dense(math.prod(out_shape),
                   kernel_init=nn.initializers.zeros_init(), name='dense_out')(
                       nn.swish(nn.LayerNorm(name='norm_out')(h)))
    return out.reshape(batch, *out_shape)
