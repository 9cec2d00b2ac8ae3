"""Keep freed host memory in the process (glibc), so training steps stop page-faulting their tensors in.

PyTorch's CPU allocator is plain malloc. glibc serves big blocks with mmap and hands them back with munmap,
and trims the top of the heap back to the OS, so every step maps its activations afresh and the kernel
zero-fills each 4 KiB page on first touch: ~10k minor faults per optimizer step of the embedded default.
With the mmap threshold fixed at its maximum (32 MiB) and trimming left to blocks over 1 GiB, a step reuses
the last step's pages (~1k faults per step; ~4% off the median step at 1 thread, 20 MB more peak RSS). This
is what PyTorch's CUDA caching allocator does on GPU, and what jemalloc / tcmalloc would do here.

Not for models over KEEP_MAX_PARAMETER_BYTES: there the gradients (set to None at each step, up to 32 MiB a
tensor) leave holes in the heap that the next forward's activations take, so the next backward's gradients
grow the heap instead. At Qwen2.5-0.5B's shape (fp32, 2 GB of parameters) that cost
0.4-1.2 GB of peak RSS (bench/rss_phases.py, bench/results/e2e_qwen05b.md), while the faults it saves are
a small share of a step of seconds. glibc's defaults alone are not enough: its mmap threshold rises to the
size of the blocks it has freed, so gradient-sized blocks come from the heap again after a few steps (8.72
GB at that shape). There the top pad is set to its default value instead, which pins the mmap threshold at
its 128 KiB start: every freed block of 128 KiB or more goes back to the OS (8.45 GB; 1.8M page faults per
step instead of 0.3M, the step 18.30 vs 18.12 s, within noise).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for this parameter on 64-bit
TRIM_THRESHOLD = 1 << 30
KEEP_MAX_PARAMETER_BYTES = 256 << 20  # above: freed blocks go back to the OS (module docstring)
TOP_PAD = 128 << 10  # glibc's default top pad

_applied: bool | None = None


def keep_freed_memory(parameter_bytes: int = 0) -> bool:
    """Apply the settings above once per process; returns whether they are in effect. Skipped off glibc
    Linux and when the user chose for themselves (a MALLOC_* variable, or jemalloc / tcmalloc preloaded). For a
    model of more than KEEP_MAX_PARAMETER_BYTES (`parameter_bytes`: its parameters' size) the mmap threshold is
    pinned at glibc's 128 KiB instead (returns False). The first call decides: glibc's thresholds cannot be
    restored once set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    preload = os.environ.get("LD_PRELOAD", "")
    if (not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ)
            or "jemalloc" in preload or "tcmalloc" in preload):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False
    if parameter_bytes > KEEP_MAX_PARAMETER_BYTES:  # a large model: freed blocks go back (module docstring)
        mallopt(M_TOP_PAD, TOP_PAD)
        return False
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
