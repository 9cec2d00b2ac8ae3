"""CPU sets: the Linux cpulist format, the CPUs a run may use, binding every thread of a process, and the
learner / sampler split that the overlap scheduler and the vLLM engine process share."""

from __future__ import annotations

import os

INITIAL_CPUS = frozenset(os.sched_getaffinity(0))  # before any binding: what a scheduler may split


def parse_cpus(spec: str) -> set[int]:
    """'0,2-3' -> {0, 2, 3} (the Linux cpulist format)."""
    cpus: set[int] = set()
    for part in str(spec).split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cpu list {spec!r}: expected numbers and ranges like '0,2-3'")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def usable_cpus(cpu_affinity: str | None) -> set[int]:
    """The CPUs a run may split: `cpu_affinity` when given, else the process's affinity at import."""
    return parse_cpus(cpu_affinity) if cpu_affinity else set(INITIAL_CPUS)


def bind_process(cpus: set[int]) -> None:
    """Bind every thread of this process (OpenMP workers included) to `cpus`: sched_setaffinity on a
    thread id binds that thread only, and threads started later inherit their creator's binding."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that just exited
            pass


def split_cpus(cpus: set[int], sampler_cores: int | None) -> tuple[set[int], set[int]] | None:
    """(learner cpus, sampler cpus) from the usable ones, or None when there are fewer than two."""
    ordered = sorted(cpus)
    if len(ordered) < 2:
        return None
    n = sampler_cores or len(ordered) // 2
    if not 1 <= n < len(ordered):
        raise ValueError(f"sampler_cores={sampler_cores}: must leave the learner at least one of {len(ordered)} cpus")
    return set(ordered[:-n]), set(ordered[-n:])
