"""PixelCNN++ (Salimans et al. 2017, ICLR): the network.

An autoregressive model over pixels in raster order: the output at pixel
(r, c) parametrises p(x_rc | x_<rc) (a discretised logistic mixture,
logistic_mixture.py) and must depend on the pixels above and to the left
only. As van den Oord et al.'s gated PixelCNN and openai/pixel-cnn's
`model_spec`, it is built from two streams of shifted (not masked)
convolutions:

  u  ("up"):      sees the rows strictly above: down-shifted 2x3 convs;
  ul ("up-left"): sees the rows above and the pixels to the left in the
                  current row: down-right-shifted 2x2 convs, fed u.

Each layer pads only above (and left), so an output never reaches below
(or right of) its position, and the first layer shifts its result down
(right) by one so the pixel itself is excluded; stacking keeps the
property. The streams go through a U-Net-like pass (paper fig. 2): the up
pass runs nr_resnet gated ResNet blocks per resolution, downsampling by
strided shifted convolutions in between, and keeps every activation; the
down pass runs nr_resnet (+1 above the lowest resolution) blocks, each
taking one kept activation as a short-cut input, and upsamples with
shifted transposed convolutions (sec. 2.3, 2.4). Dropout sits inside the
blocks (sec. 2.5). openai/pixel-cnn has three resolutions (32, 16, 8 for
CIFAR-10); here their number is num_resolutions, so 8x8 digits can use two.

Deviation, stated: openai's layers are weight-normalised with a data-
dependent initialisation; these are plain convolutions with Flax's default
(LeCun normal) initialisation, the second convolution of each block scaled
by 0.1 as openai's init_scale=0.1 (each block starts near the identity).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import conv as conv_lib

# nn.Conv (same parameters) with the faster weight gradient on XLA:CPU.
Conv = functools.partial(nn.Conv,
                         conv_general_dilated=conv_lib.conv_general_dilated)
# openai's init_scale=0.1 for a block's last convolution: its output starts
# at 0.1 of the unit-variance scale (variance 0.01 of LeCun normal's).
SMALL_INIT = nn.initializers.variance_scaling(0.01, 'fan_in',
                                              'truncated_normal')


# ------------------------------------------------------------- layers --


def down_shift(x: jax.Array) -> jax.Array:
  """(B, H, W, C): row r takes row r - 1's values, row 0 zeros."""
  return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def right_shift(x: jax.Array) -> jax.Array:
  """(B, H, W, C): column c takes column c - 1's values, column 0 zeros."""
  return jnp.pad(x, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]


def concat_elu(x: jax.Array) -> jax.Array:
  """elu([x, -x]) on the channels (openai's concat_elu; doubles them)."""
  return jax.nn.elu(jnp.concatenate([x, -x], axis=-1))


class DownShiftedConv(nn.Module):
  """A kh x kw conv whose output at (r, c) sees rows r - kh + 1..r and
  columns c - (kw-1)/2..c + (kw-1)/2: padded above and on both sides, never
  below. Stride 2 halves H and W (even sizes)."""
  features: int
  kernel: tuple[int, int] = (2, 3)
  strides: int = 1
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    return Conv(self.features, self.kernel, strides=self.strides,
                padding=((kh - 1, 0), ((kw - 1) // 2, (kw - 1) // 2)),
                kernel_init=self.kernel_init)(x)


class DownRightShiftedConv(nn.Module):
  """A kh x kw conv whose output at (r, c) sees rows r - kh + 1..r and
  columns c - kw + 1..c: padded above and on the left only."""
  features: int
  kernel: tuple[int, int] = (2, 2)
  strides: int = 1
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    return Conv(self.features, self.kernel, strides=self.strides,
                padding=((kh - 1, 0), (kw - 1, 0)),
                kernel_init=self.kernel_init)(x)


class ShiftedConvTranspose(nn.Module):
  """x2 upsampling, (B, h, w, C) -> (B, 2h, 2w, features): a stride-2
  transposed conv (2x3 for u, 2x2 for ul), cropped as openai's
  down_shifted_deconv2d / down_right_shifted_deconv2d.

  Low-resolution row i reaches output rows 2i and 2i + 1 only (column j:
  2j - 1..2j + 1 for 2x3, 2j..2j + 1 for 2x2), so what was causal at the
  low resolution stays causal: its row i summarises input rows < 2i."""
  features: int
  kernel: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    _, h, w, _ = x.shape
    y = nn.ConvTranspose(self.features, self.kernel, strides=(2, 2),
                         padding='VALID')(x)
    # VALID: (2h, 2w + kw - 2); the 2x3 kernel's extra column on the right
    # and one on the left are cut, centring it as the down-shifted conv.
    left = (self.kernel[1] - 1) // 2
    return y[:, :2 * h, left:left + 2 * w]


class GatedResNet(nn.Module):
  """openai's gated_resnet (paper fig. 2; dropout: sec. 2.5):

    c = conv(concat_elu(x)) [+ nin(concat_elu(aux))]
    a, b = split(conv(dropout(concat_elu(c))), 2)
    return x + a * sigmoid(b)

  conv is down-shifted 2x3 ('down', the u stream) or down-right-shifted
  2x2 ('down_right', ul); aux is the short-cut input (u for ul, and the
  kept up-pass activations in the down pass). Shapes: x (B, H, W, F),
  aux (B, H, W, any) -> (B, H, W, F)."""
  shift: str  # 'down' | 'down_right'
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, aux=None, *, train: bool = False):
    features = x.shape[-1]
    conv = (DownShiftedConv if self.shift == 'down' else DownRightShiftedConv)
    c = conv(features)(concat_elu(x))
    if aux is not None:  # nin: a 1x1 conv on the short-cut
      c = c + nn.Dense(features, name='nin_aux')(concat_elu(aux))
    c = nn.Dropout(self.dropout, deterministic=not train)(concat_elu(c))
    a, b = jnp.split(conv(2 * features, kernel_init=SMALL_INIT)(c), 2,
                     axis=-1)
    return x + a * jax.nn.sigmoid(b)


# ------------------------------------------------------------ network --


class PixelCNNPP(nn.Module):
  """(B, H, W, C) images in [-1, 1] -> (B, H, W, out_channels) mixture
  parameters; output (r, c) depends on input pixels before (r, c) in
  raster order only. H and W must be divisible by 2^(num_resolutions-1).
  """
  out_channels: int
  nr_resnet: int = 5
  nr_filters: int = 160
  num_resolutions: int = 3
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    f, n = self.nr_filters, self.nr_resnet
    block = lambda shift: GatedResNet(shift, self.dropout)
    # A channel of ones tells the image from the zero padding (openai).
    x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    # u: the rows above (2x3 over rows r-1, r, then shifted down a row).
    # ul: the row above (1x3, shifted down) plus the pixels to the left
    # (2x1 over rows r-1, r, shifted right a column).
    us = [down_shift(DownShiftedConv(f, (2, 3))(x))]
    uls = [down_shift(DownShiftedConv(f, (1, 3))(x))
           + right_shift(DownRightShiftedConv(f, (2, 1))(x))]

    # Up pass: every activation is kept for the down pass's short-cuts.
    for level in range(self.num_resolutions):
      if level:  # halve the resolution
        us.append(DownShiftedConv(f, strides=2)(us[-1]))
        uls.append(DownRightShiftedConv(f, strides=2)(uls[-1]))
      for _ in range(n):
        us.append(block('down')(us[-1], train=train))
        uls.append(block('down_right')(uls[-1], us[-1], train=train))

    # Down pass: consumes the kept activations in reverse, nr_resnet blocks
    # at the lowest resolution and nr_resnet + 1 (the extra one for the
    # downsampling layer's output) at each of the others.
    u, ul = us.pop(), uls.pop()
    for level in reversed(range(self.num_resolutions)):
      for _ in range(n + (level < self.num_resolutions - 1)):
        u = block('down')(u, us.pop(), train=train)
        ul = block('down_right')(ul, jnp.concatenate([u, uls.pop()], -1),
                                 train=train)
      if level:  # double the resolution
        u = ShiftedConvTranspose(f, (2, 3))(u)
        ul = ShiftedConvTranspose(f, (2, 2))(ul)
    assert not us and not uls, 'every kept activation is used once'
    return nn.Dense(self.out_channels, name='nin_out')(jax.nn.elu(ul))
