"""host_malloc keeps large blocks in the heap instead of fresh mmaps.

Checked with glibc's own accounting (mallinfo2: bytes in mmap-ed blocks) in
a fresh interpreter, so this test process's allocator is left alone.
"""

import ctypes.util
import subprocess
import sys

import pytest

SCRIPT = r'''
import ctypes, sys
from diffusion_jax import host_malloc

class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
      'uordblks', 'fordblks', 'keepcost')]

libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2 ** 20

def mmapped_after_malloc():
  before = libc.mallinfo2().hblkhd
  p = libc.malloc(size)
  grown = libc.mallinfo2().hblkhd - before
  libc.free(p)
  return grown

assert host_malloc.keep_large_buffers(False)
default = mmapped_after_malloc()
assert host_malloc.keep_large_buffers(True)
big = mmapped_after_malloc()
print(default, big)
'''


@pytest.mark.skipif(
    not sys.platform.startswith('linux') or ctypes.util.find_library('c')
    is None, reason='glibc only')
def test_large_blocks_come_from_the_heap():
  out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True,
                       text=True, check=True).stdout.split()
  default, big = map(int, out)
  assert default >= 64 * 2 ** 20  # glibc's default: a fresh mmap
  assert big == 0  # kept in the heap
