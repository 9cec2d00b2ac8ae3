"""Data parallelism under torchrun: DDP-style gradient all-reduce (gloo on CPU, NCCL on GPU) and FSDP2.

Each rank samples its contiguous share of the step's prompts. Rewards and completion lengths are
all-gathered (a few floats per row), so every rank computes the same advantages, the same filter and
the same global loss normaliser; each rank's loss is then its share of one global sum, and gradients
are summed (not averaged) across ranks. The result equals one process on the whole rollout.

A rank that fails takes the others down with one line saying which and why (`fail_fast`): collectives time
out after `dist_timeout_s` instead of hanging on a rank that stopped taking part, a rank that raises
publishes why in the process group's store before it exits, and the others, whose next collective then
fails, print that reason (or, for a rank killed without a Python error, its pid and signal) and exit 1
without a traceback of their own. torchrun's agent then stops every remaining worker.

Without torchrun (no WORLD_SIZE > 1 in the environment) everything here is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str = "cpu", timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun process group (gloo for CPU, NCCL for CUDA) if there is one; a collective that
    waits longer than `timeout_s` for another rank fails (None: torch's default, 30 min on gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
        atexit.register(leave_process_group)  # ours to destroy: we made it
        _store_set(f"{_KEY}/pid/{dist.get_rank()}", f"{socket.gethostname()} {os.getpid()}")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def leave_process_group() -> None:
    """Destroy the default process group while the interpreter is still whole (run at exit by the process
    that joined it in `init_distributed`).

    Left to interpreter teardown, gloo's worker threads abort the process: SIGABRT, "terminate called
    without an active exception", in 6 of 20 two-rank torchrun runs of a script that only joins, all-reduces
    and exits (0 of 20 with this). On gloo it runs after a failure too: it is local and makes a peer still
    waiting in a collective fail at once. Elsewhere (NCCL) only after a clean exit, where a destroy beside a
    peer stuck in a collective can hang; torchrun's agent stops a failed run's ranks instead."""
    if not dist.is_initialized():
        return
    failed = _failed or getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None
    if failed and dist.get_backend() != "gloo":
        return
    dist.destroy_process_group()


def shard_range(n: int, info: DistInfo, what: str = "prompts_per_step") -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of n items; n must split evenly over the ranks."""
    if n % info.world_size:
        raise ValueError(f"{what}={n} does not split evenly over {info.world_size} ranks")
    size = n // info.world_size
    return info.rank * size, (info.rank + 1) * size


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_rows(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's equally sized tensor along dim 0, in rank order."""
    if not info.enabled:
        return t
    local = t.to(_comm_device())
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts).to(t.device)


def all_reduce_sum(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is true on any: keeps collective decisions (stop, skip, retry) in step."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum gradients over ranks in one flat buffer per dtype (a rank with no rows contributes zeros)."""
    if not info.enabled:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group]).to(_comm_device())
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Start every rank from rank 0's weights (a module built in memory may differ per rank)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.detach().to(_comm_device())
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------- FSDP2
# torch.distributed.fsdp.fully_shard: NCCL on GPU, gloo on CPU (tests/test_fsdp.py runs it on CPU).


class FSDPRoot(torch.nn.Module):
    """The FSDP2 root: `root(fn, *args)` runs fn inside the root's forward, so the root-managed
    parameters (embeddings, final norm, lm_head) are unsharded for the decoder call *and* the fused
    loss that reads lm_head.weight directly, and their gradients are reduce-scattered after backward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def fully_shard_model(model: torch.nn.Module) -> FSDPRoot:
    """Shard each decoder layer, then the root. Gradients are summed over ranks (divide factor 1),
    because each rank's loss already carries its share of the global normaliser. For fp32/bf16 FSDP2
    turns a divide factor into a PREMUL_SUM reduce-scatter, which only NCCL has: on other backends
    (gloo) it is told to reduce with plain SUM (and skips the divide by 1)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = getattr(getattr(model, model.base_model_prefix), "layers", None)
    if layers is None:
        raise ValueError("fsdp2: expected model.<base_model_prefix>.layers (a decoder-only HF model)")
    for layer in layers:
        fully_shard(layer)
    root = FSDPRoot(model)
    fully_shard(root)
    sum_only = dist.get_backend() != "nccl"
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            if sum_only:
                m.set_force_sum_reduction_for_comms(True)
    return root


@contextlib.contextmanager
def gathered_params(root: torch.nn.Module | None) -> Iterator[None]:
    """Hold every FSDP2 unit unsharded (no collectives per forward), so ranks may run different
    numbers of forwards: generation stops at different lengths, log-prob passes differ in size."""
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(True)
            m.reshard()


def full_state_dict(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF model's full (unsharded) state dict on CPU, for save_pretrained on rank 0. A tied parameter
    (lm_head.weight = embed_tokens.weight) appears once, under its first name, as save_pretrained writes it
    from an unsharded model: gathered, the two names are separate copies it would both keep."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = {n for n, _ in root.named_parameters(remove_duplicate=False)} - {n for n, _ in root.named_parameters()}
    return {k.removeprefix("model."): v for k, v in sd.items() if k not in tied}


def full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state on rank 0's CPU (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
                    optim_sd: dict) -> None:
    """Load a full (unsharded) checkpoint into the sharded model and optimizer (collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(root, {f"model.{k}": v for k, v in model_sd.items()}, options=options)
    set_optimizer_state_dict(root, optimizer, optim_state_dict=optim_sd, options=options)


# ----------------------------------------------------------------------------- failing fast
_failed = False  # a failure went through fail_fast on this rank (leave_process_group reads it)
_KEY = "dash_fast"  # keys in the process group's store: {_KEY}/failed (the first failure), {_KEY}/pid/<rank>
# what a collective raises when a peer is gone (gloo: its socket closed; NCCL: the watchdog) or timed out
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
              "DistBackendError", "NCCL communicator was aborted", "ProcessGroupNCCL")


class RankFailed(SystemExit):
    """Raised on a rank whose collective failed because another rank failed; the one-line reason has
    been printed, so it exits with status 1 and no traceback."""

    def __init__(self) -> None:
        super().__init__(1)


@contextlib.contextmanager
def fail_fast(info: DistInfo, quiet: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run the body; if it raises on one rank, name that rank and why on every rank.

    The rank that raised publishes `rank R failed: Type: message` in the store and prints it (its traceback
    follows as usual; for the `quiet` types, errors whose one line the caller prints, it only publishes).
    A rank whose collective fails because a peer is gone prints `rank R stops: <the published reason>` (or,
    when nothing was published: the local rank killed by a signal, read from /proc, else the collective's
    error) and raises RankFailed: exit status 1, no traceback."""
    global _failed
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as e:
        clean_exit = isinstance(e, SystemExit) and e.code in (0, None)
        _failed = _failed or not clean_exit
        if isinstance(e, RankFailed) or not info.enabled or clean_exit:
            raise
        _own_failure(info, e, show=True)
        raise
    except Exception as e:
        _failed = True
        if not info.enabled:
            raise
        if not _is_lost_peer(e):
            _own_failure(info, e, show=not isinstance(e, quiet))
            raise
        _hold_sigterm()  # torchrun's agent is stopping this rank too: say why first
        why = _published_failure(info, wait_s=1.0) or _gone_ranks(info) or (
            f"a collective timed out (dist_timeout_s): another rank stopped taking part ({_first_line(e)})"
            if "imed out" in str(e) else f"a collective failed ({_first_line(e)})")
        say(f"dash-fast: rank {info.rank} stops: {why}")
        raise RankFailed() from None


def say(line: str) -> None:
    """Write one line to stderr in a single write: ranks share torchrun's pipe, and print() writes the text
    and its newline separately, so two ranks' lines can land on one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _hold_sigterm() -> None:
    """Ignore SIGTERM from here on (the process is on its way out; the agent's SIGKILL still ends it)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _own_failure(info: DistInfo, e: BaseException, show: bool) -> None:
    _hold_sigterm()
    line = f"rank {info.rank} failed: {type(e).__name__}: {_first_line(e)}"
    _store_set(f"{_KEY}/failed", line, first=True)
    if show:
        say(f"dash-fast: {line}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _is_lost_peer(e: BaseException) -> bool:
    return isinstance(e, getattr(dist, "DistError", ())) or any(s in str(e) for s in _LOST_PEER)


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store() if dist.is_initialized() else None


def _store_set(key: str, value: str, first: bool = False) -> None:
    """Best effort: the store may be gone with the rank that hosted it (torchrun's agent hosts it)."""
    try:
        store = _store()
        if store is None:
            return
        if first:
            store.compare_set(key, "", value)  # the first failure wins
        else:
            store.set(key, value)
    except Exception:  # noqa: BLE001 - reporting a failure must not raise another
        pass


def _published_failure(info: DistInfo, wait_s: float) -> str | None:
    """Another rank's published failure, waiting up to `wait_s` for one to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            store = _store()
            if store is not None and store.check([f"{_KEY}/failed"]):
                line = store.get(f"{_KEY}/failed").decode()
                if line and not line.startswith(f"rank {info.rank} "):
                    return line
        except Exception:  # noqa: BLE001
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _gone_ranks(info: DistInfo) -> str | None:
    """Ranks on this host whose process is gone or a zombie, with the signal that ended it when /proc
    still shows it (a zombie's exit code, until torchrun's agent reaps it)."""
    found = []
    for rank in range(info.world_size):
        if rank == info.rank:
            continue
        try:
            host, pid = _store().get(f"{_KEY}/pid/{rank}").decode().split()
        except Exception:  # noqa: BLE001
            continue
        if host != socket.gethostname():
            continue
        state = _proc_state(int(pid))
        if state is None:
            found.append(f"rank {rank} (pid {pid}) is gone without a Python error (killed: a signal or the OOM killer)")
        elif state[0] == "Z":
            how = f"killed by signal {state[1] & 0x7F}" if state[1] & 0x7F else f"exited with status {state[1] >> 8}"
            found.append(f"rank {rank} (pid {pid}) {how}, without a Python error")
    return "; ".join(found) or None


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, wait status) of a process from /proc/PID/stat; None when it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[49]) if len(fields) > 49 else 0
