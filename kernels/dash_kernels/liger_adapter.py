"""`liger_pg_loss`: docs/design.md section 3's contract on top of Liger's LigerFusedLinearGRPOLoss.

For the trainer's `loss_impl=liger` and for comparisons. Each kept token is a length-1 "sequence"
(Liger takes one advantage per row) and `num_items_in_batch=1` makes Liger's "dapo" normaliser 1, so
its loss is a plain sum over tokens. With beta = 0 the token weight is folded into the advantage
(exact: min(rho * wA, clip(rho) * wA) = w * min(rho * A, clip(rho) * A) for w >= 0). With beta > 0
Liger weights the KL term uniformly, so tokens are grouped by weight and each group is one Liger
call scaled by its weight (one call for token-mean and dr_grpo, one per distinct row length for
seq-mean-token-mean).
"""

from __future__ import annotations

import torch

from .fused_logprob import fused_logprobs
from .utils import check_inputs, compute_dtype, kept_index


def liger_pg_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    tau: float | None = None,
    return_entropy: bool = False,
    chunk_size: int = 256,
    compiled: bool | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """Same arguments and result as `fused_linear_pg_loss`. `compiled=None` compiles Liger's loss math
    on CUDA only: on CPU every new micro-batch shape would cost a torch.compile run."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    check_inputs("liger_pg_loss", hidden, weight, beta, targets=targets, advantages=advantages,
                 token_weights=token_weights, old_logp=old_logp, ref_logp=ref_logp)
    n, dev = hidden.shape[0], hidden.device
    cdt = compute_dtype(hidden.dtype)
    idx = kept_index(advantages, token_weights, tau)
    k = idx.numel()
    w = token_weights[idx].to(cdt)
    if bool((w < 0).any()):
        raise ValueError("liger_pg_loss: token weights must be >= 0")
    adv = advantages[idx].to(cdt)
    if k == 0:
        groups = []
    elif beta == 0.0:  # exact fold, a single call
        groups = [(torch.arange(k, device=dev), 1.0)]
        adv = adv * w
    else:
        values, inverse = torch.unique(w, return_inverse=True)
        groups = [((inverse == i).nonzero().squeeze(1), values[i]) for i in range(values.numel())]
    fn = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=hidden.is_cuda if compiled is None else compiled, use_ref_model=beta != 0.0,
        chunk_size=chunk_size, epsilon_low=eps_low, epsilon_high=eps_high, loss_type="dapo",
        temperature=temperature,
    )
    loss = sum(t[:0].sum() for t in (hidden, weight, bias) if t is not None)  # 0 on the graph: zero grads
    clipped = kl_sum = torch.zeros((), dtype=torch.float32, device=dev)
    for sel, scale in groups:
        rows = idx[sel]
        m = rows.numel()
        g_loss, metrics = fn(
            hidden[rows].unsqueeze(1), weight, targets[rows].unsqueeze(1),
            torch.ones(m, 1, dtype=cdt, device=dev), adv[sel], bias=bias,
            ref_per_token_logps=None if beta == 0.0 else ref_logp[rows].to(cdt).unsqueeze(1),
            old_per_token_logps=None if old_logp is None else old_logp[rows].to(cdt).unsqueeze(1),
            num_items_in_batch=1,  # normaliser 1: the token weights carry the aggregation
        )
        loss = loss + g_loss * scale
        # Liger's metrics are means over its mask (the group's tokens): back to counts.
        clipped = clipped + metrics[-1].detach().float() * m
        if beta != 0.0:
            kl_sum = kl_sum + metrics[0].detach().float() * m
    with torch.no_grad():  # Liger returns no per-token log-probs: one extra no-grad pass
        out = fused_logprobs(hidden[idx].detach(), weight.detach(), None if bias is None else bias.detach(),
                             targets[idx], temperature=temperature, backend=backend,
                             return_entropy=return_entropy)
    logp_k, ent_k = out if return_entropy else (out, None)
    logp = torch.zeros(n, dtype=logp_k.dtype, device=dev).index_copy_(0, idx, logp_k)
    entropy = None
    if ent_k is not None:
        entropy = torch.zeros(n, dtype=ent_k.dtype, device=dev).index_copy_(0, idx, ent_k)
    denom = max(k, 1)
    return loss, {"logp": logp, "clip_fraction": clipped / denom, "kl_mean": kl_sum / denom if beta != 0.0 else None,
                  "entropy": entropy, "kept_tokens": k}
