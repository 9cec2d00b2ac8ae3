"""Device-dependent defaults and settings the trainer applies at start-up.

- `resolve_dtype`: dtype="auto" is bfloat16 on CUDA (tensor-core dots in the Triton kernels and the
  decoder) and float32 elsewhere (CPU has no fast bf16 GEMM here, and the CPU tests compare in fp32).
- `make_deterministic`: the CUDA settings behind `deterministic=True` (the loss side is triton_bwd=dense,
  enforced by the config).
- `prepare_engine`: reserve the embedded engine's cache once and capture its CUDA graphs on the main
  thread, before a sampler runs in a worker thread (overlap=True).
- `set_openmp_wait_policy`, `shorten_openmp_spin` and `apply_cpu_threads`: every usable core, with OpenMP
  threads that hold up next to other busy processes.

CPU threads (`cpu_threads`, default "auto"; bench/contention.py measures every policy below). torch's CPU
ops run on libgomp (GNU OpenMP), whose threads meet at a barrier after every parallel op and by default
spin there (GOMP_SPINCOUNT 300000) before sleeping. Next to another busy process that is the stall behind
steps of seconds instead of a tenth of one: a thread that has been descheduled holds the whole team, and the
spinning ones take CPU from it; alone, the spin buys little (docs/cpu.md and bench/results/contention.md
have the figures). So the spin goes, and the cores stay:
1. `set_openmp_wait_policy` (called by dash_fast/__init__.py, before dash_fast imports torch) sets
   OMP_WAIT_POLICY=PASSIVE: libgomp reads it once, when torch loads it, so it only takes effect if torch
   was not imported before dash_fast (the `dash-fast` CLI, scripts that import dash_fast first, and the
   overlap sampler process, whose spawned interpreter imports dash_fast before torch). A user's
   OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
2. When torch came first (every TRL script imports torch, transformers or datasets before its trainer),
   `shorten_openmp_spin` gets libgomp's short spin instead: libgomp spins only 100 times, not 300000, while
   it manages more threads than the CPUs it found at load (the libgomp manual, GOMP_SPINCOUNT: "If there
   are more OpenMP threads than available CPUs, 1000 and 100 spins for OMP_WAIT_POLICY being ACTIVE or
   undefined"). It parks one idle team of one thread per CPU (a host thread blocked for good, its workers
   asleep at libgomp's dock), which keeps the count above the CPUs whatever team sizes torch uses later.
   It performs like PASSIVE (bench/results/swap.md). No re-exec, nothing patched.
3. `apply_cpu_threads` (trainer start-up, before vLLM can start): `cpu_affinity` binds the process first;
   then "auto" uses one thread per usable CPU, whatever the import order (what torch itself would use, as
   TRL does). An explicit choice wins: `cpu_threads=N`, OMP_NUM_THREADS / MKL_NUM_THREADS in the
   environment (left to torch; torchrun sets 1), or `cpu_threads=None` (torch's own count). With torch
   first and more than one thread it shortens the spin (2.); where that cannot be done (torch not on
   libgomp) the start-up line says so and how to turn the spin off.
The count is fixed for the run (CPU results are reproducible at a fixed thread count). overlap=True on
CPU then splits the cores between sampler and learner (runtime/cpus.py, overlap.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: set_openmp_wait_policy must run before it is loaded
    import torch

WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # read by libgomp once, when torch loads it
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a thread count the user chose for torch
# what set_openmp_wait_policy found at import: "set" (by dash-fast), "user" (the user's own), or "too_late"
# (torch was already imported, so libgomp kept its spinning default)
openmp_wait: str | None = None


def set_openmp_wait_policy(environ: MutableMapping[str, str] = os.environ,
                           modules: dict | None = None) -> str:
    """OMP_WAIT_POLICY=PASSIVE unless the user set a wait policy or torch (so libgomp) is already loaded.
    Returns "user", "too_late" or "set" (also kept in `openmp_wait`)."""
    global openmp_wait
    modules = sys.modules if modules is None else modules
    if any(environ.get(k) for k in WAIT_VARS):
        openmp_wait = "user"
    elif "torch" in modules:
        openmp_wait = "too_late"
    else:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        openmp_wait = "set"
    return openmp_wait


SPINNING_NOTICE = ("torch was imported before dash_fast, so its OpenMP threads spin-wait at every barrier (next to "
                   "another busy process a step can then stall for seconds) and dash-fast found no libgomp to shorten "
                   "the spin in; set OMP_WAIT_POLICY=PASSIVE before starting Python, import dash_fast before torch, "
                   "or cpu_threads=1")
# the parked team of shorten_openmp_spin (its host thread and size), kept for the life of the process
_parked: tuple | None = None


def cpu_thread_count(cpu_threads: int | str | None, usable_cpus: int,
                     environ: MutableMapping[str, str] = os.environ) -> tuple[int | None, str]:
    """(torch threads to set, or None to leave torch's count; why, for the start-up line). "auto": one per
    usable CPU, whatever the import order (the spin is dealt with by shorten_openmp_spin)."""
    if cpu_threads is None:
        return None, "cpu_threads=None: torch's own count"
    if cpu_threads != "auto":
        return int(cpu_threads), f"cpu_threads={cpu_threads}"
    chosen = [k for k in THREAD_VARS if environ.get(k)]
    if chosen:
        return None, f"{chosen[0]}={environ[chosen[0]]} in the environment"
    return max(1, usable_cpus), f"cpu_threads=auto: one per usable CPU ({usable_cpus})"


def loaded_libgomp(maps: str = "/proc/self/maps") -> str | None:
    """The path of the libgomp torch runs on (the one inside torch's own folders when several are loaded),
    or None (not Linux, or torch on another OpenMP runtime)."""
    try:
        with open(maps) as f:
            paths = {line.split()[-1] for line in f if "/libgomp" in line}
    except OSError:
        return None
    ours = sorted(p for p in paths if "/torch/lib/" in p or "/torch.libs/" in p) or sorted(paths)
    return ours[0] if ours else None


def shorten_openmp_spin(cpus: int) -> bool:
    """Make the loaded libgomp spin 100 times instead of 300000 before its threads sleep (module docstring,
    2.): park one team of `cpus` threads (at least 2) in a host thread that never returns, so libgomp
    manages more threads than the `cpus` it found at load whatever team sizes run later. Once per
    process; returns whether the short spin is on (False: no libgomp found)."""
    global _parked
    if _parked is not None:
        return True
    import ctypes
    import threading

    path = loaded_libgomp()
    if path is None:
        return False
    gomp, libc = ctypes.CDLL(path), ctypes.CDLL(None)
    noop = ctypes.cast(libc.free, ctypes.c_void_p)  # free(NULL): a C function of one pointer that does nothing
    size = max(2, cpus)
    formed = threading.Event()

    def park() -> None:
        gomp.GOMP_parallel(noop, None, ctypes.c_uint(size), ctypes.c_uint(0))  # the team forms, then docks
        formed.set()
        threading.Event().wait()  # this thread's pool (and so libgomp's count) must outlive the run

    thread = threading.Thread(target=park, name="dash-fast-openmp-park", daemon=True)
    thread.start()
    formed.wait()
    _parked = (thread, size)
    return True


def apply_cpu_threads(cpu_threads: int | str | None, cpu_affinity: str | None) -> tuple[int | None, str]:
    """Bind the process to `cpu_affinity` (if set), then set torch's thread count (cpu_thread_count over
    the CPUs the process may now use); with torch imported before dash_fast and more than one thread,
    shorten libgomp's spin. Returns (threads set or None, why); why is SPINNING_NOTICE when the threads
    spin and nothing could shorten it (the trainer prints it)."""
    import torch

    from dash_fast.runtime.cpus import INITIAL_CPUS, bind_process, parse_cpus

    if cpu_affinity is not None:
        bind_process(parse_cpus(cpu_affinity))
    threads, why = cpu_thread_count(cpu_threads, len(os.sched_getaffinity(0)))
    if threads is not None:
        torch.set_num_threads(threads)
    if openmp_wait == "too_late" and torch.get_num_threads() > 1:
        if shorten_openmp_spin(len(INITIAL_CPUS)):  # libgomp counted the CPUs of the affinity before any binding
            why += "; libgomp's short spin (torch was imported before dash_fast)"
        else:
            why = SPINNING_NOTICE
    return threads, why


def resolve_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" else "float32"


def make_deterministic(device: torch.device) -> list[str]:
    """Deterministic kernels for the ops that have them on CUDA; returns what was set. CPU: nothing to set
    (its kernels are run-to-run deterministic at a fixed thread count). warn_only: an op without a
    deterministic CUDA kernel warns (naming itself) instead of stopping a run."""
    import torch

    if device.type != "cuda":
        return []
    # cuBLAS picks reduction splits per workspace: a fixed workspace makes GEMMs reproducible. It only
    # takes effect if set before the first cuBLAS handle is created (the trainer calls this first).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return ["CUBLAS_WORKSPACE_CONFIG", "use_deterministic_algorithms(warn_only)", "cudnn.deterministic"]


def prepare_engine(engine, rows: int, prompt_tokens: int, completion_tokens: int) -> list[int]:
    """Reserve the cache for `rows` rows of prompt + completion tokens and capture every CUDA-graph bucket,
    here on the main thread (engines without `prepare`, e.g. vLLM: nothing to do). Returns the buckets."""
    prepare = getattr(engine, "prepare", None)
    return prepare(rows, prompt_tokens + completion_tokens) if prepare is not None else []
