"""Atomic checkpoints and exact resume.

A checkpoint is written into `<dir>.tmp-<pid>`, fsynced, then renamed to `checkpoints/step-N`: a crash
leaves either the old set of checkpoints or the new one, never a half-written `step-N`. Beside the HF
model (for a PeftModel: its adapters, in PEFT format) and tokenizer it holds trainer_state.pt: optimizer, scheduler, prompt sampler, RNG streams, the
learner's counters, the logs, and the rollout sampled ahead with overlap=True (`pending_rollout_state`).
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from dash_fast import distributed as ddp
from dash_fast.overlap import OverlapScheduler, Prefetched

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    checkpoints_dir: str,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    trainer_state: dict,
    keep_last: int | None = None,
    state_dict: dict | None = None,
) -> str:
    """Write checkpoints/step-N atomically: HF model + tokenizer + trainer_state.pt (optimizer, RNG, ...).

    `state_dict` overrides the model's own (FSDP2 passes the gathered full weights)."""
    os.makedirs(checkpoints_dir, exist_ok=True)
    final = os.path.join(checkpoints_dir, f"step-{step}")
    for name in os.listdir(checkpoints_dir):  # leftovers of saves or deletions a kill interrupted
        if name.startswith("."):
            shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)
    tmp = os.path.join(checkpoints_dir, f".step-{step}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    _fsync_tree(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
        _remove(final)
    os.replace(tmp, final)
    _fsync_tree(checkpoints_dir)
    if keep_last:
        for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
            _remove(old)
    return final


def _remove(path: str) -> None:
    """Rename out of sight first, so a kill mid-delete never leaves a half-deleted step-N."""
    hidden = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(checkpoints_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (temp dirs of interrupted saves are ignored)."""
    if not os.path.isdir(checkpoints_dir):
        return []
    found = []
    for name in os.listdir(checkpoints_dir):
        m = STEP_DIR.match(name)
        path = os.path.join(checkpoints_dir, name)
        if m and os.path.exists(os.path.join(path, "trainer_state.pt")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: str) -> str | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)


def load_weights(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp_root=None) -> dict:
    """Load a checkpoint's weights and optimizer state into `model` / `optimizer` (gathered into FSDP2's
    shards under `fsdp_root`); returns its trainer state for the caller to restore the rest."""
    from transformers import AutoModelForCausalLM

    from dash_fast.peft_support import is_peft_model, load_adapter_weights

    state = load_trainer_state(path)
    if is_peft_model(model):  # the checkpoint holds the adapters (PEFT format); the base is the model's own
        load_adapter_weights(path, model)
        optimizer.load_state_dict(state["optimizer"])  # built over the trainable (adapter) parameters only
        return state
    saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
    if fsdp_root is None:
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(state["optimizer"])
    else:
        ddp.load_full_state(fsdp_root, optimizer, saved.state_dict(), state["optimizer"])
    return state


def pending_rollout_state(overlap: OverlapScheduler | None, distributed: bool) -> dict:
    """A rollout sampled ahead is saved with the state in one process; under torchrun (rank 0 saves)
    it is undone instead: the saved sampler position is the one before its prompts (overlap.py)."""
    job = overlap.pending if overlap is not None else None
    if job is None:
        return {}
    overlap.wait()
    return {"sampler": job.sampler_before} if distributed else {"pending_rollout": job.state_dict()}


def restore_pending_rollout(state: dict, overlap: OverlapScheduler | None, sampler) -> None:
    """Put a saved rollout sampled ahead back in the scheduler; resumed with overlap=False, give its
    prompts back to the sampler instead (they are re-sampled on-policy)."""
    pending = state.get("pending_rollout")
    if pending is not None and overlap is not None:
        overlap.pending = Prefetched.from_state_dict(pending)
    elif pending is not None:
        sampler.load_state_dict(pending["sampler_before"])
