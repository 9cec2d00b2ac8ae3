"""Sampling rollout r+1 beside the backward of rollout r (`overlap=True`, docs/design.md section 1).

With one optimizer step per rollout the weights theta_r do not change between the start of step r and
its optimizer step, so rollout r+1 can be drawn from those very tensors (zero-copy) while rollout r's
micro-batches are backpropagated. The optimizer step then waits for the sampler (it must not write the
weights the sampler reads), and step r+1 trains on samples one step stale: the clipped ratio uses the
sampler's log-probs as old_logp. With refill=True the rollout r+1 is launched after step r's refill
rounds (they need the engine, and draw their prompts first), so it overlaps the update only; the refill
rows come from theta_r itself, so their sampling log-probs are exactly the old ones.

On CUDA, with the static-cache engine, the sampler runs in a worker thread on its own CUDA stream and
`wait()` joins it and makes the default stream wait on its event. On CPU, with the static-cache engine
and at least two usable cores, the sampler runs in its own process (`cpu_sampler="process"`, the
default; sampler_process.py): the parameters are moved to shared memory once and the child reads them in
place (AdamW, `load_state_dict` and resume write into those same storages; the optimizer step waits for
the child's rollout, so rollout r+1 is read from theta_r exactly), with its own torch thread count (the
sampler's cores, `sampler_cores`, default half) and its own KV cache; the trainer runs torch with the
learner's share. It is spawned once per run, when the scheduler is built (its start-up overlaps the
trainer's), and stopped when training ends or fails (and dies with a killed trainer). `cpu_sampler=
"thread"` samples in a worker thread instead (one interpreter: the GIL, and a process-wide thread count).
With `bind_cpus=True` the learner's threads and the sampler's are bound to their own cores.

Widening (sampler process): the sampler on its share of the cores usually finishes before the learner on
the rest (bench/e2e.py shows the split), and torch scales with threads, so a fixed split leaves the
sampler's cores idle for the rest of the step. Between
micro-batches (never inside one) the learner asks, without blocking, whether the rollout is back; once it
is, it takes every core of the split (torch's thread count and, with bind_cpus, every thread's affinity:
OpenMP workers inherit the binding of the thread that starts them, and bind_process rebinds those already
there) until the next launch, which gives the cores back before the sampler is sent its plan. The sampler
is idle in between (blocked on its pipe), and the optimizer step still waits for the rollout, so weights
it reads are never written. Only the learner's thread count changes, so results change at most in the last
bits, and which micro-batches run widened depends on when the sampler finishes. The micro-batch is the
grain: with 2-3 per update (the embedded default's 4096 tokens) the gain is well under an idle core. Why the
update slows beside the sampler on a shared machine (CPU time taken by other jobs, not the GIL):
docs/cpu.md and bench/overlap_diag.py.

Everywhere else (one core, the dynamic or vLLM engines) the same schedule runs in order: `launch()`
samples at once, before the optimizer step, so the bookkeeping and the results are exactly those of the
concurrent schedule.

Checkpoints: a pending rollout is saved with the trainer state (single process), so `--resume auto`
continues bit-for-bit; the sampler position saved is the one after its prompts were drawn. Under
torchrun, where only rank 0 writes the checkpoint, the pending rollout is dropped instead and the
sampler position saved is the one before its prompts were drawn: the resumed run re-samples those
prompts from the checkpoint's weights (no prompt lost or repeated; that one rollout is on-policy).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dash_fast.engines.base import Rollout
from dash_fast.engines.sampler_process import GenerationPlan, SamplerProcess
from dash_fast.runtime.cpus import INITIAL_CPUS, bind_process, split_cpus


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
    """Holds at most one rollout sampled ahead. `concurrent=True` samples beside the update: on CUDA in a
    worker thread on a side stream; on CPU in a sampler process (or, `cpu_sampler="thread"`, a worker
    thread) on its own cores (see the module docstring); otherwise in order."""

    def __init__(self, device: torch.device, concurrent: bool, sampler_cores: int | None = None,
                 cpus: set[int] | None = None, bind_cpus: bool = False, cpu_sampler: str = "process",
                 engine=None, widen: bool = True) -> None:
        """`cpus`: the CPU ids to split on CPU (default: the process's affinity when dash_fast was imported,
        so a second scheduler in one process splits the same cores); `bind_cpus`: bind each side to its own;
        `cpu_sampler`: "process" (needs `engine`, the trainer's TorchEngine, whose model the process reads)
        or "thread"; `widen`: with the process, the learner takes the sampler's cores once it is done."""
        if cpu_sampler not in ("process", "thread"):
            raise ValueError(f"cpu_sampler={cpu_sampler!r}: must be process or thread")
        self.cpu_split = split_cpus(set(cpus or INITIAL_CPUS), sampler_cores) \
            if concurrent and device.type == "cpu" else None
        self.concurrent = concurrent and (device.type == "cuda" or self.cpu_split is not None)
        self.stream = torch.cuda.Stream(device) if self.concurrent and device.type == "cuda" else None
        self.bind_cpus = bind_cpus and self.cpu_split is not None
        self.engine = engine
        self.use_process = self.cpu_split is not None and cpu_sampler == "process"
        if self.use_process and engine is None:
            raise ValueError("cpu_sampler='process' needs the engine whose model the sampler process reads")
        if self.cpu_split is not None:
            learner, _ = self.cpu_split
            if self.bind_cpus:
                bind_process(learner)
            torch.set_num_threads(len(learner))
        self.pending: Prefetched | None = None
        self._thread: threading.Thread | None = None
        self._event: torch.cuda.Event | None = None
        self.process: SamplerProcess | None = None
        self._in_flight = False  # a plan was sent to the process and its rollout not yet received
        self.widen = widen and self.use_process
        self.widened = False  # the learner runs on all the split's cpus (the sampler is idle)
        if self.use_process:  # now: its start-up (imports, ~3 s of CPU) overlaps the trainer's own
            self._process()

    def launch(self, job: Prefetched, sample: Callable[[], Rollout], plan: GenerationPlan | None = None) -> None:
        """Start sampling `job` (at once, in order, unless concurrent). `sample` samples it here; `plan`, its
        generation calls, is what the sampler process runs (cpu_sampler="process")."""
        assert self.pending is None, "one rollout ahead at most"
        self.pending = job
        if self.use_process:
            if plan is None:
                raise ValueError("the sampler process needs the rollout's generation plan")
            self._narrow()  # the sampler's cores are its own again
            self._process().submit(job.step, plan)
            self._in_flight = True
            return

        def work() -> None:
            try:
                if self.bind_cpus:  # concurrent on CPU: this worker thread only
                    os.sched_setaffinity(0, self.cpu_split[1])
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
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())  # the last optimizer step's writes land first
        self._thread = threading.Thread(target=work, name="dash-fast-prefetch", daemon=True)
        self._thread.start()

    def _process(self) -> SamplerProcess:
        """The sampler process, (re)started when there is none, it died, or the engine's model changed."""
        model = self.engine.model
        if self.process is not None and (not self.process.alive or self.process.model is not model):
            self.process.close()
            self.process = None
        if self.process is None:
            _, sampler = self.cpu_split
            self.process = SamplerProcess(model, self.engine.pad_token_id, threads=len(sampler),
                                          cpus=sampler if self.bind_cpus else None)
        return self.process

    def sampler_started(self, timeout: float | None = None) -> int | None:
        """The sampler process's pid once it has begun sampling the pending rollout (None if it has not
        within `timeout` s, or there is no process): lets a caller see the sampler run beside it."""
        if not self._in_flight or self.process is None:
            return None
        return self.process.pid if self.process.wait_started(self.pending.step, timeout) else None

    def between_micro_batches(self) -> None:
        """Called by the learner between micro-batches (never inside one): once the sampler process has sent
        the pending rollout back (checked without blocking), the learner takes the sampler's cores too."""
        if self.widen and not self.widened and self._receive(timeout=0):
            self._widen()

    def _receive(self, timeout: float | None = None) -> bool:
        """Whether no rollout is in flight any more: receive the process's (waiting up to `timeout` s,
        None: until it comes), keeping it or its error on `pending`."""
        if not self._in_flight:
            return True
        try:
            rollout = self.process.result(self.pending.step, timeout)
            if rollout is None:
                return False
            self.pending.rollout = rollout
        except BaseException as e:  # re-raised by wait()
            self.pending.error = e
        self._in_flight = False
        return True

    def _widen(self) -> None:
        """All the split's cpus to the learner: its threads (OpenMP workers started later inherit the main
        thread's binding) and torch's thread count. Only while the sampler process is idle."""
        learner, sampler = self.cpu_split
        if self.bind_cpus:
            bind_process(learner | sampler)
        torch.set_num_threads(len(learner | sampler))
        self.widened = True

    def _narrow(self) -> None:
        """Back to the learner's share, before the sampler process is given the next rollout."""
        if self.widened:
            learner, _ = self.cpu_split
            if self.bind_cpus:
                bind_process(learner)
            torch.set_num_threads(len(learner))
            self.widened = False

    def wait(self) -> None:
        """Block until the sampler no longer reads the weights (before an optimizer step, eval or save); with
        the sampler process idle from then on, the learner runs on every core until the next launch."""
        self._receive()
        if self.widen and not self.widened:  # the sampler is idle until the next launch
            self._widen()
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

    def close(self) -> None:
        """Stop the sampler process (training ended or failed); a rollout still in flight is dropped. A
        later launch starts a new one."""
        if self.process is not None:
            self.process.close()
            self.process = None
        if self._in_flight:
            self._in_flight, self.pending = False, None

    def _raise(self) -> None:
        if self.pending is not None and self.pending.error is not None:
            error, self.pending = self.pending.error, None
            raise error
