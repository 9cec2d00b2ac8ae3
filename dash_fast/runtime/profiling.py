"""NVTX ranges (names as in docs/design.md section 5), cudaProfilerStart/Stop windows, torch.profiler traces.

`nvtx_range(name)` is dash_kernels' helper (the kernels package cannot import dash_fast, so the one
definition lives there): on a machine without CUDA nothing is pushed, and while a `--trace` window is
recording each range is also a torch.profiler `record_function`, so the Chrome trace shows the same names
as an Nsight Systems timeline.
"""

from __future__ import annotations

import os

import torch
from dash_kernels.utils import nvtx_range

__all__ = ["RANGES", "ProfileWindow", "nvtx_range", "parse_steps"]

RANGES = ("rollout/generate", "rollout/reward", "train/logprob_old", "train/logprob_ref", "train/forward",
          "train/backward", "optim/step", "sync/weights")


def parse_steps(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    a, _, b = spec.partition(":")
    return int(a), int(b)


class ProfileWindow:
    """Wrap optimizer steps A..B (inclusive) in cudaProfilerStart/Stop, for `nsys --capture-range=cudaProfilerApi`,
    and, with `trace_path`, record them (every step when no window is given) in a torch.profiler Chrome trace
    (open it in chrome://tracing or https://ui.perfetto.dev)."""

    def __init__(self, spec: str | None, trace_path: str | None = None) -> None:
        self.window = parse_steps(spec)
        self.active = False
        self.trace_path = trace_path
        self.profiler: torch.profiler.profile | None = None

    def _in_window(self, step: int) -> bool:
        return self.window is None or self.window[0] <= step <= self.window[1]

    def before_step(self, step: int) -> None:
        if self.window and step == self.window[0] and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            self.active = True
        if self.trace_path and self.profiler is None and self._in_window(step):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        if self.active and self.window and step >= self.window[1]:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            self.active = False
        if self.profiler is not None and self.window and step >= self.window[1]:
            self.close()

    def close(self) -> None:
        """Stop a trace still recording (the run ended inside the window) and write it."""
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        os.makedirs(os.path.dirname(os.path.abspath(self.trace_path)), exist_ok=True)
        self.profiler.export_chrome_trace(self.trace_path)
        self.profiler = None
