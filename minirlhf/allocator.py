"""Host memory: keep what a training step frees for the next step, instead of handing it back to the kernel.

PyTorch allocates CPU tensors with the C library's `malloc`. glibc's, by default, serves every block above a
threshold from fresh `mmap`ed pages and unmaps them on free (the threshold starts at 128 KB and follows the largest
block freed, up to 32 MB), and it returns the free top of its heap to the kernel once it passes twice that (trim). A
training or evaluation step frees its activations, KV caches and logits at its end and asks for the same amounts
again at the next, so the kernel hands the process fresh pages that it first zero-fills, one fault per 4 KB page:
tens to hundreds of MB a step. On the 2-core Intel Xeon VM of README "Speed", `make demo` took 4.4 / 4.5 minutes
with freed memory kept against 4.6 / 4.8 without (alternating, the same results), much of it in generation (the GRPO
stage's 7 evaluation `generate` calls: 4.5 s against 4.8-5.6; the judge stage 0.40-0.44 min against 0.50); inside
the 18M GRPO benchmark's step, a policy forward that faulted in 100k pages took 1.0 s, one that faulted none 0.28 s.
tcmalloc and jemalloc (`LD_PRELOAD`, as PyTorch's CPU launcher `torch.backends.xeon.run_cpu` sets up) keep freed
memory too; this does it for glibc, with no install. The `minirlhf` command calls it: it owns its process; a program
that imports minirlhf decides for its own.

The cost: the process keeps its peak heap, as a GPU caching allocator keeps its peak; blocks over 32 MB are still
mapped and unmapped each time (glibc's limit for heap blocks).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 32 * 1024 * 1024  # glibc's cap for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only a free top above 2 GB
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process: blocks up to 32 MB from its heap (not from `mmap`,
    so they are reused), and no trimming of the heap's free top. Whether it applied: not under another C library
    or allocator without `mallopt`, and not when the user set glibc's own malloc variables (theirs stand)."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # macOS, Windows, musl without this name
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success (under a preloaded tcmalloc / jemalloc this sets glibc's unused malloc: harmless)
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
