"""Keep a probing process's resident memory close to what its tensors use (Linux, glibc).

glibc's malloc serves a request below its *mmap threshold* from the heap, and after the first large block
is freed it raises that threshold to the block's size (up to 32 MiB). The activations of a forward over a
batch (a few MB to tens of MB each, allocated and freed layer after layer) then come from the heap, whose
freed holes stay resident: measured on a random-weight GPT-2 medium at 32 x 128 tokens
(``benchmarks/bench_scale.py``), the residual-norm / activation-rate forward added 1.3 to 1.9 GB of
resident memory with the default behaviour and 0.36 GB with a fixed 4 MiB threshold, at the same CPU time
(2 threads). :func:`bound_heap` fixes the threshold (``mallopt(M_MMAP_THRESHOLD, ...)``, which also turns
the dynamic adjustment off): every larger tensor gets its own mapping and goes back to the system when
freed. The pretrained probe CLI calls it before loading a model; the training entry point does not (its
step-by-step allocations are reused from the heap, which is what the dynamic threshold is good at).
"""

from __future__ import annotations

import ctypes
import sys

#: glibc's ``M_MMAP_THRESHOLD`` parameter of ``mallopt`` (malloc.h).
M_MMAP_THRESHOLD = -3
#: The threshold set by :func:`bound_heap`: blocks of this size and larger are mapped on their own.
THRESHOLD_BYTES = 4 * 2**20


def bound_heap(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; True when it was set, False on a
    platform without glibc (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
