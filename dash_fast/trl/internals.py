"""TRL GRPOTrainer internals that dash-fast's loop does not go through (its own stages: collect.py,
learner.py): calling one is refused, and a subclass (or a patch) overriding one is refused at train(),
since the override would be silently ignored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# name -> why it is not part of dash-fast's loop
TRL_INTERNALS = {
    "training_step": "an optimizer step is learner.Learner.optimizer_step over token-budget micro-batches",
    "compute_loss": "the loss is the learner's fused kernel (or trl_losses' variants), per micro-batch",
    "_compute_loss": "the loss is the learner's fused kernel (or trl_losses' variants), per micro-batch",
    "_prepare_inputs": "batches are built by collect.Collector (one rollout per optimizer step)",
    "_generate_and_score_completions": "sampling and scoring are collect.Collector.collect",
    "_generate": "generation runs in dash-fast's engines (rollout/), from collect.Collector.generate",
    "_generate_single_turn": "generation runs in dash-fast's engines (rollout/), from collect.Collector.generate",
    "_calculate_rewards": "rewards are scored by rewards.scorer.RewardScorer.score",
    "prediction_step": "evaluation is trl_eval.trl_evaluate",
    "log": "training logs are built by trl_logs.log_entries, not through log() (a callback's on_log sees them)",
    "_get_per_token_logps_and_entropies": "training computes log-probs in the learner's own forward",
}


def refused_internal(name: str) -> Callable[..., Any]:
    """A method standing for TRL's internal `name`: calling it raises, saying what dash-fast does instead."""

    def refused(self, *args, **kwargs):
        raise NotImplementedError(f"dash-fast does not support GRPOTrainer.{name}=called: {TRL_INTERNALS[name]}")

    refused.__name__ = name
    refused.__doc__ = f"TRL's internal `{name}`: not part of dash-fast's loop ({TRL_INTERNALS[name]})."
    return refused


class RefusedInternals:
    """TRL's internal methods that dash-fast has no counterpart for, each refused when called (GRPOTrainer
    defines the rest of TRL_INTERNALS itself)."""

    training_step = refused_internal("training_step")
    compute_loss = refused_internal("compute_loss")
    _compute_loss = refused_internal("_compute_loss")
    _prepare_inputs = refused_internal("_prepare_inputs")
    _generate_and_score_completions = refused_internal("_generate_and_score_completions")
    _generate = refused_internal("_generate")
    _generate_single_turn = refused_internal("_generate_single_turn")
    _calculate_rewards = refused_internal("_calculate_rewards")
    prediction_step = refused_internal("prediction_step")


def check_not_overridden(trainer: Any, owner: type) -> None:
    """Refuse a TRL internal that `trainer` (an instance of `owner` or a subclass) overrides, on its class or
    on the instance: the loop would not call the override."""
    for name in TRL_INTERNALS:
        if name in trainer.__dict__ or getattr(type(trainer), name) is not getattr(owner, name):
            raise NotImplementedError(f"dash-fast does not support GRPOTrainer.{name}=overridden: "
                                      f"{TRL_INTERNALS[name]}, so the override would not run")
