"""Held-out evaluation: greedy accuracy, the mean of the accuracy reward, split over ranks."""

from __future__ import annotations

import torch

from dash_fast.data.prompts import PromptDataset
from dash_fast.engines.base import SamplingParams
from dash_fast.rewards.scorer import RewardScorer
from dash_fast.runtime import distributed as ddp


@torch.no_grad()
def greedy_accuracy(engine, rewards: RewardScorer, dataset: PromptDataset, n: int, params: SamplingParams,
                    dist: ddp.DistInfo, fsdp_root=None, batch_size: int = 256) -> dict:
    """Sample the first `n` prompts of `dataset` with `params` (greedy) and average the accuracy reward
    over the rows where it applies (not None); each rank samples its contiguous share."""
    share = -(-n // dist.world_size)
    lo, hi = min(n, dist.rank * share), min(n, (dist.rank + 1) * share)
    acc_sum, acc_count, len_sum = 0.0, 0.0, 0.0
    with ddp.gathered_params(fsdp_root):
        for start in range(lo, hi, batch_size):
            idx = list(range(start, min(hi, start + batch_size)))
            rollout = engine.generate([dataset.prompt_ids[i] for i in idx], params)
            _, per_func = rewards.score(dataset, idx, rollout, 1)
            acc = per_func[:, rewards.accuracy_index]
            acc_sum += float(torch.nansum(acc))
            acc_count += float((~acc.isnan()).sum())
            len_sum += float(rollout.completion_lengths.sum())
    rewards.flush_logs()  # what reward functions logged on eval rows belongs to no step record
    acc_sum, acc_count, len_sum = (ddp.all_reduce_sum(v, dist) for v in (acc_sum, acc_count, len_sum))
    return {"accuracy": acc_sum / acc_count if acc_count else float("nan"), "examples": n,
            "completion_len_mean": len_sum / max(n, 1)}
