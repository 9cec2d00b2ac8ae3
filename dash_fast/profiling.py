"""NVTX ranges (names as in DESIGN.md section 5), cudaProfilerStart/Stop windows, torch.profiler traces.

On a machine without CUDA the ranges cost one attribute check: nothing is pushed.
"""

from __future__ import annotations

import contextlib

import torch

RANGES = ("rollout/generate", "rollout/reward", "train/logprob_old", "train/logprob_ref", "train/forward",
          "train/backward", "optim/step", "sync/weights")


@contextlib.contextmanager
def nvtx_range(name: str):
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def parse_steps(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    a, _, b = spec.partition(":")
    return int(a), int(b)


class ProfileWindow:
    """Wrap optimizer steps A..B (inclusive) in cudaProfilerStart/Stop, for `nsys --capture-range=cudaProfilerApi`."""

    def __init__(self, spec: str | None) -> None:
        self.window = parse_steps(spec)
        self.active = False

    def before_step(self, step: int) -> None:
        if self.window and step == self.window[0] and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            self.active = True

    def after_step(self, step: int) -> None:
        if self.active and self.window and step >= self.window[1]:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            self.active = False
