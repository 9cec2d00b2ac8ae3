"""The reward scorer: a step's reward functions (TRL's calling convention), their weights, and what they log.

`RewardScorer.score` decodes a rollout's completions, calls every function as TRL 1.16 does
(rewards.calling.score_completions) and returns the weighted nan-sum per row and the per-function values;
`log_metric` / `log_extra` collect what functions report until `flush_logs` puts it in the step record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dash_fast.runtime.profiling import nvtx_range

if TYPE_CHECKING:  # types only: rewards sits below data and engines
    from dash_fast.data.prompts import PromptDataset
    from dash_fast.engines.base import Rollout

RewardFunc = Callable[..., list]


class RewardScorer:
    """The reward functions (TRL's signature), their weights, and which one the accuracy is the mean of.
    Calls them as TRL 1.16 does (rewards.score_completions); what they report through `log_metric` /
    `log_extra` is kept until `flush_logs` puts it in the step record."""

    def __init__(self, funcs, weights: list[float] | None, accuracy_reward: str | None, tokenizer,
                 trainer_state: Any = None) -> None:
        self.funcs, self.names = resolve_rewards(funcs)
        if weights is not None and len(weights) != len(self.funcs):
            raise ValueError(f"reward_weights has {len(weights)} weights for {len(self.funcs)} reward functions "
                             f"{self.names}")
        self.weights = torch.tensor(weights or [1.0] * len(self.funcs))
        acc = accuracy_reward or self.names[0]
        if acc not in self.names:
            raise ValueError(f"accuracy_reward {acc!r} is not one of the reward functions {self.names}")
        self.accuracy_index = self.names.index(acc)
        self.tokenizer = tokenizer
        self.trainer_state = trainer_state  # the trainer's transformers.TrainerState, passed as `trainer_state`
        self.logs: dict[str, dict[str, list]] = {"metric": {}, "extra": {}}

    def score(self, dataset: PromptDataset, indices: list[int], rollout: Rollout,
              repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted nan-sum of every reward function. Returns (rewards [B], per_function [B, F])."""
        from dash_fast.rewards.calling import score_completions, warn_rows_without_reward

        prompts = [dataset.rows[i][dataset.prompt_column] for i in indices for _ in range(repeat)]
        token_lists = rollout.completion_token_lists()
        completions = self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        if prompts and isinstance(prompts[0], list):  # chat prompts: completions as messages, as TRL passes them
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        columns = dataset.columns(indices, repeat)
        with nvtx_range("rollout/reward"):
            values = score_completions(self.funcs, prompts, completions, token_lists, columns,
                                       trainer_state=self.trainer_state, log_extra=self.log_extra,
                                       log_metric=self.log_metric)
        warn_rows_without_reward(values, prompts, completions, columns)
        per_func = torch.tensor([[float("nan") if v is None else v for v in row] for row in zip(*values)])
        rewards = torch.nansum(per_func * self.weights, dim=1)  # rows where all are None -> 0, as TRL
        return rewards, per_func

    def log_metric(self, name: str, value: float) -> None:
        """`log_metric` for reward functions (TRL): a scalar, averaged into this step's record under `name`."""
        self.logs["metric"].setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        """`log_extra` for reward functions (TRL: a completions-table column): in the step record as
        `extra/<column>`, the mean of numbers (else the values themselves)."""
        self.logs["extra"].setdefault(column, []).extend(values)

    def flush_logs(self) -> dict:
        """What the reward functions logged since the last flush, as step-record entries (then cleared)."""
        out: dict = {name: sum(v) / len(v) for name, v in self.logs["metric"].items() if v}
        for column, values in self.logs["extra"].items():
            numeric = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            out[f"extra/{column}"] = sum(values) / len(values) if numeric else list(values)
        self.logs = {"metric": {}, "extra": {}}
        return out


def resolve_rewards(funcs) -> tuple[list[RewardFunc], list[str]]:
    """Reward functions (callables or registered names, rewards.py) and their names."""
    funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]
    resolved, names = [], []
    for f in funcs:
        if isinstance(f, str):
            from dash_fast.rewards import get_reward_func

            f = get_reward_func(f)
        if not callable(f):
            raise ValueError(f"reward function {f!r} is not callable")
        resolved.append(f)
        names.append(getattr(f, "__name__", type(f).__name__))
    return resolved, names
