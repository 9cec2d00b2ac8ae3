"""TRL's per-step bookkeeping over the core's step: what the reward hook sees of every training scoring
(kept for TRL's reward / completion metrics and TRL's `trainer._logs`), TRL's names in the step record, and
TRL's sync_ref_model after each step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dash_fast.engines.base import Rollout
from dash_fast.trl.extensions import normalize_then_sum
from dash_fast.trl.logs import rollout_metrics


def empty_logs() -> dict:
    """TRL's `_logs` at the start of a step."""
    return {"prompt": [], "completion": [], "rewards": {}, "extra": {}}


class StepLog:
    """One step's TRL view, filled as the collector scores (refill rounds too) and read into the step record.
    `trainer` is the GRPOTrainer (its scorer, tokenizer, configs and learner are read when a step runs)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.scorings: list[tuple[Rollout, torch.Tensor, torch.Tensor]] = []
        self.logs = empty_logs()

    def begin(self) -> None:
        self.scorings = []
        self.logs = empty_logs()

    def reward_post(self, dataset, indices, rollout, repeat, rewards, per_func) -> torch.Tensor:
        """The core's reward hook (trainer.Extensions.reward_post): the scoring is kept for the step's TRL
        metrics and TRL's `_logs`; with multi_objective_aggregation="normalize_then_sum" the rewards TRL
        trains on are returned."""
        t = self.trainer
        self.scorings.append((rollout, rewards, per_func))
        self._record_logs(dataset, indices, rollout, repeat, per_func)
        if getattr(t.grpo_args, "multi_objective_aggregation", None) == "normalize_then_sum":
            rewards = normalize_then_sum(per_func, t.rewards.weights, repeat)
        return rewards

    def _record_logs(self, dataset, indices, rollout, repeat, per_func) -> None:
        """TRL's `trainer._logs` for the current step: each reward's values, the columns reward functions
        logged with `log_extra`, and (with log_completions) the prompts and completions."""
        t, logs = self.trainer, self.logs
        for k, name in enumerate(t.reward_names):
            logs["rewards"].setdefault(name, []).extend(per_func[:, k].tolist())
        for column, values in t.rewards.logs["extra"].items():  # accumulated over this step's scorings
            logs["extra"][column] = list(values)
        if getattr(t.args, "log_completions", False):
            logs["prompt"] += [dataset.rows[i][dataset.prompt_column] for i in indices for _ in range(repeat)]
            logs["completion"] += t.tokenizer.batch_decode(rollout.completion_token_lists(), skip_special_tokens=True)

    def add_metrics(self, record: dict) -> None:
        """TRL's names for the record's numbers, TRL's reward / completion metrics over the step's scorings, and
        with the entropy bonus TRL's policy_loss (the loss before the bonus is subtracted) and entropy_coef."""
        t = self.trainer
        record.update({"learning_rate": record["lr"], "step_time": record["time_step_s"],
                       "clip_ratio/region_mean": record.get("clip_fraction", 0.0), "epoch": t.state.epoch})
        if self.scorings:
            rollout = Rollout.concat([r for r, _, _ in self.scorings], t.pad_id)
            rewards = torch.cat([r for _, r, _ in self.scorings])
            per_func = torch.cat([f for _, _, f in self.scorings])
            record.update(rollout_metrics([len(p) for p in rollout.prompt_ids], rollout, rewards, per_func,
                                          t.reward_names, t.config.group_size, t.stop_ids,
                                          t.config.max_completion_tokens))
        bonus = t.learner.entropy_bonus
        if bonus is not None:
            contribution = bonus.take_contribution()
            if "loss" in record:
                record["policy_loss"] = record["loss"] + contribution / max(record.get("optimizer_steps", 1), 1)
                record["entropy_coef"] = bonus.coef


class RefModelSync:
    """TRL's sync_ref_model (its SyncRefModelCallback): every `every` optimizer steps,
    ref <- alpha * policy + (1 - alpha) * ref."""

    def __init__(self, every: int, alpha: float) -> None:
        self.every, self.alpha, self.syncs = every, alpha, 0

    def __call__(self, optimizer_steps: int, ref_model: torch.nn.Module, model: torch.nn.Module) -> None:
        """Sync if an `every`-th optimizer step was taken since the last sync (`optimizer_steps`: all so far)."""
        syncs = optimizer_steps // self.every
        if syncs <= self.syncs:
            return
        self.syncs = syncs
        with torch.no_grad():
            for ref, cur in zip(ref_model.parameters(), model.parameters(), strict=True):
                ref.mul_(1.0 - self.alpha).add_(cur.detach().to(ref.dtype), alpha=self.alpha)


class Epochs:
    """TRL's epochs over the core's steps: TrainerState.epoch after a step (passes over the train set; a
    streamed one: the passes begun minus one, its length being unknown), and the callback events
    on_epoch_begin / on_epoch_end around each pass's steps. `fire(event)` dispatches to the callbacks."""

    def __init__(self, train_data: Any, n_train: int | None, prompts_per_step: int,
                 fire: Callable[[str], None]) -> None:
        self.train_data, self.n_train, self.prompts_per_step, self.fire = train_data, n_train, prompts_per_step, fire
        self.current = -1  # the epoch whose on_epoch_begin fired last

    def at(self, step: int) -> float:
        """TrainerState.epoch after `step` steps."""
        if self.n_train is None:
            return float(self.train_data.epoch)
        return step * self.prompts_per_step / max(self.n_train, 1)

    def step_begins(self, step: int) -> None:
        """Before step `step + 1`: on_epoch_begin when it starts a new epoch (after the last one's on_epoch_end)."""
        epoch = int(self.at(step))
        if epoch > self.current:
            if self.current >= 0:
                self.fire("on_epoch_end")
            self.current = epoch
            self.fire("on_epoch_begin")

    def training_ends(self) -> None:
        if self.current >= 0:
            self.fire("on_epoch_end")
