"""Sampling rollout r+1 beside the backward of rollout r (`overlap=True`, DESIGN.md section 1).

With one optimizer step per rollout the weights theta_r do not change between the start of step r and
its optimizer step, so rollout r+1 can be drawn from those very tensors (zero-copy) while rollout r's
micro-batches are backpropagated. The optimizer step then waits for the sampler (it must not write the
weights the sampler reads), and step r+1 trains on samples one step stale: the clipped ratio uses the
sampler's log-probs as old_logp. With refill=True the rollout r+1 is launched after step r's refill
rounds (they need the engine, and draw their prompts first), so it overlaps the update only; the refill
rows come from theta_r itself, so their sampling log-probs are exactly the old ones.

On CUDA, with the static-cache engine, the sampler runs in a worker thread on its own CUDA stream and
`wait()` joins it and makes the default stream wait on its event. Everywhere else (CPU, the dynamic or
vLLM engines) the same schedule runs in order: `launch()` samples at once, before the optimizer step,
so the bookkeeping and the results are exactly those of the concurrent schedule.

Checkpoints: a pending rollout is saved with the trainer state (single process), so `--resume auto`
continues bit-for-bit; the sampler position saved is the one after its prompts were drawn. Under
torchrun, where only rank 0 writes the checkpoint, the pending rollout is dropped instead and the
sampler position saved is the one before its prompts were drawn: the resumed run re-samples those
prompts from the checkpoint's weights (no prompt lost or repeated; that one rollout is on-policy).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dash_fast.rollout.base import Rollout


@dataclass
class Prefetched:
    """A rollout drawn ahead for optimizer step `step`, with what is needed to use, save or undo it."""

    step: int
    indices: list[int]  # this rank's prompt indices
    row_offset: int
    sampler_before: dict  # the prompt sampler's state before `indices` were drawn
    weights_version: int  # optimizer steps applied to the weights it was sampled from
    rollout: Rollout | None = None
    error: BaseException | None = field(default=None, repr=False)

    def state_dict(self) -> dict:
        r = self.rollout
        return {"step": self.step, "indices": self.indices, "row_offset": self.row_offset,
                "sampler_before": self.sampler_before, "weights_version": self.weights_version,
                "rollout": {"prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids,
                            "completion_mask": r.completion_mask, "sampling_logps": r.sampling_logps,
                            "stats": r.stats}}

    @staticmethod
    def from_state_dict(state: dict) -> Prefetched:
        return Prefetched(**{**state, "rollout": Rollout(**state["rollout"])})


class OverlapScheduler:
    """Holds at most one rollout sampled ahead. `concurrent=True` needs CUDA (a side stream + thread)."""

    def __init__(self, device: torch.device, concurrent: bool) -> None:
        self.concurrent = concurrent and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.concurrent else None
        self.pending: Prefetched | None = None
        self._thread: threading.Thread | None = None
        self._event: torch.cuda.Event | None = None

    def launch(self, job: Prefetched, sample: Callable[[], Rollout]) -> None:
        """Start sampling `job` (at once, in order, unless concurrent)."""
        assert self.pending is None, "one rollout ahead at most"
        self.pending = job

        def work() -> None:
            try:
                with torch.no_grad():
                    if self.stream is None:
                        job.rollout = sample()
                    else:  # a new thread starts on cuda:0: select this rank's device first
                        with torch.cuda.device(self.stream.device), torch.cuda.stream(self.stream):
                            job.rollout = sample()
                            self._event = torch.cuda.Event()
                            self._event.record(self.stream)
            except BaseException as e:  # re-raised by wait(), in the training thread
                job.error = e

        if not self.concurrent:
            work()
            self._raise()
            return
        self.stream.wait_stream(torch.cuda.current_stream())  # the last optimizer step's writes land first
        self._thread = threading.Thread(target=work, name="dash-fast-prefetch", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the sampler no longer reads the weights (before an optimizer step, eval or save)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._event is not None:
                torch.cuda.current_stream().wait_event(self._event)
                self._event = None
        self._raise()

    def take(self, step: int) -> Prefetched | None:
        """The rollout sampled ahead for `step`, if any (waiting for it)."""
        if self.pending is None or self.pending.step != step:
            return None
        self.wait()
        job, self.pending = self.pending, None
        return job

    def discard(self) -> Prefetched | None:
        self.wait()
        job, self.pending = self.pending, None
        return job

    def _raise(self) -> None:
        if self.pending is not None and self.pending.error is not None:
            error, self.pending = self.pending.error, None
            raise error
