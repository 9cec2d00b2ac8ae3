"""fused_linear_pg_loss: lm_head projection + log-prob + clipped PPO/GRPO surrogate (+ sampler IS ratio, k3 KL
(optionally TRL's bias-corrected one), entropy).

The N x V logits are never materialised, and tokens that DASH filters out (|A| <= tau) or that
carry no weight are compacted away before any FLOP is spent on them. See docs/design.md section 3.

Backends:
- "torch": chunked over kept tokens (CPU default). If a gradient will be needed it is computed
  inside the forward from the same logits chunk (3 matmuls per token, not 4) and only scaled by
  grad_output in backward.
- "triton": forward kernel (online log-sum-exp); the backward recomputes the softmax tile by tile,
  skipping tokens whose g = 0 (clip active, beta = 0). `bwd` picks how the grads are formed:
  "dense" (default: dZ per token chunk, then dZ @ W and dZ^T @ H as dense GEMMs; no atomics, so
  deterministic, cost 8NHV in all) or "atomic" (one kernel, fp32 atomics; order-dependent sums).
  Mixed inputs (autocast: bf16 hidden, fp32 lm_head) run the kernels in the narrower dtype; the
  grads come back in each input's own dtype.
"""

from __future__ import annotations

import torch

from .torch_ref import chunk_length, chunked_pg, row_chunks
from .utils import (
    check_inputs,
    check_is_mode,
    compute_dtype,
    kept_index,
    kernel_inputs,
    nvtx_range,
    pg_token_terms,
    resolve_backend,
    sampler_is_ratio,
)


class _FusedLinearPGLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, advantages, token_weights, old_logp, ref_logp, sampler_logp,
                row_ids, idx, grad_weight_into, cfg):
        n = hidden.shape[0]
        cdt = compute_dtype(hidden.dtype)
        dev = hidden.device
        (backend, temperature, eps_low, eps_high, beta, return_entropy, chunk_size, grad_mode, bwd, is_mode,
         is_clip_min, is_clip_max, kl_correction) = cfg
        # needs_input_grad ignores no_grad(): without the caller's grad mode an eval forward would
        # pay for a gradient nobody asks for.
        need_gh, need_gw, need_gb = (grad_mode and x for x in ctx.needs_input_grad[:3])
        need_grad = need_gh or need_gw or need_gb

        k = idx.numel()
        all_kept = k == n
        # Kept-token views of the per-token inputs; dropped tokens (and any NaN they carry) are gone.
        pick = (lambda t: t) if all_kept else (lambda t: t.index_select(0, idx))
        adv_k = pick(advantages).to(cdt)
        w_k = pick(token_weights).to(cdt)
        old_k = None if old_logp is None else pick(old_logp).to(cdt)
        ref_k = None if ref_logp is None else pick(ref_logp).to(cdt)
        tgt_k = pick(targets)
        samp_k = None if sampler_logp is None else pick(sampler_logp).to(cdt)
        rows_k = None if row_ids is None else pick(row_ids)

        loss_k = torch.empty(k, dtype=cdt, device=dev)
        clip_k = torch.empty(k, dtype=torch.bool, device=dev)
        kl_k = torch.empty(k, dtype=cdt, device=dev) if beta != 0.0 else None
        g_k = torch.empty(k, dtype=cdt, device=dev)
        # Sampler IS ratio (TRL's vLLM correction): from the old log-probs when given, else from the log-probs
        # this forward computes (the trainer's, detached). Token modes are per token, so the chunked path
        # forms it chunk by chunk inside g_fn; sequence modes need whole rows first (`is_ready`).
        is_k = None if samp_k is None else torch.empty(k, dtype=cdt, device=dev)
        is_ready = False

        def is_ratio(trainer_logp: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
            return sampler_is_ratio(trainer_logp, samp_k[sl], is_mode, is_clip_min, is_clip_max,
                                    None if rows_k is None else rows_k[sl], n_rows=n)  # row ids < N

        if old_k is not None and samp_k is not None:
            is_k, is_ready = is_ratio(old_k), True

        def g_fn(s: int, e: int, logp_c: torch.Tensor) -> torch.Tensor:
            sl = slice(s, e)
            is_c = None
            if is_k is not None:
                if not is_ready:  # token modes, or sequence modes over chunks of whole rows (row_chunks)
                    is_k[sl] = is_ratio(logp_c, sl)
                is_c = is_k[sl]
            loss_c, g_c, clip_c, kl_c = pg_token_terms(
                logp_c, adv_k[sl], w_k[sl], None if old_k is None else old_k[sl],
                None if ref_k is None else ref_k[sl], eps_low, eps_high, beta, is_c, kl_correction,
            )
            loss_k[sl], clip_k[sl], g_k[sl] = loss_c, clip_c, g_c
            if kl_k is not None:
                kl_k[sl] = kl_c
            return g_c

        ctx.backend = backend
        ctx.weight_grad_added = False
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        seq_pending = is_k is not None and not is_ready and is_mode.startswith("sequence")
        if backend == "torch":
            h_k = hidden if all_kept else hidden.index_select(0, idx)
            bounds = None
            if seq_pending and need_grad:  # a row's ratio needs the row's log-probs before its gradient
                bounds = row_chunks(rows_k, chunk_length(k, weight.shape[0], cdt, chunk_size))
                if bounds is None:  # rows that no chunk holds whole: every log-prob first, one extra lm_head pass
                    pre = chunked_pg(h_k, weight, bias, tgt_k, None, temperature=temperature, chunk_size=chunk_size)
                    is_k, is_ready = is_ratio(pre["logp"]), True
            into = None
            if need_gw and grad_weight_into is not None and grad_weight_into.dtype == cdt \
                    and grad_weight_into.device == dev and type(grad_weight_into) is torch.Tensor:
                into, ctx.weight_grad_added = grad_weight_into, True
            out = chunked_pg(
                h_k, weight, bias, tgt_k, g_fn, temperature=temperature,
                need_grad_hidden=need_gh, need_grad_weight=need_gw, need_grad_bias=need_gb,
                return_entropy=return_entropy, chunk_size=chunk_size, grad_weight_into=into, bounds=bounds,
            )
            logp_k, ent_k = out["logp"], out["entropy"]
            if not need_grad:
                if seq_pending:
                    is_k, is_ready = is_ratio(logp_k), True
                g_fn(0, k, logp_k)
            gh = out["grad_hidden"]
            if gh is not None and not all_kept:
                gh = torch.zeros(n, hidden.shape[1], dtype=cdt, device=dev).index_copy_(0, idx, gh)
            ctx.grads = [gh, None if ctx.weight_grad_added else out["grad_weight"], out["grad_bias"]]
        else:
            from .triton_kernels import triton_logprobs

            hidden, weight, bias = kernel_inputs(hidden, weight, bias)
            logp_k, lse_k, ent_k = triton_logprobs(
                hidden, weight, bias, targets, idx, temperature=temperature, return_entropy=return_entropy
            )
            if seq_pending:
                is_k, is_ready = is_ratio(logp_k), True
            g_fn(0, k, logp_k)
            if need_grad:
                nz = (g_k != 0).nonzero().squeeze(1)  # skip clipped (g == 0) tokens in backward too
                ctx.save_for_backward(hidden, weight, bias, targets, idx[nz], g_k[nz], lse_k[nz])
            ctx.temperature = temperature
            ctx.bwd = bwd

        logp = torch.zeros(n, dtype=cdt, device=dev)
        logp[idx] = logp_k
        loss = loss_k.sum()
        denom = max(k, 1)
        clip_fraction = clip_k.sum().to(cdt) / denom
        kl_mean = kl_k.sum() / denom if kl_k is not None else torch.empty(0, device=dev)
        if ent_k is not None:
            entropy = torch.zeros(n, dtype=cdt, device=dev)
            entropy[idx] = ent_k
        else:
            entropy = torch.empty(0, device=dev)
        if is_k is not None:
            ratio = torch.zeros(n, dtype=cdt, device=dev)
            ratio[idx] = is_k
        else:
            ratio = torch.empty(0, device=dev)
        ctx.mark_non_differentiable(logp, clip_fraction, kl_mean, entropy, ratio)
        return loss, logp, clip_fraction, kl_mean, entropy, ratio

    @staticmethod
    def backward(ctx, grad_loss, *_):
        with nvtx_range("dash_kernels/pg_loss_bwd", grad_loss.is_cuda):
            if ctx.backend == "torch":
                if ctx.grads is None:
                    raise RuntimeError("fused_linear_pg_loss (torch backend) supports one backward per forward")
                grads, ctx.grads = ctx.grads, None  # hand the buffers over so autograd can steal them
                if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
                    if ctx.weight_grad_added and grad_loss.item() != 1.0:  # already added, at a gradient of 1
                        raise RuntimeError("fused_linear_pg_loss with grad_weight_into: backward must start at the "
                                           "loss itself (gradient 1); scale the inputs, not the loss")
                    grads = [None if t is None else t.mul_(grad_loss) for t in grads]
            else:
                from .triton_kernels import triton_pg_backward

                hidden, weight, bias, targets, idx, g, lse = ctx.saved_tensors
                grads = triton_pg_backward(
                    hidden, weight, bias, targets, idx, g * grad_loss, lse, temperature=ctx.temperature,
                    need_grad_hidden=ctx.needs_input_grad[0], need_grad_weight=ctx.needs_input_grad[1],
                    need_grad_bias=ctx.needs_input_grad[2], bwd=ctx.bwd,
                )
            grads = [None if t is None else t.to(dt) for t, dt in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def fused_linear_pg_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    sampler_logp: torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    tau: float | None = None,
    backend: str = "auto",
    return_entropy: bool = False,
    chunk_size: int | None = None,
    bwd: str = "dense",
    is_mode: str = "token_truncate",
    is_clip_min: float | None = None,
    is_clip_max: float | None = 3.0,
    kl_correction: bool = False,
    grad_weight_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """loss = sum_t token_weights_t * (r_t * surr_t + beta * kl_t) over tokens with |A_t| > tau.

    hidden [N, H], weight [V, H] (may be a tied embedding), bias [V] | None, targets [N] int,
    advantages / token_weights / old_logp / ref_logp / sampler_logp [N], row_ids [N] int (< N). Returns (loss,
    stats) with stats `logp` [N] (valid on kept tokens), `clip_fraction`, `kl_mean` (None when beta = 0),
    `entropy` [N] (None unless return_entropy) and `is_ratio` [N] (r_t; None without sampler_logp). Loss is
    fp32 (fp64 for fp64 inputs). `bwd` ("dense" | "atomic") selects the Triton backward (module docstring);
    the torch backend ignores it.

    sampler_logp given: r_t = `sampler_is_ratio`(old_logp if given else this forward's log-probs, detached;
    sampler_logp; is_mode, is_clip_min, is_clip_max; row_ids), TRL's vLLM importance-sampling correction
    (r_t = 1 without it). Sequence modes need row_ids, and all of a row's tokens in the call; without
    old_logp the torch backend then runs one extra no-grad lm_head pass to have whole rows before the
    gradient. `kl_correction`: kl_t is TRL's bias-corrected k3, k3_t x exp(logp_t - old_t) (differentiable).

    `grad_weight_into` (gradient accumulation: the weight's existing `.grad`): the torch backend adds the
    weight's gradient into it during this forward, where its matmul runs anyway, and backward returns none for
    the weight. That saves a [V, H] buffer per call and the add into `.grad`. The caller must then run backward
    from this loss with gradient 1 (anything else raises) and must not drop the loss unbackwarded. Ignored (the
    gradient returned by backward as usual) by the Triton backend, without a weight gradient, or for a tensor of
    another dtype than the compute dtype.
    """
    check_inputs("fused_linear_pg_loss", hidden, weight, beta, targets=targets, advantages=advantages,
                 token_weights=token_weights, old_logp=old_logp, ref_logp=ref_logp, sampler_logp=sampler_logp,
                 row_ids=row_ids)
    resolved = resolve_backend(backend, hidden.device)
    if bwd not in ("dense", "atomic"):
        raise ValueError(f"bwd must be 'dense' or 'atomic', got {bwd!r}")
    check_is_mode(is_mode, sampler_logp, row_ids)
    cfg = (resolved, float(temperature), eps_low, eps_high, float(beta), return_entropy, chunk_size,
           torch.is_grad_enabled(), bwd, is_mode, is_clip_min, is_clip_max, bool(kl_correction))
    with nvtx_range("dash_kernels/pg_loss_fwd", hidden.is_cuda):
        idx = kept_index(advantages, token_weights, tau)  # in-kernel filtering: only these rows are touched
        loss, logp, clip_fraction, kl_mean, entropy, ratio = _FusedLinearPGLoss.apply(
            hidden, weight, bias, targets, advantages, token_weights, old_logp,
            ref_logp if beta != 0.0 else None, sampler_logp, row_ids, idx, grad_weight_into, cfg,
        )
    stats = {
        "logp": logp,
        "clip_fraction": clip_fraction,
        "kl_mean": kl_mean if beta != 0.0 else None,
        "entropy": entropy if return_entropy else None,
        "is_ratio": ratio if sampler_logp is not None else None,
        "kept_tokens": idx.numel(),
    }
    return loss, stats
