"""vLLM in its own engine process beside the learner (`engine: vllm`, `vllm_process`).

The in-process engine (vllm_engine.py) shares the trainer's cores and runs between updates. Here the
`LLM` is built with V1 multiprocessing, so vLLM's engine core and its CPU worker run in a child process
whose OpenMP threads vLLM binds to the cores we name (`VLLM_CPU_OMP_THREADS_BIND`, vLLM's own setting);
the trainer keeps the other cores. With `overlap=True` the overlap scheduler's sampler thread only waits
on that process, so rollout r+1 is sampled on the engine's cores while rollout r is backpropagated on
the learner's (the CPU analogue of a second GPU).

Weight push (after every optimizer step, after the sampler finished: the engine must not mix weights
within a rollout). Tensors in `collective_rpc` kwargs do not survive vLLM's msgpack IPC (they arrive as
lists and kill the engine), so the trainer writes its parameters as one safetensors file on /dev/shm
(memory, not disk) and calls `dash_fast_reload(path)` on the worker, a method of `WorkerExtension`
(vLLM's public `worker_extension_cls`): vLLM's `reload_weights(weights_path=...)` (in place, a layer at a
time), the tied-head refresh (vllm_engine.refresh_tied_heads), then `reset_prefix_cache()`. The file is
deleted after the call: a push holds one extra copy of the weights in shared memory while it runs and
costs more than the in-process push (docs/vllm.md), so the process is the better choice only when sampling
overlaps training.

CPU split: the engine gets the last `sampler_cores` of the usable CPUs (default half), the learner the
rest (runtime/cpus.split_cpus, the same split the overlap scheduler makes). In order (`overlap=False`,
`vllm_process=True`) the engine is bound to all of them. On CUDA nothing is bound (sleep mode stays with
the in-process engine; not run here).

A dead trainer leaves nothing: vLLM's engine core does not watch its parent (after a SIGKILL of the trainer
its engine core, worker and resource tracker ran on, reparented; tests/test_vllm_real.py). So the engine's
processes are spawned (`VLLM_WORKER_MULTIPROC_METHOD=spawn`, vLLM's setting) with a marker in their
environment, and a small reaper child (reaper.py, started before vLLM) kills the marked processes and
removes the staged weights once the trainer is gone. Only vLLM's environment settings are used, so the GPU
package behaves the same. Ctrl-C in a terminal (SIGINT to the whole process group) also reaches vLLM's engine
core, which then shuts down: the run ends with vLLM's EngineDeadError (or Watched's error, where vLLM left the
call in flight unanswered), not with the end-of-step checkpoint that SIGTERM to the trainer gives.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Any

import torch

from dash_fast.engines.reaper import is_resource_tracker, processes_with
from dash_fast.engines.vllm_engine import (
    VLLMEngine,
    import_vllm,
    llm_kwargs,
    model_source,
    refresh_tied_heads,
)
from dash_fast.runtime.cpus import split_cpus, usable_cpus


class WorkerExtension:
    """Methods vLLM mixes into its worker (`worker_extension_cls`); called through `collective_rpc` with
    plain-data arguments only, so vLLM's default (safe) serialisation carries them."""

    def dash_fast_reload(self, path: str) -> list[str]:
        """Reload every weight in place from the safetensors directory `path`, then re-process tied heads.
        Returns the names of the re-processed layers."""
        self.reload_weights(weights_path=path, is_checkpoint_format=True)
        return refresh_tied_heads(self.get_model())


def engine_cpus(args: Any, device: torch.device) -> set[int] | None:
    """The CPUs the engine process's threads are bound to: the overlap sampler's share of the usable CPUs
    with overlap, all of them in order; None on CUDA (nothing bound)."""
    if device.type != "cpu":
        return None
    usable = usable_cpus(args.cpu_affinity)
    split = split_cpus(usable, args.sampler_cores) if args.overlap else None
    return split[1] if split else usable


def use_process(args: Any, device: torch.device) -> bool:
    """`vllm_process=None` (auto): a separate engine process when overlap=True on CPU with at least two
    usable CPUs (the only case where it can sample beside training), else vLLM in the trainer's process
    (a cheaper push, and sleep mode on CUDA)."""
    if args.vllm_process is not None:
        return bool(args.vllm_process)
    usable = usable_cpus(args.cpu_affinity)
    return bool(args.overlap) and device.type == "cpu" and len(usable) >= 2


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables while the engine process is spawned (it inherits them), then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MARKER = "DASH_FAST_VLLM_ENGINE"  # set in the environment of the engine's processes: NAME=<trainer pid>-<random>


def start_reaper(marker: str, stage: str) -> subprocess.Popen:
    """The engine's reaper (reaper.py): a small child that kills the processes marked `marker` and
    removes `stage` when this process dies without closing the engine (SIGKILL, an unhandled signal)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reaper.py")
    return subprocess.Popen([sys.executable, script, marker, stage], stdin=subprocess.PIPE, text=True)


class Watched:
    """The `LLM`, with its blocking calls failing once the engine's processes are gone. vLLM's sync client
    waits without end for a call in flight when its engine core dies without answering (a utility call's
    future is never resolved, and no error is queued for `generate`): seen as a trainer hung after Ctrl-C,
    which vLLM's engine core also receives. Each call runs in a helper thread; the caller checks every
    second that a marked process other than the resource tracker still exists."""

    WATCHED = ("generate", "collective_rpc", "reset_prefix_cache")

    def __init__(self, llm: Any, marker: str) -> None:
        self.llm, self.marker = llm, marker.encode()

    def alive(self) -> bool:
        if not os.path.isdir("/proc"):  # no way to tell here (not Linux): assume it is
            return True
        return any(not is_resource_tracker(p) for p in processes_with(self.marker))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.llm, name)
        return (lambda *a, **k: self.call(attr, *a, **k)) if name in self.WATCHED else attr

    def call(self, fn, *args, **kwargs) -> Any:
        done: dict[str, Any] = {}

        def run() -> None:
            try:
                done["value"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller)
                done["error"] = e

        thread = threading.Thread(target=run, name=f"vllm-{fn.__name__}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(1.0)
            if thread.is_alive() and not self.alive():
                thread.join(5.0)  # an answer (or vLLM's own EngineDeadError) may still be on its way
                if thread.is_alive():
                    raise RuntimeError(f"vLLM's engine process exited during {fn.__name__}() without answering")
        if "error" in done:
            raise done["error"]
        return done["value"]


def shm_dir() -> str:
    """Where pushed weights are staged: /dev/shm (memory) where it exists, else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class VLLMProcessEngine(VLLMEngine):
    """`VLLMEngine` with the LLM in its own process (see the module docstring). Can sample concurrently
    with training: the sampler thread of overlap.py blocks on the engine process, not on the cores."""

    can_sample_concurrently = True
    samples_in_own_process = True  # overlap.py drives it from a thread: no embedded-engine sampler process

    def describe(self) -> str:
        """The rollout path, for the start-up line and summary.json."""
        return "vllm process"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, args: Any, llm: Any = None) -> None:
        vllm = import_vllm()
        first = next(model.parameters())
        source = model_source(model) if llm is None else None
        self.cpus = engine_cpus(args, first.device)
        run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        marker = f"{MARKER}={run_id}"  # what the reaper and Watched look for in a process's environment
        # spawned (vLLM's own setting): exec'd with this environment, so the reaper can tell its processes
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn", MARKER: run_id}
        if self.cpus is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(self.cpus)))
        self.stage = os.path.join(shm_dir(), f"dash-fast-weights-{run_id}")
        self.reaper = None
        if llm is None:
            kwargs = {**llm_kwargs(source, args, first.device, first.dtype), "enable_sleep_mode": False,
                      "worker_extension_cls": f"{__name__}.WorkerExtension"}
            self.reaper = start_reaper(marker, self.stage)  # before vLLM starts anything
            try:
                with environment(env):
                    self.llm = Watched(vllm.LLM(**kwargs), marker)  # no local name: vLLM keeps this frame alive
            except BaseException:
                self.reaper.stdin.close()  # end of file without "close": it kills what vLLM left
                raise
        super().__init__(model, tokenizer, args, sleep_level=0, llm=llm or self.llm)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Stage the trainer's parameters in shared memory, reload them in the engine process, re-process
        tied heads there and drop the prefix cache; the staged file is removed afterwards."""
        from safetensors.torch import save_file

        self.model = model
        os.makedirs(self.stage, exist_ok=True)
        path = os.path.join(self.stage, "model.safetensors")
        try:
            save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, path)
            self.llm.collective_rpc("dash_fast_reload", args=(self.stage,))
        finally:  # nothing left in shared memory between pushes (nor after a run that never calls close())
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            with contextlib.suppress(OSError):
                os.rmdir(self.stage)
        self.llm.reset_prefix_cache()
        self.weights_fresh = True

    def close(self) -> None:
        """Stop the engine process now and remove the staging directory. vLLM stops it at exit (a finalizer on
        its client); this calls that client's shutdown now (`LLM` has no public one; guarded by getattr)."""
        llm, self.llm = getattr(self, "llm", None), None
        llm = llm.llm if isinstance(llm, Watched) else llm
        if llm is not None:
            shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm
            gc.collect()
        with contextlib.suppress(OSError):
            os.rmdir(self.stage)
        reaper, self.reaper = getattr(self, "reaper", None), None
        if reaper is not None:  # shut down above: the reaper has nothing to do
            with contextlib.suppress(OSError):
                reaper.stdin.write("close\n")
                reaper.stdin.close()
            reaper.wait(timeout=30)
