"""Model FLOPs of a jitted step and its model FLOPs utilisation (MFU).

MFU = achieved FLOP/s per device / the device's peak (PaLM, Chowdhery et al.
2022, appendix B). The FLOPs are XLA's own count for the step (the cost
analysis of the *lowered*, unpartitioned computation: the whole global
batch, whatever the mesh; the compiled executable's analysis would count
one device's partition), so nothing is estimated by hand: convolutions,
attention, the optimizer update and the EMA all count. With activation
checkpointing the recomputation would count too (hardware FLOPs rather than
model FLOPs); no model here rematerialises yet.

Peaks: dense bf16 matrix FLOP/s per JAX device from the vendors' datasheets
(a TPU v3 device is one of a chip's two cores; v4 and later devices are
whole chips), and for a CPU a peak measured here, once per process: the
best float32 matmul rate of the whole host (JAX's CPU device), which is what
a float32 model on that CPU could reach.
"""

import functools
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

# device_kind substring -> (dense bf16 TFLOP/s per device, source). First
# match wins, so longer names come first.
PEAK_TFLOPS = (
    ('TPU v6 lite', 918.0, 'TPU v6e (Trillium) datasheet, per chip'),
    ('TPU v5 lite', 197.0, 'TPU v5e datasheet, per chip'),
    ('TPU v5p', 459.0, 'TPU v5p datasheet, per chip'),
    ('TPU v5', 459.0, 'TPU v5p datasheet, per chip'),
    ('TPU v4', 275.0, 'TPU v4 datasheet, per chip'),
    ('TPU v3', 61.5, 'TPU v3 datasheet: 123 per chip, 2 cores'),
    ('TPU v2', 22.5, 'TPU v2 datasheet: 45 per chip, 2 cores'),
    ('H200', 989.0, 'NVIDIA H200 SXM datasheet, dense'),
    ('H100', 989.0, 'NVIDIA H100 SXM datasheet, dense'),
    ('A100', 312.0, 'NVIDIA A100 datasheet, dense'),
)


def step_flops(lowered: Any) -> float | None:
  """XLA's FLOP count of a lowered (jax.jit(...).lower(...)) computation,
  over its global inputs; None where the backend gives none."""
  try:
    analysis = lowered.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except
    logging.info('No XLA cost analysis for this step (%s): no MFU.', e)
    return None
  if isinstance(analysis, (list, tuple)):  # older jax: one per computation
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


@functools.cache
def measured_cpu_peak_tflops(size: int = 1024, repeats: int = 5) -> float:
  """The best float32 matmul rate of the CPU device, in TFLOP/s: the best
  of `repeats` timed (size x size) @ (size x size) products, after one
  untimed call (compilation)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best / 1e12


def device_peak(device=None) -> tuple[float | None, str]:
  """(peak TFLOP/s of one device, where the figure comes from); None for a
  device kind not in PEAK_TFLOPS."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return measured_cpu_peak_tflops(), 'measured float32 matmul, this host'
  for name, tflops, source in PEAK_TFLOPS:
    if name.lower() in device.device_kind.lower():
      return tflops, source
  return None, f'no peak known for {device.device_kind!r}'


def throughput(flops_per_step: float | None, steps_per_sec: float,
               num_devices: int, peak_tflops: float | None) -> dict:
  """The scalars the trainer logs: achieved TFLOP/s per device and MFU
  (a fraction), where the FLOPs and the peak are known."""
  if not flops_per_step:
    return {}
  per_device = flops_per_step * steps_per_sec / num_devices / 1e12
  out = {'tflops_per_device': per_device}
  if peak_tflops:
    out['mfu'] = per_device / peak_tflops
  return out
