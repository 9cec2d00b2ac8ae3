"""What memory a process may plan with: a device's budget and this process's resident set (memory_plan.py
plans against them). CUDA: the device's total memory; CPU: what the host has available now (within a cgroup
limit), shared by the ranks on this host. Read from /proc and /sys/fs/cgroup; None where they are absent.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from typing import Any

GB = 1e9  # the unit of memory_budget_gb and of the plan's messages


def device_budget(device: str, override_gb: float | None = None, local_ranks: int = 1) -> tuple[int | None, str]:
    """(bytes, where they come from): `memory_budget_gb` when set; CUDA: the device's total memory; CPU:
    the memory available now (MemAvailable, within a cgroup limit) shared by the `local_ranks` processes of
    this host, plus this process's resident set."""
    if override_gb is not None:
        return int(override_gb * GB), "memory_budget_gb"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA device here: set memory_budget_gb"
        index = torch.device(device).index or 0
        return int(torch.cuda.get_device_properties(index).total_memory), "CUDA total memory"
    available = _meminfo_kb("MemAvailable")
    if available is None:
        return None, "MemAvailable unknown"
    free, source = available * 1024, "available RAM"
    cgroup = _cgroup_free()
    if cgroup is not None and cgroup < free:
        free, source = cgroup, "cgroup memory.max"
    if local_ranks > 1:
        free, source = free // local_ranks, f"{source} / {local_ranks} ranks"
    return free + process_rss(), source


def process_rss() -> int:
    """This process's resident set now, in bytes (0 where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of these CPU tensors' storages in this process's resident set now, each storage once. A storage
    inside a file mapping (a memory-mapped safetensors checkpoint, paged in on first use) counts that mapping's
    resident pages, once per mapping; any other storage counts whole (anonymous memory, written when the
    tensor was made). Without /proc/self/smaps every storage counts whole."""
    storages: dict[int, int] = {}
    for t in tensors:
        if t.device.type == "cpu":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    mappings = _file_mappings()
    starts = [m[0] for m in mappings]
    total, counted = 0, set()
    for ptr, n in storages.items():
        i = bisect.bisect_right(starts, ptr) - 1
        if i < 0 or ptr >= mappings[i][1] or n == 0:
            total += n
        elif i not in counted:
            counted.add(i)
            total += mappings[i][2]
    return total


def _file_mappings() -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of this process's file-backed mappings, by start ([] without /proc)."""
    out: list[list[int]] = []
    current: list[int] | None = None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = _MAPPING.match(line)
                if head:
                    current = [int(head[1], 16), int(head[2], 16), 0] if head[3] != "0" else None
                    if current is not None:
                        out.append(current)
                elif current is not None and line.startswith("Rss:"):
                    current[2] = int(line.split()[1]) * 1024
    except OSError:
        return []
    return sorted((a, b, r) for a, b, r in out)


_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)")


def _meminfo_kb(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cgroup_free() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return int(limit) - int(f.read().strip())
    except (OSError, ValueError):
        return None
