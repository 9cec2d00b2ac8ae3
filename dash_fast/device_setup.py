"""Device-dependent defaults and settings the trainer applies at start-up (DESIGN.md section 2).

- `resolve_dtype`: dtype="auto" is bfloat16 on CUDA (tensor-core dots in the Triton kernels and the
  decoder) and float32 elsewhere (CPU has no fast bf16 GEMM here, and the CPU tests compare in fp32).
- `make_deterministic`: the CUDA settings behind `deterministic=True` (the loss side is triton_bwd=dense,
  enforced by the config).
- `prepare_engine`: reserve the embedded engine's cache once and capture its CUDA graphs on the main
  thread, before a sampler runs in a worker thread (overlap=True).
"""

from __future__ import annotations

import os

import torch


def resolve_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" else "float32"


def make_deterministic(device: torch.device) -> list[str]:
    """Deterministic kernels for the ops that have them on CUDA; returns what was set. CPU: nothing to set
    (its kernels are run-to-run deterministic at a fixed thread count). warn_only: an op without a
    deterministic CUDA kernel warns (naming itself) instead of stopping a run."""
    if device.type != "cuda":
        return []
    # cuBLAS picks reduction splits per workspace: a fixed workspace makes GEMMs reproducible. It only
    # takes effect if set before the first cuBLAS handle is created (the trainer calls this first).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return ["CUBLAS_WORKSPACE_CONFIG", "use_deterministic_algorithms(warn_only)", "cudnn.deterministic"]


def prepare_engine(engine, rows: int, prompt_tokens: int, completion_tokens: int) -> list[int]:
    """Reserve the cache for `rows` rows of prompt + completion tokens and capture every CUDA-graph bucket,
    here on the main thread (engines without `prepare`, e.g. vLLM: nothing to do). Returns the buckets."""
    prepare = getattr(engine, "prepare", None)
    return prepare(rows, prompt_tokens + completion_tokens) if prepare is not None else []
