"""Test set-up: 8 simulated CPU devices (a stand-in for a TPU v3-8).

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
