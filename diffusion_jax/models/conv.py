"""2-D convolution whose weight gradient is a sum of per-tap matmuls on CPU.

Why: on XLA:CPU the weight gradient of a convolution (lowered to a
convolution with batch and feature roles swapped and a kernel as large as the
image) runs at a fraction of the speed of the forward pass and the input
gradient, and it was the largest item of the paper U-Net's train step
(benchmarks/profile_step.py). Written as k*k ordinary matmuls, one per tap,

    dW[i, j] = sum over (n, h, w) of x_pad[n, s*h + i, s*w + j, :]^T g[n, h, w, :]

it measured 1.2-1.5x faster for 3x3 kernels at 32x32 and 4-6x for 1x1
kernels (benchmarks/conv_grad.py), and the whole train step 1.15x faster
(benchmarks/vs_diffusers.py). The forward pass and the input gradient stay
XLA's own.

TPUs and GPUs have fast native weight-gradient convolutions, so by default
(`WEIGHT_GRAD = 'auto'`) the per-tap gradient is used only when the default
backend is the CPU, and there only where it measured faster: 1x1 kernels (4-5x)
and outputs of at least MIN_TAP_OUTPUT_PIXELS positions per image (32x32: about
1.2-1.5x); at 16x16 and below XLA's own was faster. Set WEIGHT_GRAD to 'taps'
or 'xla' to force one everywhere (read at trace time: set it before the first
jit of the model).

`conv_general_dilated` has the signature of `lax.conv_general_dilated` and is
passed to `flax.linen.Conv(conv_general_dilated=...)`: parameter names, shapes
and initialisation are those of nn.Conv. Anything other than a plain 2-D
NHWC/HWIO convolution (dilation, feature groups, other layouts) goes to
lax.conv_general_dilated unchanged.
"""

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

WEIGHT_GRAD = 'auto'  # 'auto' (per-tap on CPU where it pays), 'taps', 'xla'.
MIN_TAP_OUTPUT_PIXELS = 32 * 32
# 'auto' keeps XLA's gradient above this batch (the traced, global batch):
# at batch 32 the per-tap form measured no faster and doubled the step's
# temporary memory (BENCHMARKS.md, issue 7).
MAX_TAP_BATCH = 8

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def use_tap_weight_grad(kernel_hw=(3, 3), output_hw=(32, 32),
                        batch: int = 8) -> bool:
  """Whether a convolution traced now gets the per-tap weight gradient."""
  if WEIGHT_GRAD not in ('auto', 'taps', 'xla'):
    raise ValueError(f"conv.WEIGHT_GRAD must be 'auto', 'taps' or 'xla', got "
                     f'{WEIGHT_GRAD!r}')
  if WEIGHT_GRAD == 'auto':
    pays = (tuple(kernel_hw) == (1, 1) or
            output_hw[0] * output_hw[1] >= MIN_TAP_OUTPUT_PIXELS)
    return (pays and batch <= MAX_TAP_BATCH and
            jax.default_backend() == 'cpu')
  return WEIGHT_GRAD == 'taps'


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    # flax passes the canonical form: NHWC/HWIO/NHWC is exactly this.
    return tuple(map(tuple, dimension_numbers)) == (
        (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """lax.conv_general_dilated, with the per-tap weight gradient when it
  applies (see the module docstring)."""
  use_taps = (lhs.ndim == 4 and _is_nhwc(dimension_numbers)
              and all(d == 1 for d in (lhs_dilation or (1, 1)))
              and all(d == 1 for d in (rhs_dilation or (1, 1)))
              and feature_group_count == 1 and batch_group_count == 1
              and preferred_element_type is None)
  if use_taps:
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides,
                                    padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    out_hw = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in
              zip(lhs.shape[1:3], pads, rhs.shape[:2], strides)]
    use_taps = use_tap_weight_grad(rhs.shape[:2], out_hw, lhs.shape[0])
  if not use_taps:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  return conv2d(lhs, rhs, strides, pads, precision)


def _conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int],
           pads: Sequence[tuple[int, int]], precision=None) -> jax.Array:
  """NHWC x HWIO convolution; its weight gradient is k*k matmuls."""
  return _conv(x, w, strides, pads, precision)


def _conv2d_fwd(x, w, strides, pads, precision):
  return _conv(x, w, strides, pads, precision), (x, w)


def tap_weight_grad(x, g, kernel_hw, strides, pads, precision=None):
  """d(loss)/d(kernel) of an NHWC/HWIO convolution, one matmul per tap.

  x: (N, H, W, Cin) input, g: (N, Ho, Wo, Cout) output gradient. Tap (i, j)
  sees the padded input shifted by (i, j) (sampled with the stride); its
  gradient contracts that window with g over (N, Ho, Wo) as one 2-D matmul.

  Stride 1 avoids copying k*k strided windows (slow on XLA:CPU): the padded
  input is flattened to rows (n, h, w) and g is zero-padded to the same
  (Hp, Wp) grid, so tap (i, j) is the contiguous row range shifted by
  i * Wp + j. The zero rows add (Hp * Wp) / (Ho * Wo) - 1 extra FLOPs (13% at
  32x32 with a 3x3 kernel), far cheaper than the copies.
  """
  (kh, kw), (sh, sw) = kernel_hw, strides
  n, ho, wo, cout = g.shape
  cin = x.shape[-1]
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  contract = lambda a, b: lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                          precision=precision)
  if (sh, sw) == (1, 1):
    _, hp, wp, _ = xp.shape
    rows = n * hp * wp
    g_flat = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0)))
    g_flat = g_flat.reshape(rows, cout)
    x_flat = jnp.pad(xp.reshape(rows, cin),
                     ((0, (kh - 1) * wp + kw - 1), (0, 0)))
    taps = [contract(lax.slice_in_dim(x_flat, i * wp + j, i * wp + j + rows),
                     g_flat) for i in range(kh) for j in range(kw)]
  else:
    g_flat = g.reshape(n * ho * wo, cout)
    taps = []
    for i in range(kh):
      for j in range(kw):
        window = lax.slice(xp, (0, i, j, 0),
                           (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                            cin), (1, sh, sw, 1))
        taps.append(contract(window.reshape(n * ho * wo, cin), g_flat))
  return jnp.stack(taps).reshape(kh, kw, cin, cout)


def _conv2d_bwd(strides, pads, precision, res, g):
  x, w = res
  # XLA's own input gradient (a transposed convolution; fast on every backend).
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, pads, precision), x)
  (dx,) = input_vjp(g)
  dw = tap_weight_grad(x, g, w.shape[:2], strides, pads, precision)
  return dx, dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
