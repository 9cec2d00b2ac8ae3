"""Data parallelism under torchrun: DDP-style gradient all-reduce (gloo on CPU, NCCL on GPU) and FSDP2.

Each rank samples its contiguous share of the step's prompts. Rewards and completion lengths are
all-gathered (a few floats per row), so every rank computes the same advantages, the same filter and
the same global loss normaliser; each rank's loss is then its share of one global sum, and gradients
are summed (not averaged) across ranks. The result equals one process on the whole rollout.

Without torchrun (no WORLD_SIZE > 1 in the environment) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
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


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the torchrun process group (gloo for CPU, NCCL for CUDA) if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


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
