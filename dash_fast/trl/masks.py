"""TRL's two token/sequence masks as plain functions (TRL 1.16 exposes them on GRPOTrainer).

Training applies the same masks inside trl_losses.trl_token_loss (the entropy quantile there is over one
micro-batch on one rank, without the gather); these are here so code that calls TRL's helpers directly
keeps working.
"""

from __future__ import annotations

import torch


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """True on real tokens whose entropy is >= the `quantile` of all real tokens' entropies (over every
    rank under torch.distributed); padding is always False."""
    real = entropies[mask.bool()].float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, real.cpu())
        real = torch.cat(parts).to(entropies.device)
    if real.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(real, quantile)
    return (entropies * mask.float() >= threshold) & mask.bool()


def off_policy_mask(advantages: torch.Tensor, per_token_logps: torch.Tensor,
                    sampling_per_token_logps: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, 1]: 0 for sequences with a negative advantage whose mean KL(sampler || policy) over real tokens
    exceeds `threshold` (DeepSeek-V3.2's off-policy sequence mask), else 1. Unscored (nan) tokens add 0."""
    kl = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)
