"""TRL's evaluation for GRPOTrainer: `evaluate()` returns `eval_loss` and TRL's eval metrics.

TRL evaluates with the training objective: per eval batch (`per_device_eval_batch_size` rows, each prompt
sampled `num_generations_eval` times with the training sampling settings) it scores the rewards, takes the
group advantages and computes the loss with no gradient (the policy is its own old policy, so the ratio is
1); `eval_loss` is the mean over the rows of the batch losses, and the reward / completion metrics are
averaged over the batches (TRL's `_metrics["eval"]`, logged with the `eval_` prefix). This does the same
with dash-fast's loss (the configured kernel, or trl_losses for TRL's variants), on every eval row: the DASH
filter selects training rows and is not applied here. The sampling seeds are keyed by the training step and
kept apart from the training streams, so evaluating does not change what training samples.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from dash_fast import algo
from dash_fast.data.prompts import PromptDataset, load_rows
from dash_fast.learner import Learner
from dash_fast.losses import EntropyBonus
from dash_fast.trl.extensions import normalize_then_sum
from dash_fast.trl.logs import rollout_metrics


def prompt_dataset(config, tokenizer, dataset: Any, name: str) -> PromptDataset:
    """`dataset` (a Dataset, IterableDataset or rows) as a PromptDataset with the run's prompt settings
    (`config`: the DashConfig)."""
    a = config
    return PromptDataset(load_rows(dataset), tokenizer, name=name, prompt_column=a.prompt_column,
                         max_prompt_tokens=a.max_prompt_tokens, system_prompt=a.system_prompt,
                         use_chat_template=a.use_chat_template, chat_template_kwargs=a.chat_template_kwargs)


def evaluate_sets(trainer, sets: dict[str | None, Any], prefix: str) -> dict:
    """trl_evaluate on each set (a PromptDataset or a dataset), merged: set `name`'s metrics prefixed
    `{prefix}_{name}`, the unnamed set's (key None) `{prefix}`."""
    metrics = {}
    for name, ds in sets.items():
        data = ds if isinstance(ds, PromptDataset) else \
            prompt_dataset(trainer.config, trainer.tokenizer, ds, "eval_dataset" if name is None else
                           f"eval_dataset[{name!r}]")
        metrics.update(trl_evaluate(trainer, data, prefix if name is None else f"{prefix}_{name}"))
    return metrics


def trl_evaluate(trainer, dataset: PromptDataset, prefix: str) -> dict:
    """`{prefix}_loss`, `{prefix}_reward`, `{prefix}_rewards/<name>/mean`, ... on `dataset` (TRL's keys),
    plus `{prefix}_runtime` / `_samples_per_second` / `_steps_per_second` as the HF Trainer adds them."""
    a, learner = trainer.config, trainer.learner
    if trainer.dist.enabled:
        raise NotImplementedError("dash-fast does not support evaluate() under torchrun for GRPOTrainer: TRL's "
                                  "eval loss is computed in one process (DashTrainer.evaluate splits over ranks)")
    if trainer.overlap is not None:  # the engine may be sampling the next rollout
        trainer.overlap.wait()
    G = trainer.num_generations_eval
    batch_rows = getattr(trainer.args, "per_device_eval_batch_size", None) or a.rows_per_step
    if batch_rows % G:
        raise ValueError(f"per_device_eval_batch_size={batch_rows} must be divisible by num_generations_eval={G}")
    prompts_per_batch = batch_rows // G
    t0 = time.perf_counter()
    was_training = trainer.model.training
    bonus = copy.copy(learner.entropy_bonus)  # the bonus's running sums belong to training
    loss_sum, rows_seen, batches, sums = 0.0, 0, 0, {}
    try:
        trainer.model.eval()
        for start in range(0, len(dataset), prompts_per_batch):
            idx = list(range(start, min(len(dataset), start + prompts_per_batch)))
            prompt_ids = [dataset.prompt_ids[i] for i in idx for _ in range(G)]
            params = trainer.collector.sampling_params(-1 - trainer.state.global_step, row=start * G)
            rollout = trainer.engine.generate(prompt_ids, params)
            rewards, per_func = trainer.rewards.score(dataset, idx, rollout, G)
            if getattr(trainer.args, "multi_objective_aggregation", None) == "normalize_then_sum":
                rewards = normalize_then_sum(per_func, trainer.rewards.weights, G)
            loss, stats = eval_loss(learner, rollout, algo.group_advantages(rewards, G, a.scale_rewards), a, bonus)
            metrics = rollout_metrics([len(p) for p in rollout.prompt_ids], rollout, rewards, per_func,
                                      trainer.reward_names, G, trainer.stop_ids, a.max_completion_tokens)
            metrics.pop("num_tokens")  # TRL's num_tokens counts training tokens
            metrics.update(stats)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            loss_sum += loss * len(rollout)
            rows_seen += len(rollout)
            batches += 1
    finally:
        trainer.model.train(was_training)
        trainer.rewards.flush_logs()  # what reward functions logged on eval rows belongs to no training step
        trainer.collector.engine_changed()  # eval may have grown the engine's cache: re-capture first
    runtime = time.perf_counter() - t0
    out = {f"{prefix}_loss": loss_sum / max(rows_seen, 1)}
    out.update({f"{prefix}_{k}": v / max(batches, 1) for k, v in sums.items()})
    out.update({f"{prefix}_runtime": runtime, f"{prefix}_samples_per_second": rows_seen / max(runtime, 1e-9),
                f"{prefix}_steps_per_second": batches / max(runtime, 1e-9)})
    return out


@torch.no_grad()
def eval_loss(learner: Learner, rollout, advantages: torch.Tensor, a, bonus: EntropyBonus | None) -> tuple[float, dict]:
    """The training loss of every row of `rollout`, no gradient, old log-probs = the current ones (TRL's
    eval ratio of 1); with beta > 0 the reference's log-probs as in training; `bonus`: the entropy bonus
    (a copy: its running sums belong to training). Returns (loss, TRL's kl / entropy / clip_ratio means
    over the tokens)."""
    rows = list(range(len(rollout)))
    lengths = rollout.completion_lengths
    norm = algo.loss_normaliser(a.loss_agg, lengths, a.max_completion_tokens)
    weights = algo.token_weights(rollout.completion_mask, a.loss_agg, norm)
    ref = None
    if learner.ref_model is not None:
        ref = learner.logprob_pass(learner.ref_model, rollout, rows, "eval/logprob_ref")
    step_tokens = int(lengths.sum())
    total, clip, kl, ent, tokens = 0.0, 0.0, 0.0, 0.0, 0
    for micro in learner.micro_batches(rollout, rows):
        loss, st, n = learner.micro_loss(rollout, [rows[i] for i in micro], advantages, weights, None, ref,
                                         step_tokens, bonus)
        total += float(loss)
        clip += float(st["clip_fraction"]) * n
        kl += (float(st["kl_mean"]) if st.get("kl_mean") is not None else 0.0) * n
        if st.get("entropy") is not None:
            ent += float(st["entropy"].sum())
        tokens += n
    stats = {"entropy": ent / max(tokens, 1), "clip_ratio/region_mean": clip / max(tokens, 1)}
    if a.beta > 0:
        stats["kl"] = kl / max(tokens, 1)
    return total, stats
