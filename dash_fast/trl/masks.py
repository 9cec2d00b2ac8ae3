"""TRL's GRPOTrainer helpers as plain functions: its two token/sequence masks and its per-token log-prob /
entropy forward (TRL 1.16 exposes them on GRPOTrainer).

Training applies the same masks inside losses.trl_token_loss (the entropy quantile there is over one
micro-batch on one rank, without the gather) and computes log-probs in the learner's own forward; these are
here so code that calls TRL's helpers directly keeps working.
"""

from __future__ import annotations

from typing import Any

import torch

from dash_fast.trl.config import refusal


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


def per_token_logps_and_entropies(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                                  temperature: float, batch_size: int | None = None, compute_entropy: bool = False,
                                  entropy_grad: bool = False, compute_aux_loss: bool = False, **multimodal: Any):
    """TRL's `_get_per_token_logps_and_entropies`: (logps, entropies, aux_loss=None) of the last `logits_to_keep`
    tokens under softmax(logits / temperature), 0 where attention_mask is 0; entropies when asked, with
    gradient only when `entropy_grad` (TRL: while the entropy bonus is on). TRL's vision-language inputs
    (`multimodal`, when not None) and the MoE aux loss are refused."""
    given = sorted(k for k, v in multimodal.items() if v is not None)
    if given:
        raise NotImplementedError(refusal(given[0], "...", "vision-language inputs are not supported"))
    if compute_aux_loss:
        raise NotImplementedError(refusal("compute_aux_loss", True, "the MoE load-balancing loss is not added"))
    batch_size = batch_size or input_ids.size(0)
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1).logits
        logits = logits[:, :-1].float() / temperature  # position t predicts token t + 1
        logp_all = torch.log_softmax(logits, dim=-1)
        keep = mask[:, -logits_to_keep:].to(logp_all.dtype)
        logps.append(logp_all.gather(-1, ids[:, -logits_to_keep:, None]).squeeze(-1) * keep)
        if compute_entropy:
            ent = -(logp_all.exp() * logp_all).sum(-1) * keep
            entropies.append(ent if entropy_grad else ent.detach())
    return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None
