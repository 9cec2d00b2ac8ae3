"""DASH's algorithm as pure functions: advantages, the gradient filter, loss aggregation, micro-batches.

Formulas are in docs/design.md section 1. Everything here is unit-tested against hand-computed values.
The per-token PG loss (clipped surrogate + k3 KL) is written once, in dash_kernels.utils.pg_token_loss;
the naive loss on materialised logits (`loss_impl=naive`) is dash_kernels.pg_loss_ref.
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "dr_grpo")
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + 1e-4); 'batch' divides by the rollout's std, 'none' does not divide.

    Rows are laid out group by group: rows [g*G, (g+1)*G) share a prompt. std is unbiased (as TRL).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = (r - r.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        return centred / (std.expand_as(r).reshape(-1) + STD_EPS)
    if scale_rewards == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else torch.tensor(0.0)
        return centred / (std + STD_EPS)
    return centred


def filter_rows(advantages: torch.Tensor, tau: float | None) -> torch.Tensor:
    """Indices of rows that carry signal: |A| > tau. tau None keeps every row.

    When nothing survives, the row with the largest |A| is kept so the optimizer step still happens.
    """
    if tau is None:
        return torch.arange(advantages.numel())
    keep = (advantages.abs() > tau).nonzero().view(-1)
    if keep.numel() == 0:
        keep = advantages.abs().argmax().view(1)
    return keep


def loss_normaliser(loss_agg: str, completion_lengths: torch.Tensor, max_completion_tokens: int) -> float:
    """The global denominator for token-mean and dr_grpo (over the rows being normalised)."""
    if loss_agg == "token-mean":
        return float(completion_lengths.sum().clamp(min=1))
    if loss_agg == "dr_grpo":
        return float(completion_lengths.numel() * max_completion_tokens)
    if loss_agg == "seq-mean-token-mean":
        return float(completion_lengths.numel())
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def token_weights(
    completion_mask: torch.Tensor, loss_agg: str, normaliser: float
) -> torch.Tensor:
    """Fold mask and aggregation into one weight per token, so loss = sum_t w_t * loss_t.

    `normaliser` is global (the whole rollout or minibatch), so summing micro-batch losses gives the
    same gradient as one big batch. For seq-mean-token-mean it is the number of rows, and each row's
    tokens are further divided by that row's length.
    """
    mask = completion_mask.float()
    if loss_agg == "seq-mean-token-mean":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
        return mask / lengths / normaliser
    if loss_agg in ("token-mean", "dr_grpo"):
        return mask / normaliser
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def pack_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group row indices so that rows x longest row <= token_budget (a row alone may exceed it).

    Rows are sorted by length first, so rows of similar length share a micro-batch and padding
    waste stays small.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and longest_if_added * (len(current) + 1) > token_budget:
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def split_minibatches(n_rows: int, minibatches: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """PPO 'Mini': a random split of the rollout's rows into exactly `minibatches` near-equal parts (sizes
    differ by at most one; empty parts only when n_rows < minibatches), so the LR schedule's count of
    updates holds (ceil-sized chunks gave 3 parts for 9 rows and M = 4)."""
    perm = torch.randperm(n_rows, generator=generator)
    return list(torch.tensor_split(perm, minibatches))
