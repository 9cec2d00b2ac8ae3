"""DASH's algorithm as pure functions: advantages, the gradient filter, loss aggregation, the PG loss.

Formulas are in shared DESIGN.md section 1. Everything here is unit-tested against hand-computed values.
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


def pg_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token clipped surrogate + beta * k3 KL. Returns (loss_t, clip_active_t, kl_t or None).

    old_logp None means on-policy: the ratio is exp(logp - logp.detach()) = 1 in value, grad log p.
    """
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    clip_active = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, clip_active, kl


def naive_linear_pg_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    tau: float | None = None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The trainer's `loss_impl=naive`: materialises the N x V logits. Same contract as the fused op."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    keep = token_weights != 0
    if tau is not None:
        keep &= advantages.abs() > tau
    idx = keep.nonzero().view(-1)
    h, y, a, w = hidden[idx], targets[idx], advantages[idx], token_weights[idx]
    compute = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    logits = torch.nn.functional.linear(h, weight, bias).to(compute) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(1, y.view(-1, 1)).view(-1)
    old = None if old_logp is None else old_logp[idx].to(compute)
    ref = None if ref_logp is None else ref_logp[idx].to(compute)
    loss_t, clip_active, kl = pg_token_loss(logp, a.to(compute), old, ref, eps_low, eps_high, beta)
    loss = (loss_t * w.to(compute)).sum()
    stats: dict = {
        "logp": torch.zeros(hidden.shape[0], dtype=compute).index_copy(0, idx, logp.detach()),
        "clip_fraction": clip_active.float().mean().item() if idx.numel() else 0.0,
        "kl_mean": kl.detach().mean().item() if kl is not None and idx.numel() else None,
        "kept_tokens": int(idx.numel()),
    }
    if return_entropy:
        ent = -(logprobs.exp() * logprobs).sum(-1).detach()
        stats["entropy"] = torch.zeros(hidden.shape[0], dtype=compute).index_copy(0, idx, ent)
    return loss, stats


def naive_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = torch.nn.functional.linear(hidden, weight, bias).to(compute) / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets.view(-1, 1)).view(-1)


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
