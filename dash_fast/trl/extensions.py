"""TRL's behaviours that plug into the core's extension points (trainer.Extensions): prompts in dataset
order, the truncated-completion row mask, multi-objective reward normalisation, and TRL's loss variants
and entropy bonus by name from the loss registry (`trl_extensions` declares them all)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from dash_fast.config import DashConfig
from dash_fast.data.prompts import PromptDataset, PromptSampler
from dash_fast.losses import EntropyBonus
from dash_fast.trainer import Extensions
from dash_fast.trl.config import GRPOConfig, refusal


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


def trl_extensions(args: GRPOConfig | DashConfig, config: DashConfig, prompts: Callable | None,
                   reward_post: Callable, row_mask: Callable) -> Extensions:
    """How a GRPOTrainer run differs from the core's (trainer.Extensions): `prompts` (a streamed train set's
    source, or None) else with shuffle_dataset=False TRL's dataset order, `reward_post` (TRL's metrics,
    normalize_then_sum), `row_mask` with mask_truncated_completions, and TRL's loss variants with the entropy
    bonus by name from the loss registry. `args` a DashConfig: only `prompts` and `reward_post`."""
    if not isinstance(args, GRPOConfig):
        return Extensions(prompts=prompts, reward_post=reward_post)
    seed = config.seed if config.data_seed is None else config.data_seed

    def in_order(data: PromptDataset):
        """shuffle_dataset=False: TRL draws the prompts in dataset order."""
        return data, PromptSampler(len(data), seed, shuffle=False)

    spec = args.trl_loss()
    variant = spec.is_variant()  # TRL objectives beyond the kernels'
    return Extensions(
        prompts=prompts or (None if args.shuffle_dataset else in_order), reward_post=reward_post,
        row_mask=row_mask if args.mask_truncated_completions else None,
        loss="variant" if variant else None, loss_options={"spec": spec} if variant else {},
        entropy_bonus=entropy_bonus(args) if spec.entropy_bonus else None)


def entropy_bonus(args: GRPOConfig) -> EntropyBonus:
    """TRL's entropy bonus (entropy_coef, or the adaptive controller's settings); not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(refusal("entropy_coef", args.entropy_coef, "the entropy bonus is per rank's tokens; "
                                 "under torchrun it is not implemented"))
    return EntropyBonus(args.entropy_coef, adaptive=args.use_adaptive_entropy, target=args.entropy_target,
                        delta=args.entropy_coef_delta, coef_min=args.entropy_coef_min, coef_max=args.entropy_coef_max)
