"""MFU (diffusion_jax/flops.py): XLA's FLOP count against the closed form,
the global count on a mesh, the peak table and the arithmetic."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from diffusion_jax import flops


def test_a_matmul_counts_2mnk_on_one_device_and_on_a_mesh():
  m, k, n = 64, 96, 32
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  assert flops.step_flops(jax.jit(jnp.matmul).lower(a, b)) == 2 * m * k * n
  # On 8 devices the count is still the whole (global) batch's.
  mesh = Mesh(jax.devices(), ('data',))
  sharded = jax.jit(jnp.matmul,
                    in_shardings=(NamedSharding(mesh, P('data')),
                                  NamedSharding(mesh, P())))
  assert len(jax.devices()) == 8
  assert flops.step_flops(sharded.lower(a, b)) == 2 * m * k * n


def test_throughput_and_mfu_arithmetic():
  out = flops.throughput(4e12, 2.0, 8, 0.5)
  assert out['tflops_per_device'] == pytest.approx(1.0)  # 4e12 * 2 / 8
  assert out['mfu'] == pytest.approx(2.0)  # 1.0 / 0.5
  assert flops.throughput(None, 2.0, 8, 0.5) == {}
  assert 'mfu' not in flops.throughput(4e12, 2.0, 8, None)


class _Device:
  def __init__(self, platform, kind):
    self.platform, self.device_kind = platform, kind


@pytest.mark.parametrize('kind, peak', [
    ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5p', 459.0),
    ('TPU v6 lite', 918.0), ('TPU v3', 61.5),
    ('NVIDIA H100 80GB HBM3', 989.0), ('NVIDIA A100-SXM4-40GB', 312.0),
    ('NVIDIA H200', 989.0)])
def test_peaks_of_accelerators(kind, peak):
  assert flops.device_peak(_Device('tpu', kind))[0] == peak


def test_an_unknown_device_has_no_peak_and_the_cpu_is_measured():
  tflops, why = flops.device_peak(_Device('gpu', 'Some GPU'))
  assert tflops is None and 'Some GPU' in why
  measured = flops.measured_cpu_peak_tflops()
  # A real rate: above 1 GFLOP/s, below 100 TFLOP/s for any CPU.
  assert 1e-3 < measured < 100
  assert flops.device_peak(jax.devices()[0]) == (
      measured, 'measured float32 matmul, this host')
  np.testing.assert_equal(flops.measured_cpu_peak_tflops(), measured)
