"""`liger_pg_loss`: DESIGN.md section 3's contract on top of Liger's LigerFusedLinearGRPOLoss.

For the trainer's `loss_impl=liger` and for benchmarks. Each kept token is a length-1 "sequence"
(Liger takes one advantage per row). With beta = 0 the token weight is folded into the advantage
(exact: min(rho * wA, clip(rho) * wA) = w * min(...) for w > 0); with beta > 0 Liger weights the KL
term uniformly, so the kept weights must all be equal.
"""

from __future__ import annotations

import torch

from .fused_logprob import fused_logprobs
from .utils import kept_index


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
    compiled: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    if beta != 0.0 and ref_logp is None:
        raise ValueError("liger_pg_loss: beta > 0 needs ref_logp")
    idx = kept_index(advantages, token_weights, tau)
    k = idx.numel()
    w = token_weights[idx].float()
    if bool((w < 0).any()):
        raise ValueError("liger_pg_loss: token weights must be >= 0")
    adv = advantages[idx].float()
    scale = 1.0
    if beta == 0.0:
        adv = adv * w
    else:
        if k and not bool((w == w[0]).all()):
            raise NotImplementedError("liger_pg_loss with beta > 0 needs equal token weights on kept tokens")
        scale = w[0] if k else 0.0
    if k == 0:
        loss = (hidden.sum() + weight.sum()) * 0.0
        return loss, {"logp": torch.zeros(hidden.shape[0], device=hidden.device), "clip_fraction": 0.0,
                      "kl_mean": None, "entropy": None, "kept_tokens": 0}
    fn = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=compiled, use_ref_model=beta != 0.0, chunk_size=chunk_size, epsilon_low=eps_low,
        epsilon_high=eps_high, loss_type="dapo", temperature=temperature,
    )
    loss, metrics = fn(
        hidden[idx].unsqueeze(1), weight, targets[idx].unsqueeze(1),
        torch.ones(k, 1, device=hidden.device), adv, bias=bias,
        ref_per_token_logps=None if beta == 0.0 else ref_logp[idx].float().unsqueeze(1),
        old_per_token_logps=None if old_logp is None else old_logp[idx].float().unsqueeze(1),
        num_items_in_batch=1,
    )
    loss = loss * scale
    with torch.no_grad():  # Liger does not return per-token log-probs: one extra no-grad pass
        out = fused_logprobs(hidden[idx].detach(), weight.detach(), None if bias is None else bias.detach(),
                             targets[idx], temperature=temperature, backend=backend,
                             return_entropy=return_entropy)
    logp_k, ent_k = out if return_entropy else (out, None)
    n = hidden.shape[0]
    logp = torch.zeros(n, dtype=logp_k.dtype, device=hidden.device).index_copy_(0, idx, logp_k)
    entropy = None
    if ent_k is not None:
        entropy = torch.zeros(n, dtype=ent_k.dtype, device=hidden.device).index_copy_(0, idx, ent_k)
    # Liger's metrics are already means over its attention mask (the kept tokens).
    return loss, {"logp": logp, "clip_fraction": metrics[-1], "kl_mean": metrics[0] if beta != 0.0 else None,
                  "entropy": entropy, "kept_tokens": k}
