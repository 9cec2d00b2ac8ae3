"""The one interface every rollout engine implements: generate(prompt_ids, params) -> Rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    """What to sample. temperature == 0 means greedy (no sampling log-probs are meaningful then)."""

    temperature: float = 0.9
    top_k: int = 50  # <= 0: off
    top_p: float = 1.0  # >= 1: off
    min_p: float = 0.0  # <= 0: off; tokens below min_p x the top token's probability are not drawn
    repetition_penalty: float = 1.0  # 1: off; HF's penalty on tokens already in the prompt or completion
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass
class Rollout:
    """A batch of sampled completions, right-padded.

    completion_mask is 1 on generated tokens (the stop token included) and 0 on padding.
    sampling_logps[i, t] is log softmax(logits / temperature)[token] under the sampling weights
    (before top-k / top-p truncation, like TRL), 0 on padding.
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor  # [B, L] long
    completion_mask: torch.Tensor  # [B, L] float32
    sampling_logps: torch.Tensor  # [B, L] float32
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1).long()

    def completion_token_lists(self) -> list[list[int]]:
        lengths = self.completion_lengths.tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths)]

    def select(self, rows: list[int] | torch.Tensor) -> Rollout:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Rollout(
            prompt_ids=[self.prompt_ids[i] for i in idx.tolist()],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            sampling_logps=self.sampling_logps[idx],
            stats=dict(self.stats),
        )

    @staticmethod
    def concat(parts: list[Rollout], pad_id: int) -> Rollout:
        """Join rollouts generated in separate batches (the grpo preset samples in small batches); one part is
        returned as it is."""
        if len(parts) == 1:
            return parts[0]
        width = max(p.completion_ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        stats: dict = {}
        for p in parts:
            for k, v in p.stats.items():
                stats[k] = stats.get(k, 0) + v if isinstance(v, (int, float)) else v
        return Rollout(
            prompt_ids=[ids for p in parts for ids in p.prompt_ids],
            completion_ids=torch.cat([pad(p.completion_ids, pad_id) for p in parts]),
            completion_mask=torch.cat([pad(p.completion_mask, 0) for p in parts]),
            sampling_logps=torch.cat([pad(p.sampling_logps, 0) for p in parts]),
            stats=stats,
        )


class RolloutEngine(Protocol):
    """Embedded (torch) and vLLM engines both look like this to the trainer."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout: ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from the trainer's current weights (no-op when weights are shared)."""
        ...
