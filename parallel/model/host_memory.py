"""Keep freed host memory in the process instead of handing it back to the kernel after every op.

PyTorch's CPU tensors come straight from malloc, and a step's intermediates (gathered K/V,
MLP activations, attention outputs) are megabytes each, freed layer by layer. glibc's defaults
return such memory to the kernel at once (mmap above a threshold, trimming the heap top above
another), so the next layer's tensor of the same size faults every page in again: on this
project's 2-core VM a decode step of 8 sequences took 80 ms with the defaults and 41 ms with the
settings below, the gathers of the paged attention paying most of it. vLLM's CPU backend asks
for tcmalloc to be preloaded for the same reason; `mallopt` gets the same effect without an
LD_PRELOAD that has to be in place before the process starts.

The cost is resident memory: up to `TRIM_THRESHOLD` freed at the heap's top stays in the
process for the next step instead of being returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum: blocks up to this size come from the heap
TRIM_THRESHOLD = 512 * 2**20  # freed memory at the heap top kept for the next step
TOP_PAD = 64 * 2**20  # grow the heap in steps of this much, not page by page

_applied = False


def retain_freed_memory() -> bool:
    """Apply the settings once per process (Linux with glibc; elsewhere nothing to do).
    Returns whether they are in effect."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl and others have no mallopt
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    if not _applied:
        logger.info("malloc settings not accepted by this libc; host memory is returned after each op")
    return _applied
