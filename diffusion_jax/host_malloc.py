"""glibc malloc settings for XLA:CPU runs: keep large buffers in the heap.

XLA:CPU allocates every temporary of a compiled call with malloc. glibc
serves blocks above its mmap threshold (adapting up to 32 MiB) with a fresh
mmap and unmaps them on free, so each call of a train step or forward pays
first-touch page faults on all of its large temporaries again: a fresh
42 MB output took 11.7 ms instead of 2.0 ms. Raising the mmap threshold to
1 GiB and never trimming the heap keeps those pages mapped between calls
(the same as MALLOC_MMAP_THRESHOLD_=1073741824 and MALLOC_TRIM_THRESHOLD_ in
the environment). Measured on the paper U-Net (BENCHMARKS.md, issue 7):
forward 1.4x faster, train step 1.06-1.24x; the price is that the process
keeps its peak heap instead of returning it to the system.

Only the host's own memory is concerned: on TPU/GPU the buffers live on the
device, so main.py applies this on the CPU backend only.
"""

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
BIG_MMAP_THRESHOLD = 2 ** 30  # bytes
# glibc's defaults, for switching back (benchmarks compare both).
DEFAULT_THRESHOLD = 128 * 1024


def _libc():
  name = ctypes.util.find_library('c')
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, 'mallopt') else None
  except OSError:
    return None


def keep_large_buffers(on: bool = True) -> bool:
  """Sets (or resets to glibc's defaults) the thresholds; returns False
  where there is no glibc mallopt (macOS, musl) or it refused."""
  libc = _libc()
  if libc is None:
    return False
  if on:
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(BIG_MMAP_THRESHOLD))
          and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1)))
  else:
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(DEFAULT_THRESHOLD))
          and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(DEFAULT_THRESHOLD)))
    if hasattr(libc, 'malloc_trim'):
      libc.malloc_trim(0)
  return bool(ok)
