"""TRL's behaviours that plug into the core's extension points (trainer.Extensions): prompts in dataset
order, the truncated-completion row mask, and multi-objective reward normalisation."""

from __future__ import annotations

import torch

from dash_fast.data.prompts import PromptSampler


class InOrderSampler(PromptSampler):
    """`shuffle_dataset=False`: every pass over the prompts in dataset order (resumable like PromptSampler)."""

    def _permutation(self) -> list[int]:
        return list(range(self.n))


def truncated_rows(rollout, stop_ids: tuple[int, ...], max_new: int) -> torch.Tensor:
    """[B] bool: completions that reached `max_new` tokens without a stop token."""
    lengths = rollout.completion_lengths
    last = rollout.completion_ids.gather(1, (lengths - 1).clamp(min=0).view(-1, 1)).view(-1)
    stopped = torch.tensor([t in stop_ids for t in last.tolist()], dtype=torch.bool)
    return (lengths >= max_new) & ~stopped


def normalize_then_sum(per_func: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """TRL's multi_objective_aggregation="normalize_then_sum": each reward normalised within its group
    ((f - mean_g) / (std_g + 1e-4), None rows skipped), then the weighted sum; rows where every reward is
    None give 0 (TRL: no learning signal)."""
    grouped = per_func.view(-1, group_size, per_func.shape[1])
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    valid = (~grouped.isnan()).sum(dim=1, keepdim=True)
    var = torch.nansum((grouped - mean) ** 2, dim=1, keepdim=True) / (valid - 1).clamp(min=1)
    std = var.sqrt() if group_size > 1 else torch.zeros_like(mean)
    normed = ((grouped - mean) / (std + 1e-4)).view(-1, per_func.shape[1])
    return torch.nansum(normed * weights.to(normed.dtype), dim=1)
