"""Keep freed memory inside the process (glibc), so that CPU training steps stop paying page faults.

A CPU training step allocates and frees several tensors of hundreds of MB: the logits over a 49 k
vocabulary, the teacher's, their log-softmax and gradients. glibc serves every allocation above
its mmap threshold with a fresh ``mmap`` and unmaps it on ``free``, so every step faults in and
zeroes gigabytes again: a stage-2 KL step on SmolLM2-135M spent a fifth of its CPU time in the
kernel and took 8.4 s, 6.6 s once big blocks came from the heap and stayed there (stage-1 and NLL
steps measured unchanged; docs/small-budget.md). The price is that the process keeps its peak
memory until it exits, which a training or evaluation process reaches on every step anyway.

The command line turns this on for its own process; a library must not change a process-wide
allocator on import, so the Python API leaves it to the caller (``keep_freed_memory()``).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
OPT_OUT = "SKIPGPT_MALLOC"  # "default" leaves the allocator as it is


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it; True when the setting took effect.

    Does nothing off glibc Linux, when ``SKIPGPT_MALLOC=default``, or when the user tunes glibc
    malloc already (any ``MALLOC_*`` or ``GLIBC_TUNABLES`` variable): theirs wins.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "default":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 as the trim threshold disables trimming (mallopt(3)).
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
