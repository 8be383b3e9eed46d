"""Test set-up: 8 simulated CPU devices (a stand-in for a TPU v3-8).

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

from tests.compile_flags import FAST_COMPILE  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8 '
    + FAST_COMPILE)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests compile the same tiny U-Net; a per-session persistent cache lets
# them share compilations (the cache keys on the exact HLO, so it changes no
# result). pytest-xdist's workers (pyproject's addopts: -n 2) inherit the
# directory the first process made, so they share it too.
os.environ.setdefault('DIFFUSION_JAX_TEST_XLA_CACHE', tempfile.mkdtemp(
    prefix='diffusion_jax_test_xla_cache_'))
jax.config.update('jax_compilation_cache_dir',
                  os.environ['DIFFUSION_JAX_TEST_XLA_CACHE'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# The files with the longest runs start first, so that with one file per
# xdist worker (--dist loadfile) neither worker is left running a long file
# alone at the end (longest-first scheduling). The heaviest files of the CI
# run of 91bcb43, heaviest first; the rest keep their order.
FIRST = ('test_train.py', 'test_distillation.py', 'test_reliability.py',
         'test_preemption.py', 'test_multihost.py', 'test_edm.py',
         'test_captions.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))
