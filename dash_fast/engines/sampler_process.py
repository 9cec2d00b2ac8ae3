"""The CPU sampler process of `overlap=True` (overlap.py): the embedded engine in its own process, reading
the trainer's parameters in place.

`SamplerProcess(model, pad_id, threads, cpus)` moves the model's parameters and buffers to shared memory
(`Module.share_memory()`: each storage is moved once; the Parameter objects, which the optimizer holds,
stay the same, and AdamW, `load_state_dict` and resume all write into them in place) and starts one
`spawn` child (no fork after OpenMP has started) that unpickles the model onto those same storages,
builds its own `TorchEngine` (its KV cache lives there) and then, per request, runs the generation calls
it is sent and sends back the Rollout. Its own torch thread count and, optionally, its own cores.
The child does not re-run the user's `__main__` (spawn would: a training script without an `if __name__
== "__main__":` guard would start training again in it): `__main__` is a blank module while the child is
launched, so it needs only importable classes (the model's, from transformers).

Protocol over one pipe: the child says `("ready", None, pid)` once started; the parent sends `(step, plan)`;
the child answers `("started", step, pid)` on receipt, then `("done", step, rollout)` or `("error", step,
exception)`. `None` asks it to exit. The child dies with the parent: PR_SET_PDEATHSIG on Linux, and EOF
on the pipe otherwise.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import types
import weakref
from multiprocessing.connection import Connection

import torch
import torch.multiprocessing as mp

from dash_fast.engines.base import Rollout, SamplingParams

GenerationPlan = list[tuple[list[list[int]], SamplingParams]]  # one engine.generate call per entry


def run_plan(engine, plan: GenerationPlan, pad_id: int) -> Rollout:
    """The generation calls of one rollout, joined."""
    return Rollout.concat([engine.generate(prompt_ids, params) for prompt_ids, params in plan], pad_id)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux / no glibc: EOF on the pipe still ends the loop
        pass


def _portable_error(e: BaseException) -> BaseException:
    """The exception itself when it pickles, else a RuntimeError naming it (the trace is in the message)."""
    import pickle
    import traceback

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"sampler process: {type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))}")


def _sampler_main(conn: Connection, model: torch.nn.Module, pad_id: int, threads: int,
                  cpus: set[int] | None, parent_pid: int) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before PR_SET_PDEATHSIG was set
        return
    if cpus:
        os.sched_setaffinity(0, cpus)  # before torch starts its OpenMP workers: they inherit it
    torch.set_num_threads(threads)
    from dash_fast.engines.torch_engine import TorchEngine

    engine = TorchEngine(model, pad_id)
    conn.send(("ready", None, os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe or exited
            return
        if msg is None:
            return
        step, plan = msg
        try:
            conn.send(("started", step, os.getpid()))
            with torch.no_grad():
                rollout = run_plan(engine, plan, pad_id)
            reply = ("done", step, rollout)
        except BaseException as e:  # sent to the trainer, which re-raises it
            reply = ("error", step, _portable_error(e))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def _stop(process, conn: Connection) -> None:
    """Ask the child to exit, then make sure it has (also run by the finalizer at garbage collection)."""
    try:
        conn.send(None)
    except (BrokenPipeError, OSError):
        pass
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join(timeout=10)
    conn.close()


class SamplerProcess:
    """One spawned sampler process (see the module docstring); `submit` then `result`, one at a time."""

    def __init__(self, model: torch.nn.Module, pad_id: int, threads: int = 1, cpus: set[int] | None = None) -> None:
        model.share_memory()
        self.model = model
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_sampler_main, name="dash-fast-sampler", daemon=True,
                                   args=(child_conn, model, pad_id, threads, cpus, os.getpid()))
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")  # the child skips re-running the user's script
        try:
            self.process.start()
        finally:
            sys.modules["__main__"] = main
        child_conn.close()  # the child holds the only other end: EOF here when it dies
        self.pid = self.process.pid
        self.started: int | None = None  # the step whose "started" message arrived last
        self.ready = False  # the child has imported torch and built its engine
        self._finalizer = weakref.finalize(self, _stop, self.process, self.conn)

    def submit(self, step: int, plan: GenerationPlan) -> None:
        self.started = None
        self.conn.send((step, plan))

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Whether the child has started up (waiting up to `timeout` s); call with no rollout in flight."""
        while not self.ready:
            if not self.conn.poll(timeout):
                return False
            self._receive(None)
        return True

    def wait_started(self, step: int, timeout: float | None = None) -> bool:
        """Whether the child has begun sampling `step` (waiting up to `timeout` seconds for it to say so)."""
        while self.started != step:
            if not self.conn.poll(timeout):
                return False
            self._receive(step)
        return True

    def result(self, step: int, timeout: float | None = None) -> Rollout | None:
        """Rollout `step` once it comes back (waiting up to `timeout` s, None: for as long as it takes; None
        if it has not come back by then); re-raise the child's error, or say that it died."""
        while timeout is None or self.conn.poll(timeout):
            reply = self._receive(step)
            if reply is not None:
                return reply
        return None

    def _receive(self, step: int | None) -> Rollout | None:
        try:
            kind, got, payload = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=10)
            raise RuntimeError(f"the sampler process (pid {self.pid}) exited with code {self.process.exitcode} "
                               f"while sampling the rollout of step {step}") from None
        if kind == "ready":
            self.ready = True
            return None
        if got != step:
            raise RuntimeError(f"sampler process answered for step {got} while step {step} was pending")
        if kind == "started":
            self.started = got
            return None
        if kind == "error":
            raise payload
        return payload

    def close(self) -> None:
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()
