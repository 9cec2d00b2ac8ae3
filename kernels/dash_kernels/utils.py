"""Shared pieces of the policy-gradient ops: argument checks, backend choice, token filter, the per-token PG
formula (`pg_token_loss`, written once) and its closed-form gradient, NVTX."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

BACKENDS = ("auto", "torch", "triton")


def check_inputs(op: str, hidden: torch.Tensor, weight: torch.Tensor, beta: float = 0.0,
                 **per_token: torch.Tensor | None) -> None:
    """The contract's argument checks (docs/design.md section 3), shared by every op: beta > 0 needs ref_logp,
    hidden is [N, H] and weight [V, H], and each per-token tensor given (None: not passed) is [N]."""
    if beta != 0.0 and per_token.get("ref_logp") is None:
        raise ValueError(f"{op}: beta > 0 needs ref_logp (the reference policy's log-probs)")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    n = hidden.shape[0]
    for name, t in per_token.items():
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` picks Triton on CUDA and the chunked torch path everywhere else."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


@contextmanager
def nvtx_range(name: str, enabled: bool | None = None):
    """The project's one NVTX helper (dash_fast.runtime.profiling exports it): an NVTX range when `enabled`
    (default: CUDA is present; the ops pass whether their inputs are on CUDA), for nsys timelines, and a
    torch.profiler label while a torch.profiler trace records (`--trace`), so CPU traces carry the same names.
    Both cost microseconds, against ops of milliseconds; without CUDA and a trace, one check each."""
    if enabled is None:
        enabled = torch.cuda.is_available()
    with torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else nullcontext():
        if enabled:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if enabled:
                torch.cuda.nvtx.range_pop()


def kernel_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(hidden, weight, bias) in one dtype for the Triton kernels: the autocast dtype when CUDA autocast is
    on, else the narrower of hidden's and weight's (bf16 hidden states from an fp32 lm_head: master
    weights). Same dtype already: returned as they are (no copy)."""
    dt = hidden.dtype
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
    elif weight.dtype != dt and weight.dtype.is_floating_point:
        dt = min(dt, weight.dtype, key=lambda d: torch.finfo(d).bits)
    cast = (lambda t: t if t is None or t.dtype == dt else t.to(dt))
    return cast(hidden), cast(weight), cast(bias)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (tests); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_index(advantages: torch.Tensor, token_weights: torch.Tensor, tau: float | None) -> torch.Tensor:
    """Indices of tokens that take part: weight != 0 and |A| > tau (compared in A's own dtype)."""
    keep = token_weights != 0
    if tau is not None:
        keep &= advantages.abs() > torch.tensor(tau, dtype=advantages.dtype, device=advantages.device)
    return keep.nonzero().squeeze(1)


def pg_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token clipped surrogate + beta * k3 KL (docs/design.md section 3): the one definition, used by the
    naive reference (autograd), the chunked and Triton paths (`pg_token_terms`) and the trainer's tests.
    Returns (loss_t, clip_active_t, kl_t or None).

    old_logp None means on-policy: the ratio is exp(logp - logp.detach()) = 1 in value, grad log p.
    """
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    clip_active = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, clip_active, kl


def pg_token_terms(
    logp: torch.Tensor,
    adv: torch.Tensor,
    weight: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Weighted per-token loss (`pg_token_loss`), g = dloss/dlogp, clip flags and k3 KL, on kept tokens.

    The gradient is written in closed form (rather than autograd) so that the fused ops can fold
    it into the softmax tile: d surr / d logp = -A * rho unless the clip is active, then 0; the KL adds
    beta * (1 - exp(ref - logp)). On-policy (old_logp None) rho is 1 and never clipped.
    """
    loss, clipped, kl = pg_token_loss(logp, adv, old_logp, ref_logp, eps_low, eps_high, beta)
    if old_logp is None:
        g = -adv
    else:
        g = torch.where(clipped, torch.zeros_like(logp), -adv * torch.exp(logp - old_logp))
    if beta != 0.0:
        g = g + beta * (1 - torch.exp(ref_logp - logp))
    return weight * loss, weight * g, clipped, kl
