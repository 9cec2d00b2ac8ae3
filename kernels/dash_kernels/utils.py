"""Shared pieces of the policy-gradient ops: argument checks, backend choice, token filter, the per-token PG
formula (`pg_token_loss`, written once) and its closed-form gradient, the sampler importance-sampling ratio
(`sampler_is_ratio`, TRL's vLLM correction, written once), NVTX."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch

BACKENDS = ("auto", "torch", "triton")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # TRL's vllm_importance_sampling_mode


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


def check_is_mode(mode: str, sampler_logp: torch.Tensor | None, row_ids: torch.Tensor | None) -> None:
    """The importance-sampling arguments: a known mode, and row_ids for the sequence modes."""
    if mode not in IS_MODES:
        raise ValueError(f"is_mode must be one of {IS_MODES}, got {mode!r}")
    if sampler_logp is not None and mode.startswith("sequence") and row_ids is None:
        raise ValueError(f"is_mode={mode!r} needs row_ids (the row of each token)")


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


def sampler_is_ratio(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mode: str = "token_truncate",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
    row_ids: torch.Tensor | None = None,
    n_rows: int | None = None,
) -> torch.Tensor:
    """TRL's vLLM importance-sampling correction (GRPOTrainer._generate_and_score_completions), per token:
    the detached ratio of the trainer's log-prob of a sampled token to the sampler's, which multiplies that
    token's policy-gradient term (not the KL term).

    d_t = trainer_t - sampler_t (NaN, a token the sampler could not score: 0, ratio 1). token_* modes:
    r_t = exp(d_t); sequence_* modes: r_t = exp(sum of d over the token's row) (`row_ids` [N]: the row of
    each token, 0-based, < `n_rows`; None: < N, as when each row has a token here). *_truncate: clamp(r, clip_min, clip_max); *_mask: r where clip_min <= r <= clip_max,
    else 0 (a bound that is None is open). Flat [N] tensors; returns [N] in trainer_logp's dtype, no grad."""
    if mode not in IS_MODES:
        raise ValueError(f"importance-sampling mode must be one of {IS_MODES}, got {mode!r}")
    diff = torch.nan_to_num(trainer_logp.detach() - sampler_logp.to(trainer_logp.dtype), nan=0.0)
    if mode.startswith("sequence"):
        if row_ids is None:
            raise ValueError(f"importance-sampling mode {mode!r} needs row_ids (the row of each token)")
        # a bound on the rows (not row_ids.max(), which would sync the device)
        size = diff.numel() if n_rows is None else n_rows
        sums = torch.zeros(size, dtype=diff.dtype, device=diff.device).index_add_(0, row_ids, diff)
        diff = sums[row_ids]
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def pg_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
    is_ratio: torch.Tensor | None = None,
    kl_correction: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token clipped surrogate x sampler IS ratio + beta * k3 KL (x the PPO ratio when `kl_correction`)
    (docs/design.md section 3): the one definition, used by the naive reference (autograd), the chunked and
    Triton paths (`pg_token_terms`) and the trainer's tests. Returns (loss_t, clip_active_t, kl_t or None);
    kl_t is the term beta multiplies (bias-corrected when asked, as TRL logs it).

    old_logp None means on-policy: the ratio is exp(logp - logp.detach()) = 1 in value, grad log p.
    `is_ratio` (`sampler_is_ratio`, detached) multiplies the surrogate only, as in TRL. `kl_correction` is
    TRL's use_bias_correction_kl at token level: kl_t x exp(logp - old), the ratio differentiable.
    """
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if is_ratio is not None:
        loss = loss * is_ratio
    clip_active = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        if kl_correction:
            kl = kl * ratio
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
    is_ratio: torch.Tensor | None = None,
    kl_correction: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Weighted per-token loss (`pg_token_loss`), g = dloss/dlogp, clip flags and k3 KL, on kept tokens.

    The gradient is written in closed form (rather than autograd) so that the fused ops can fold
    it into the softmax tile: d surr / d logp = -A * rho unless the clip is active, then 0, times the
    (constant) sampler IS ratio; the KL adds beta * (1 - exp(ref - logp)), or with `kl_correction`
    beta * rho * (kl + 1 - exp(ref - logp)) (d(rho kl) = rho kl + rho dkl). On-policy (old_logp None)
    rho is 1 and never clipped.
    """
    loss, clipped, kl = pg_token_loss(logp, adv, old_logp, ref_logp, eps_low, eps_high, beta, is_ratio,
                                      kl_correction)
    rho = None if old_logp is None else torch.exp(logp - old_logp)
    if rho is None:
        g = -adv
    else:
        g = torch.where(clipped, torch.zeros_like(logp), -adv * rho)
    if is_ratio is not None:
        g = g * is_ratio
    if beta != 0.0:
        dkl = 1 - torch.exp(ref_logp - logp)
        if kl_correction:  # kl here is already rho x k3
            dkl = kl + dkl if rho is None else kl + rho * dkl
        g = g + beta * dkl
    return weight * loss, weight * g, clipped, kl
