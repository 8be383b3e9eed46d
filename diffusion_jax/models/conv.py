"""2-D convolution with a faster weight gradient on XLA:CPU.

Why: on XLA:CPU (jaxlib 0.10, convolutions run by YNNPACK) the weight
gradient of a convolution -- one convolution contracting over all of
(N, Ho, Wo), with a kernel as large as the image -- ran at 50-75 GFLOP/s for
the paper U-Net's 32x32 layers at batch 8, against 240-280 GFLOP/s for the
forward pass and the input gradient, and it was the largest item of the
train step (benchmarks/profile_step.py). Two reformulations of

    dW[i, j] = sum over (n, h, w) of x_pad[n, s*h + i, s*w + j, :]^T g[n, h, w, :]

are here:

  'chunks': the same sum cut into batch chunks, each XLA's own weight-gradient
      convolution. XLA's is fast while the output gradient of one call holds
      at most MAX_CHUNK_ELEMENTS (2^18) elements, so a chunk has that many
      (at least one image): 170-220 GFLOP/s for every 3x3 layer of the U-Net
      at batch 8 and 32 (benchmarks/conv_grad.py).
  'taps': k*k ordinary matmuls, one per tap (tap_weight_grad). 4-6x faster
      than XLA's for 1x1 kernels (one matmul); for 3x3 kernels 1.2-1.5x, but
      below 'chunks', which replaced it there.

TPUs and GPUs have fast native weight-gradient convolutions, so by default
(`WEIGHT_GRAD = 'auto'`) the custom gradient is used only when the default
backend is the CPU: 'taps' for 1x1 kernels, 'chunks' for larger ones when the
batch spans more than one chunk, XLA's own otherwise. Set WEIGHT_GRAD to
'chunks', 'taps' or 'xla' to force one everywhere (read at trace time: set it
before the first jit of the model). The forward pass and the input gradient
are always XLA's own; values and gradients equal lax.conv_general_dilated's
up to summation order (tests/test_conv.py). 'chunks' only where the process
sees one device: on a mesh of several the chunks would be slices of the
batch-sharded activations, correct (tests/test_conv.py compares 8 devices
with 1, forcing 'chunks') but moved between devices by GSPMD.

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

WEIGHT_GRAD = 'auto'  # 'auto', 'chunks', 'taps' or 'xla' (module docstring).
# 'chunks': the batch is cut so that one chunk's output gradient has at most
# this many elements (positions x output channels): 1 MiB of float32, where
# XLA:CPU's weight-gradient convolution measured fast (benchmarks/conv_grad.py).
MAX_CHUNK_ELEMENTS = 2 ** 18

# XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK. Without it (this
# value keeps YNNPACK for dots only) the U-Net's forward measured 1.04-1.09x
# faster at batch 8 and 1.15-1.2x at 16-64, but its train step 1.4-1.8x slower
# (BENCHMARKS.md, issue 7). So only forward-only programs -- sampling and
# evaluation -- are compiled with it, on CPU, unless INFERENCE_YNN_CONV.
NO_YNN_CONV = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
}
INFERENCE_YNN_CONV = False


def train_compiler_options(ynn_conv: bool) -> dict:
  """compiler_options for the train step: config.cpu.train_ynn_conv picks
  YNNPACK's convolutions or XLA's own per model (measured per model:
  BENCHMARKS.md, issue 13); nothing off the CPU."""
  if ynn_conv or jax.default_backend() != 'cpu':
    return {}
  return dict(NO_YNN_CONV)


def inference_compiler_options() -> dict:
  """compiler_options for the jit of a forward-only program (see above)."""
  if INFERENCE_YNN_CONV or jax.default_backend() != 'cpu':
    return {}
  return dict(NO_YNN_CONV)


def one_shot_compiler_options() -> dict:
  """compiler_options for programs whose compile time is nearly all their
  cost (the state's init, once a run; the finiteness check at each
  checkpoint): LLVM at -O0 on CPU. The tiny test U-Net's init compiled in
  3.4 s instead of 9.1 s, bit-identical (integer threefry; no float
  reassociation at any level without fast math), and the norm check in 1.4
  s instead of 2.2 s, while a norm over 40M floats ran in 0.008 s at both
  levels (memory-bound). Never for the train step or the sampler."""
  if jax.default_backend() != 'cpu':
    return {}
  return {'xla_backend_optimization_level': 0}


_NHWC = ('NHWC', 'HWIO', 'NHWC')
_METHODS = ('auto', 'chunks', 'taps', 'xla')


def chunk_size(output_hw, cout: int) -> int:
  """Images per chunk of the chunked weight gradient (at least one)."""
  return max(1, MAX_CHUNK_ELEMENTS // (output_hw[0] * output_hw[1] * cout))


def weight_grad_method(kernel_hw=(3, 3), output_hw=(32, 32), cout: int = 128,
                       batch: int = 8) -> str:
  """How a convolution traced now computes its weight gradient: 'xla'
  (XLA's own), 'chunks' or 'taps' (module docstring)."""
  if WEIGHT_GRAD not in _METHODS:
    raise ValueError(f'conv.WEIGHT_GRAD must be one of {_METHODS}, got '
                     f'{WEIGHT_GRAD!r}')
  if WEIGHT_GRAD != 'auto':
    return WEIGHT_GRAD
  if jax.default_backend() != 'cpu':
    return 'xla'
  if tuple(kernel_hw) == (1, 1):
    return 'taps'  # one matmul
  if jax.device_count() > 1:
    # The chunks slice the batch, which a mesh shards: GSPMD then moves
    # each sliced image between devices. Measured on the 64x64 LSUN U-Net
    # (ch 32) at 8 devices, 1 image each: 74 collective-permutes (40 MiB)
    # and 36.2 MiB all-reduced for 34.6 MiB of gradients, 93 MiB of
    # temporaries; XLA's own: none, 34.6 MiB, 72 MiB. A simulated mesh
    # stands in for an accelerator's, so it compiles like one.
    return 'xla'
  return 'chunks' if batch > chunk_size(output_hw, cout) else 'xla'


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
  """lax.conv_general_dilated, with the custom weight gradient where it
  applies (see the module docstring)."""
  custom = (lhs.ndim == 4 and _is_nhwc(dimension_numbers)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1 and batch_group_count == 1
            and preferred_element_type is None)
  if custom:
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides,
                                    padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    out_hw = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in
              zip(lhs.shape[1:3], pads, rhs.shape[:2], strides)]
    method = weight_grad_method(rhs.shape[:2], out_hw, rhs.shape[3],
                                lhs.shape[0])
    custom = method != 'xla'
  if not custom:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  return conv2d(lhs, rhs, strides, pads, precision, method)


def _conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int],
           pads: Sequence[tuple[int, int]], precision=None,
           method: str = 'chunks') -> jax.Array:
  """NHWC x HWIO convolution whose weight gradient is computed by `method`:
  'chunks' (chunked_weight_grad) or 'taps' (tap_weight_grad)."""
  return _conv(x, w, strides, pads, precision)


def _conv2d_fwd(x, w, strides, pads, precision, method):
  return _conv(x, w, strides, pads, precision), (x, w)


def chunked_weight_grad(x, w, g, strides, pads, precision=None):
  """d(loss)/d(kernel) as a sum of XLA's weight gradients over batch chunks.

  XLA:CPU's weight-gradient convolution contracts over all of
  (N, Ho, Wo) at once and ran at 50-75 GFLOP/s once that reduction is large
  (the 32x32 convolutions of the paper U-Net at batch 8), but at 170-220
  GFLOP/s on chunks whose output gradient holds <= MAX_CHUNK_ELEMENTS
  (benchmarks/conv_grad.py): the same sum, cut into pieces of chunk_size()
  images, each XLA's own convolution.
  """
  per = chunk_size(g.shape[1:3], g.shape[3])
  total = None
  for i in range(0, x.shape[0], per):
    x_i = x[i:i + per]
    (dw,) = jax.linear_transpose(
        lambda w_, x_i=x_i: _conv(x_i, w_, strides, pads, precision),
        w)(g[i:i + per])
    total = dw if total is None else total + dw
  return total


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
    # Without the barrier XLA fuses x's producer (GroupNorm, swish) into
    # every tap's slice and recomputes it k*k times.
    x_flat, g_flat = lax.optimization_barrier((x_flat, g_flat))
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


def _conv2d_bwd(strides, pads, precision, method, res, g):
  x, w = res
  # XLA's own input gradient (a transposed convolution; fast on every backend).
  (dx,) = jax.linear_transpose(
      lambda x_: _conv(x_, w, strides, pads, precision), x)(g)
  if method == 'taps':
    dw = tap_weight_grad(x, g, w.shape[:2], strides, pads, precision)
  else:
    dw = chunked_weight_grad(x, w, g, strides, pads, precision)
  return dx, dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
