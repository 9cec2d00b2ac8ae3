"""Mixed precision: fp32 master weights with bf16 compute, what a bf16 run trains with.

Why: an AdamW step at a typical RL learning rate (3e-6) moves a weight by ~3e-6, far below bf16's spacing
near a typical weight (~1.2e-4 at 0.02); weights stored in bf16 would round almost every update away.

How (as TRL's `bf16=True`, i.e. torch autocast over fp32 parameters):
- the trainable parameters stay fp32: they are the optimizer's masters (AdamW state fp32, checkpoints and
  resume carry them, `trainer.model` holds them);
- the training forward (and the old / reference log-prob passes) runs under `torch.autocast(bf16)`; its
  hidden states go to the loss kernels in bf16 with the fp32 lm_head (the kernels' mixed-input path);
- the sampler reads a bf16 copy of the model (`sampler_model`), refreshed in place after each optimizer
  step (same storages: CUDA graphs, a worker thread or a sampler process keep reading them).

Cost against training the bf16 weights in place: fp32 weights + grads + AdamW state (16 bytes per
parameter instead of 8) plus the sampler's bf16 copy (2 bytes per parameter), and one fp32 -> bf16 copy of
the weights per optimizer step. PEFT models get no copy: only their adapters train (in fp32), the frozen
base keeps its dtype and the sampler runs the model's own forward.
"""

from __future__ import annotations

import contextlib
import copy

import torch


def copy_unread_while_updating(device_type: str, engine: str, overlap: bool) -> bool:
    """Whether nothing reads a bf16 run's sampler copy while the learner updates, so that its memory can be
    freed then (`MixedPrecision(release_in_update=...)`): the in-process torch engine on CPU without overlap
    (CUDA graphs, vLLM's push and a sampler process hold its storages or read it meanwhile)."""
    return device_type == "cpu" and engine == "torch" and not overlap


def is_bf16_run(dtype: str, model: torch.nn.Module | None = None) -> bool:
    """Whether a run computes in bf16: `dtype` (resolved) is bfloat16, or the model passed in holds bf16
    weights (a TRL script's bf16 module)."""
    if dtype == "bfloat16":
        return True
    return model is not None and any(p.dtype == torch.bfloat16 for p in model.parameters())


def to_masters(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its trainable floating parameters in fp32 (in place, as `Module.to`): the whole model
    for a full fine-tune; a PEFT model's adapters only (its frozen base keeps its dtype)."""
    from dash_fast.models.peft import is_peft_model

    if is_peft_model(model):
        from peft.utils import cast_mixed_precision_params

        frozen = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()),
                      torch.bfloat16)
        cast_mixed_precision_params(model, frozen)  # trainable -> fp32, frozen -> their dtype
        return model
    return model.to(torch.float32)


def compute_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen eval-mode copy of `model` with its floating parameters in `dtype`; buffers (RoPE's
    inv_freq) keep theirs, as a model loaded in `dtype` has them. Tied parameters stay tied."""
    clone = copy.deepcopy(model).requires_grad_(False).eval()
    for p in clone.parameters():  # each parameter object once (a tied head is the embedding's object)
        if p.is_floating_point():
            p.data = p.data.to(dtype)  # the clone is ours: keeps object identity, so ties stay
    return clone


class MixedPrecision:
    """The precision policy of a run: `autocast()` around forwards, `compute(hidden)` for the loss kernels'
    activations, `sampler_model` for the engine and `refresh()` after each optimizer step.

    `dtype=None`: off (fp32 runs, or bf16 weights trained in place): autocast is a no-op, the sampler reads
    the model itself. `sampler_copy=False`: the sampler reads the model (PEFT, FSDP2).

    `release_in_update=True`: the copy's memory is freed while the learner updates (`release`, called at the
    update's start) and allocated again by the `refresh` after the optimizer step, so it does not add to the
    update phase's peak (fp32 gradients and activations). Only where nothing reads the copy during the update:
    the in-process sampler without overlap on CPU (CUDA graphs and a sampler process hold its storages)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None,
                 sampler_copy: bool = True, release_in_update: bool = False) -> None:
        self.dtype, self.device_type = dtype, device.type
        self.sampler_model = model
        self._src: list[torch.Tensor] = []
        self._dst: list[torch.Tensor] = []
        if dtype is not None and sampler_copy:
            self.sampler_model = compute_copy(model, dtype)
            self._src = list(model.parameters())  # deepcopy keeps the order: pairs match one to one
            self._dst = list(self.sampler_model.parameters())
        self._bytes = [t.untyped_storage().nbytes() for t in self._dst] if release_in_update else []
        self.released = False

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        """torch.autocast in the compute dtype on the model's device (a no-op context when off)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def compute(self, hidden: torch.Tensor) -> torch.Tensor:
        """Activations in the compute dtype for the loss kernels (which take an fp32 head beside them)."""
        return hidden if self.dtype is None or hidden.dtype == self.dtype else hidden.to(self.dtype)

    def release(self) -> None:
        """Free the sampler copy's memory until the next `refresh` (a no-op unless `release_in_update`). Its
        tensors stay (the engine's modules hold them), over empty storages."""
        for t in self._dst if self._bytes else []:
            t.untyped_storage().resize_(0)
        self.released = bool(self._bytes)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the masters into the sampler's copy, in place (rounding to the compute dtype); a released
        copy gets its memory back first."""
        if self.released:
            for t, n in zip(self._dst, self._bytes):
                t.untyped_storage().resize_(n)
            self.released = False
        if self._dst:
            torch._foreach_copy_(self._dst, self._src)
