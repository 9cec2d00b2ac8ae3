"""Keep freed host memory in the process (glibc), so training steps stop page-faulting their tensors in.

PyTorch's CPU allocator is plain malloc. glibc serves big blocks with mmap and hands them back with munmap,
and trims the top of the heap back to the OS, so every step maps its activations afresh and the kernel
zero-fills each 4 KiB page on first touch: ~10k minor faults per optimizer step of the embedded default.
With the mmap threshold fixed at its maximum (32 MiB) and trimming left to blocks over 1 GiB, a step reuses
the last step's pages (~1k faults per step; ~4% off the median step at 1 thread, 20 MB more peak RSS). This
is what PyTorch's CUDA caching allocator does on GPU, and what jemalloc / tcmalloc would do here.

Not for the whole run of a model over KEEP_MAX_PARAMETER_BYTES: there the gradients (set to None at each
step, up to 32 MiB a tensor) leave holes in the heap that the next forward's activations take, so the next
backward's gradients grow the heap instead (0.4-1.2 GB more peak RSS at Qwen2.5-0.5B's shape, fp32;
bench/rss_phases.py, bench/results/e2e_qwen05b.md). glibc's defaults alone are not enough: its mmap
threshold rises to the size of the blocks it has freed, so gradient-sized blocks come from the heap again
after a few steps. There the top pad is set to its default value instead, which pins the mmap threshold at
its 128 KiB start, and `reuse_freed_memory` lifts it for the length of a phase (a generate, an update) and
gives the heap's free pages back at its end. Pinned throughout, that shape took 1.6M minor faults and 13.6 s
per step; with the phases, 0.67-0.71M and 10.1-11.2 s (bench/results/e2e_qwen05b.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for this parameter on 64-bit
TRIM_THRESHOLD = 1 << 30
KEEP_MAX_PARAMETER_BYTES = 256 << 20  # above: freed blocks go back to the OS (module docstring)
TOP_PAD = 128 << 10  # glibc's default top pad
PINNED_THRESHOLD = 128 << 10  # glibc's default mmap and trim thresholds, where pinning the top pad holds them

_applied: bool | None = None
_pinned = None  # libc once the large-model setting (threshold pinned) is in effect; reuse_freed_memory calls it
_gradient_block = MMAP_THRESHOLD  # reuse_freed_memory(gradients=True)'s mmap threshold
_phases: list[int] = []  # the mmap thresholds of the phases in progress (a generate may run in a thread beside an update)
_phases_lock = threading.Lock()


def keep_freed_memory(parameter_bytes: int = 0, layer_parameter_bytes: int = 0) -> bool:
    """Apply the settings above once per process; returns whether they are in effect. Skipped off glibc
    Linux and when the user chose for themselves (a MALLOC_* variable, or jemalloc / tcmalloc preloaded). For a
    model of more than KEEP_MAX_PARAMETER_BYTES (`parameter_bytes`: its parameters' size) the mmap threshold is
    pinned at glibc's 128 KiB instead (returns False), and `reuse_freed_memory` lifts it by phase, up to
    `layer_parameter_bytes` (the largest decoder-layer parameter's size) in the update. The first call
    decides: glibc's thresholds cannot be restored once set."""
    global _applied, _pinned, _gradient_block
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
        if mallopt(M_TOP_PAD, TOP_PAD):
            _pinned = libc
            _gradient_block = min(MMAP_THRESHOLD, layer_parameter_bytes or MMAP_THRESHOLD)
        return False
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


@contextlib.contextmanager
def reuse_freed_memory(gradients: bool = False) -> Iterator[None]:
    """Within: freed blocks stay in glibc's heap for reuse, for a phase that frees and allocates the same
    temporaries over and over (a decode step's activations, logits and sampling buffers; a micro-batch's
    activations and its backward's temporaries). On exit (of the last phase in progress) the pinned settings
    come back and malloc_trim hands every free page of the heap back to the OS, so nothing the phase freed stays
    resident into the next.

    `gradients` (the update): blocks the size of the largest decoder-layer parameter and up still come from
    fresh mappings. Gradients live until the next step, and in the heap they would sit between the holes the
    freed activations leave, raising the peak (Qwen2.5-0.5B's shape: 8.77 GB with every block under 32 MiB
    from the heap, 8.52 GB with the MLP weights' 17 MB gradients mapped; bench/results/e2e_qwen05b.md).
    A no-op unless `keep_freed_memory` pinned the threshold for a large model (a small one keeps freed memory
    throughout). Phases may overlap (a generate in a thread during an update): the smallest threshold of those
    in progress holds, and the pinned settings and the trim wait for the last one to end."""
    libc = _pinned
    if libc is None:
        yield
        return
    threshold = _gradient_block if gradients else MMAP_THRESHOLD
    with _phases_lock:
        _phases.append(threshold)
        _set_thresholds(libc)
    try:
        yield
    finally:
        with _phases_lock:
            _phases.remove(threshold)
            _set_thresholds(libc)


def _set_thresholds(libc) -> None:
    """glibc's thresholds for the phases in progress (under _phases_lock): the smallest phase threshold, or with
    none left the pinned ones, and the heap's free pages handed back."""
    if _phases:
        libc.mallopt(M_MMAP_THRESHOLD, min(_phases))
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        return
    libc.mallopt(M_MMAP_THRESHOLD, PINNED_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, PINNED_THRESHOLD)
    libc.malloc_trim(0)
