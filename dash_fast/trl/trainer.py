"""Drop-in for TRL: `from dash_fast import GRPOTrainer, GRPOConfig` in place of `from trl import ...`.

GRPOTrainer is an adapter over the core trainer: it maps a GRPOConfig onto a DashConfig (trl/config.py),
builds a DashTrainer through the core's declared extension points (trainer.Extensions: prompt order or a
streamed train set, reward post-processing, the truncated-row mask, TRL's loss variants by name from the loss
registry; and DashTrainer's extension-point methods: callback events, step records, evaluation schedule,
checkpoint layout, end of training), and presents TRL's public API on top (train, evaluate, log,
save_model, dataloaders, TRL's helpers). Every difference from TRL is listed in docs/trl.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from dash_fast.config import DashConfig
from dash_fast.data.prompts import PromptDataset
from dash_fast.losses import EntropyBonus
from dash_fast.models.loading import check_text_only, load_causal_lm
from dash_fast.trainer import DashTrainer, Extensions
from dash_fast.trl.config import GRPOConfig, loss_warnings, refusal
from dash_fast.trl.data import (
    StreamedPrompts,
    is_iterable_dataset,
    peek_rows,
    rows_dataloader,
    stream_dataloader,
)
from dash_fast.trl.eval import trl_evaluate
from dash_fast.trl.extensions import InOrderSampler, normalize_then_sum, truncated_rows
from dash_fast.trl.masks import per_token_logps_and_entropies

__all__ = ["GRPOConfig", "GRPOTrainer", "loss_warnings", "normalize_then_sum", "truncated_rows"]

logger = logging.getLogger(__name__)


# TRL GRPOTrainer internals dash-fast's loop does not go through (its own stages: collect.py, learner.py):
# calling one is refused, and a subclass (or a patch) overriding one is refused at train(), since the
# override would be silently ignored. name -> why.
_TRL_INTERNALS = {
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


def _trl_internal(name: str):
    def refused(self, *args, **kwargs):
        raise NotImplementedError(f"dash-fast does not support GRPOTrainer.{name}=called: {_TRL_INTERNALS[name]}")

    refused.__name__ = name
    refused.__doc__ = f"TRL's internal `{name}`: not part of dash-fast's loop ({_TRL_INTERNALS[name]})."
    return refused


def _iterable_dataset_settings(args: GRPOConfig, streamed_train: bool, eval_dataset: Any) -> None:
    """TRL's settings for iterable datasets: `dispatch_batches` must be False (set so), and a streamed train
    set is read by one DataLoader worker (`dataloader_num_workers` forced to 0, with TRL's warning)."""
    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    if streamed_train or any(is_iterable_dataset(ds) for ds in evals):
        if args.accelerator_config.dispatch_batches:
            raise ValueError("Iterable datasets require `dispatch_batches=False`, but it is set to `True` in "
                             "`accelerator_config`. Please set it to `False`.")
        args.accelerator_config.dispatch_batches = False
    if streamed_train and args.dataloader_num_workers != 0:
        logger.warning("Iterable datasets require `dataloader_num_workers=0` to preserve prompt grouping; overriding "
                       f"the provided value ({args.dataloader_num_workers}).")
        args.dataloader_num_workers = 0


def trl_inputs(model: Any, reward_funcs: Any, args: Any, train_dataset: Any, eval_dataset: Any,
               reward_processing_classes: Any, peft_config: Any):
    """GRPOTrainer's inputs checked and loaded as TRL takes them, before any trainer is built: refusals (no
    reward, no train set, a vision-language model or dataset, sync_ref_model with PEFT), reward models, the
    train rows (a streamed set: its first rows), the model (loaded by TRL's rules, PEFT applied). Returns
    (model, reward functions, their processing classes, rows, whether the train set is streamed)."""
    from dash_fast.data.prompts import load_rows
    from dash_fast.models.peft import apply_peft, is_peft_model
    from dash_fast.rewards.reward_models import resolve_reward_models

    if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
        raise ValueError("GRPOTrainer: No reward source provided: pass reward_funcs (functions, built-in reward "
                         "names, or reward model ids / models)")
    if train_dataset is None:
        raise ValueError("GRPOTrainer: `train_dataset` is required")
    check_text_only(model, getattr(args, "trust_remote_code", False))  # a VLM: refused before anything loads
    init_kwargs = getattr(args, "model_init_kwargs", None) or {}
    reward_funcs, processing_classes = resolve_reward_models(
        reward_funcs, reward_processing_classes, {k: v for k, v in init_kwargs.items() if k != "device_map"},
        chat_template_kwargs=getattr(args, "chat_template_kwargs", None))
    streamed = is_iterable_dataset(train_dataset)
    if isinstance(args, GRPOConfig):
        _iterable_dataset_settings(args, streamed, eval_dataset)
    # a streamed train set: its first rows are checked (and build the trainer); training reads the stream
    rows = peek_rows(train_dataset, 8) if streamed else load_rows(train_dataset)
    for column in ("image", "images"):
        if rows and column in rows[0]:
            raise ValueError(f"dash-fast does not support train_dataset column {column!r}: vision-language "
                             "inputs (the engines and the training forward take token ids only)")
    if isinstance(model, str):
        model = load_causal_lm(model, args, init_kwargs, peft=peft_config is not None)
    model = apply_peft(model, peft_config, beta=args.beta)
    if getattr(args, "sync_ref_model", False) and is_peft_model(model):
        raise ValueError(refusal("sync_ref_model", True, "with PEFT the reference is the policy's own base weights "
                                 "(adapters disabled), there is no reference copy to sync (TRL refuses it too)"))
    return model, reward_funcs, processing_classes, rows, streamed


class GRPOTrainer(DashTrainer):
    """TRL's GRPOTrainer signature on dash-fast's trainer. `args` is a GRPOConfig (or a DashConfig);
    callbacks are transformers.TrainerCallback instances (or classes) and receive the GRPOConfig."""

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | DashConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
    ) -> None:
        from dash_fast.data.prompts import load_rows
        from dash_fast.rewards.reward_models import RewardModelFunc

        if optimizers != (None, None):
            raise NotImplementedError("dash-fast does not support optimizers=(...): the trainer builds AdamW "
                                      "and its schedule from the config")
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = GRPOConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-GRPO")
        model, reward_funcs, self.reward_processing_classes, rows, streamed = trl_inputs(
            model, reward_funcs, args, train_dataset, eval_dataset, reward_processing_classes, peft_config)
        self.grpo_args = args
        names = [getattr(f, "__name__", type(f).__name__) if not isinstance(f, str) else f for f in reward_funcs]
        dash_args = args.to_dash_config(int(os.environ.get("WORLD_SIZE", "1")), None if streamed else len(rows), names) \
            if isinstance(args, GRPOConfig) else args
        if getattr(args, "mask_truncated_completions", False) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("dash-fast does not support mask_truncated_completions=True under torchrun: "
                             "each rank sees only its own completions' stop tokens")
        if isinstance(args, GRPOConfig):
            self._prepare_model(model, args)
        callbacks = [cb() if isinstance(cb, type) else cb for cb in (callbacks or [])]
        named_eval = dict(eval_dataset) if isinstance(eval_dataset, dict) else None  # DatasetDict is a dict
        first_eval = next(iter(named_eval.values())) if named_eval else eval_dataset
        self._n_train = None if streamed else len(rows)
        self._step_rollouts: list = []
        self._logs: dict = {"prompt": [], "completion": [], "rewards": {}, "extra": {}}  # the last step's (TRL's)
        self._stream = train_dataset if streamed else None
        super().__init__(model, reward_funcs, args=dash_args, train_dataset=rows,
                         eval_dataset=None if first_eval is None else load_rows(first_eval),
                         processing_class=processing_class, callbacks=callbacks,
                         extensions=self._extensions(args, streamed))
        self.callback_args = self.args = args  # TRL's trainer.args; the loop reads self.config (the DashConfig)
        self._eval_sets = None
        if named_eval:  # TRL: a dict of eval sets is evaluated set by set, metrics prefixed by its name
            self._eval_sets = {name: self._prompt_dataset(ds, f"eval_dataset[{name!r}]")
                               for name, ds in named_eval.items()}
        for func in self.rewards.funcs:
            if isinstance(func, RewardModelFunc):
                func.to(self.device)
        self.processing_class = self.tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self._ref_syncs = 0
        self._training = False  # inside train(): evaluate() leaves state.log_history (the step records) alone
        self._extra_logs: list[dict] = []  # what log() was given
        self.use_adaptive_entropy = bool(getattr(args, "use_adaptive_entropy", False))
        self.step_records: list[dict] | None = None
        self._epoch_fired = -1
        if isinstance(args, GRPOConfig):
            for warning in loss_warnings(args.loss_type, args.importance_sampling_level):
                logger.warning(warning)
        self.aux_loss_enabled = bool(getattr(self.model.config, "output_router_logits", False))
        if self.aux_loss_enabled:
            raise ValueError("dash-fast does not support output_router_logits=True: the MoE load-balancing loss "
                             "is not added (set model.config.output_router_logits=False)")
        if isinstance(args, GRPOConfig) and (args.gradient_checkpointing or args.activation_checkpointing):
            kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}  # frozen inputs (LoRA)
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._entropy_bonus_enabled = self.learner.entropy_bonus is not None  # TRL's flag (entropies with grad)
        self.emit("on_init_end")

    # ------------------------------------------------------------------ the core's extension points
    def _extensions(self, args: Any, streamed: bool) -> Extensions:
        """How this run differs from the core's (trainer.Extensions): TRL's prompt order or a streamed train
        set, its reward post-processing (TRL's metrics, normalize_then_sum), mask_truncated_completions, and
        TRL's loss variants with the entropy bonus by name from the loss registry."""
        prompts = self._stream_prompts if streamed else None
        if not isinstance(args, GRPOConfig):
            return Extensions(prompts=prompts, reward_post=self._reward_post)
        spec = args.trl_loss()
        bonus = None
        if spec.entropy_bonus:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError(refusal("entropy_coef", args.entropy_coef, "the entropy bonus is per rank's "
                                         "tokens; under torchrun it is not implemented"))
            bonus = EntropyBonus(args.entropy_coef, adaptive=args.use_adaptive_entropy, target=args.entropy_target,
                                 delta=args.entropy_coef_delta, coef_min=args.entropy_coef_min,
                                 coef_max=args.entropy_coef_max)
        variant = spec.is_variant()  # TRL objectives beyond the kernels'
        return Extensions(
            prompts=prompts or (None if args.shuffle_dataset else self._in_order),
            reward_post=self._reward_post,
            row_mask=self._mask_truncated if args.mask_truncated_completions else None,
            loss="variant" if variant else None, loss_options={"spec": spec} if variant else {}, entropy_bonus=bonus)

    @staticmethod
    def _prepare_model(model: torch.nn.Module, args: GRPOConfig) -> None:
        """TRL's model options, on the model before the trainer is built: disable_dropout, and
        cast_lm_head_to_fp32 (float32 runs only, checked by GRPOConfig: the head already is)."""
        if args.disable_dropout:
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        if args.cast_lm_head_to_fp32:
            model.get_output_embeddings().float()

    def _in_order(self, data: PromptDataset):
        """shuffle_dataset=False: TRL draws the prompts in dataset order."""
        return data, InOrderSampler(len(data), self.config.seed if self.config.data_seed is None else
                                    self.config.data_seed)

    def _reward_post(self, dataset, indices, rollout, repeat, rewards, per_func) -> torch.Tensor:
        """Every training scoring: kept for the step's TRL metrics (refill rounds too) and TRL's `_logs`, and
        with multi_objective_aggregation="normalize_then_sum" the rewards TRL trains on."""
        self._step_rollouts.append((rollout, rewards, per_func))
        self._record_logs(dataset, indices, rollout, repeat, per_func)
        if getattr(self.grpo_args, "multi_objective_aggregation", None) == "normalize_then_sum":
            rewards = normalize_then_sum(per_func, self.rewards.weights, repeat)
        return rewards

    def _mask_truncated(self, rollout, kept: torch.Tensor) -> torch.Tensor:
        """TRL's mask_truncated_completions: completions cut at max_completion_length (no stop token) are
        left out of the loss and of its token count."""
        truncated = truncated_rows(rollout, self.stop_ids, self.config.max_completion_tokens)
        return kept[~truncated[kept]]

    def _stream_prompts(self, data: PromptDataset):
        """A streamed train set (trl.data.StreamedPrompts): the prompt source and sampler are the stream's
        reader (`data`, its first rows, only checked them); shuffled with the seed's buffered shuffle, as TRL."""
        from dash_fast.data.formats import FORMATS

        a, stream = self.config, self._stream
        if getattr(self.grpo_args, "shuffle_dataset", True) and hasattr(stream, "shuffle"):
            stream = stream.shuffle(seed=a.seed if a.data_seed is None else a.data_seed)
        column = a.prompt_column if self.dataset_format == "prompt" else "prompt"

        def encode(row: dict, i: int) -> PromptDataset:
            return PromptDataset([row], self.tokenizer, name=f"train_dataset (streamed row {i})",
                                 prompt_column=column, max_prompt_tokens=a.max_prompt_tokens,
                                 system_prompt=a.system_prompt, use_chat_template=a.use_chat_template,
                                 chat_template_kwargs=a.chat_template_kwargs)

        adapt = None if self.dataset_format == "prompt" else FORMATS[self.dataset_format]
        # rows stay in memory for a few steps: the one being trained, one sampled ahead, refill rounds
        keep = a.prompts_per_step * (a.max_refill_rounds + 4)
        reader = StreamedPrompts(stream, encode, keep, prompt_column=column, adapt=adapt)
        return reader, reader

    def get_train_dataloader(self):
        """TRL's train DataLoader: one generation batch per item (each prompt repeated num_generations times),
        in the order the trainer draws them from now on (the trainer's own sampler is not advanced); a
        streamed train set is read by a single worker, as TRL does."""
        a, G = self.config, self.config.group_size
        if isinstance(self.train_data, StreamedPrompts):
            return stream_dataloader(self.train_data.stream, G, a.rows_per_step)  # (shuffled as training reads it)
        sampler = type(self.sampler)(self.sampler.n, self.sampler.seed)
        sampler.load_state_dict(self.sampler.state_dict())
        draws = -(-self.sampler.n // a.prompts_per_step)  # one pass over the prompts
        order = [i for _ in range(draws) for i in sampler.next(a.prompts_per_step) for _ in range(G)]
        workers = getattr(self.args, "dataloader_num_workers", 0)
        return rows_dataloader(self.train_data.rows, order, a.rows_per_step, workers)

    def get_eval_dataloader(self, eval_dataset: Any = None):
        """TRL's eval DataLoader: each prompt repeated num_generations_eval times, per_device_eval_batch_size
        rows per batch; a streamed eval set is read by one worker (the setting itself is left as it is)."""
        from dash_fast.data.prompts import load_rows

        source = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else \
            eval_dataset if eval_dataset is not None else self.eval_dataset
        if source is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        g, batch = self.num_generations_eval, getattr(self.args, "per_device_eval_batch_size", 8)
        if is_iterable_dataset(source):
            return stream_dataloader(source, g, batch)
        rows = load_rows(source)
        order = [i for i in range(len(rows)) for _ in range(g)]
        return rows_dataloader(rows, order, batch, getattr(self.args, "dataloader_num_workers", 0))

    @property
    def num_generations_eval(self) -> int:
        """TRL's num_generations_eval (default: num_generations)."""
        return getattr(self.args, "num_generations_eval", None) or self.config.group_size

    def emit(self, event: str, **kwargs) -> None:
        """DashTrainer's dispatch, plus TRL's epoch events and the control flags a callback may set in
        on_step_end: should_evaluate, should_save and should_log are acted on at that step, then reset."""
        if event == "on_step_begin":
            epoch = int(self._epoch(self.state.global_step))
            if epoch > self._epoch_fired:
                if self._epoch_fired >= 0:
                    super().emit("on_epoch_end")
                self._epoch_fired = epoch
                super().emit("on_epoch_begin")
        super().emit(event, **kwargs)
        if event != "on_step_end":
            return
        c, step = self.control, self.state.global_step
        if c.should_evaluate:
            c.should_evaluate = False
            if self.eval_data is not None:
                self.evaluate() if isinstance(self.args, GRPOConfig) else self.eval_during_training(step)
        if c.should_save:
            c.should_save = False
            self.save(step)
        if c.should_log:
            c.should_log = False
            if not (self.config.logging_steps and step % self.config.logging_steps == 0):  # not logged anyway
                super().emit("on_log", logs=self.state.log_history[-1])

    def end_training(self, summary: dict) -> None:
        """The epoch ends with the run; on_train_end waits: train() fires it after on_log of the final entry
        (train_loss, ...), as transformers does."""
        if self._epoch_fired >= 0:
            super().emit("on_epoch_end")

    def _epoch(self, step: int) -> float:
        """TrainerState.epoch after `step` steps: passes over the train set (a streamed one: the passes begun
        minus one, its length being unknown)."""
        if self._n_train is None:
            return float(self.train_data.epoch)
        return step * self.config.prompts_per_step / max(self._n_train, 1)

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def _prompt_dataset(self, dataset: Any, name: str):
        from dash_fast.data.prompts import load_rows

        a = self.config
        return PromptDataset(load_rows(dataset), self.tokenizer, name=name, prompt_column=a.prompt_column,
                             max_prompt_tokens=a.max_prompt_tokens, system_prompt=a.system_prompt,
                             use_chat_template=a.use_chat_template, chat_template_kwargs=a.chat_template_kwargs)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict:
        """TRL's evaluate(): `{prefix}_loss` and TRL's eval metrics (trl_eval.py) on `eval_dataset` (a dataset,
        an IterableDataset, a DatasetDict or dict of them: each set prefixed by its name, `eval_<name>_loss`),
        default the trainer's eval set(s). Like the HF Trainer it logs the metrics (state.log_history,
        on_log) and fires on_evaluate. DashTrainer.evaluate is the greedy-accuracy evaluation."""
        del ignore_keys  # no logits are returned to filter
        source = eval_dataset if eval_dataset is not None else \
            (self._eval_sets or self.eval_data if self._eval_sets or self.eval_data is not None else None)
        if source is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if isinstance(source, str):
            source = {source: (self._eval_sets or {})[source]}
        sets = dict(source) if isinstance(source, dict) else {None: source}
        metrics = {}
        for name, ds in sets.items():
            data = ds if isinstance(ds, PromptDataset) else \
                self._prompt_dataset(ds, "eval_dataset" if name is None else f"eval_dataset[{name!r}]")
            metrics.update(trl_evaluate(self, data, metric_key_prefix if name is None else
                                        f"{metric_key_prefix}_{name}"))
        metrics["epoch"] = self.state.epoch
        entry = {**metrics, "step": self.state.global_step}
        self.eval_history.append(entry)  # merged into log_history by train() (and saved in checkpoints)
        if not self._training:
            self.state.log_history.append(entry)
        self.emit("on_log", logs=metrics)
        self.emit("on_evaluate", metrics=metrics)
        return metrics

    def eval_during_training(self, step: int) -> dict:
        """The in-training evaluation, when TRL's schedule has one: every `eval_steps` steps with
        eval_strategy="steps", and before the first step with `eval_on_start` (DashTrainer's loop asks at
        step 0 and at the last step too). The metrics go to the log, not into the step's record."""
        if not isinstance(self.args, GRPOConfig):
            return super().eval_during_training(step)
        every = self.config.eval_every
        if (step == 0 and not self.args.eval_on_start) or (step > 0 and not (every and step % every == 0)):
            return {}
        self.evaluate()
        return {}

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """TRL's helper (trl_masks.high_entropy_mask); training applies trl_losses' own (per micro-batch)."""
        from dash_fast.trl.masks import high_entropy_mask

        return high_entropy_mask(entropies, mask, threshold)

    @staticmethod
    def get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
        """TRL's helper (trl_masks.off_policy_mask); training applies trl_losses' own (same formula)."""
        from dash_fast.trl.masks import off_policy_mask

        return off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)

    @property
    def ref_model(self) -> torch.nn.Module | None:
        return self.learner.ref_model

    @property
    def reward_funcs(self) -> list:
        return self.rewards.funcs

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.collector.stop_ids

    @stop_ids.setter
    def stop_ids(self, value: tuple[int, ...]) -> None:
        self.collector.set_stop_ids(value)

    def _record_logs(self, dataset, indices, rollout, repeat, per_func) -> None:
        """TRL's `trainer._logs` for the current step: each reward's values, the columns reward functions
        logged with `log_extra`, and (with log_completions) the prompts and completions."""
        logs = self._logs
        for k, name in enumerate(self.reward_names):
            logs["rewards"].setdefault(name, []).extend(per_func[:, k].tolist())
        for column, values in self.rewards.logs["extra"].items():  # accumulated over this step's scorings
            logs["extra"][column] = list(values)
        if getattr(self.args, "log_completions", False):
            logs["prompt"] += [dataset.rows[i][dataset.prompt_column] for i in indices for _ in range(repeat)]
            logs["completion"] += self.tokenizer.batch_decode(rollout.completion_token_lists(), skip_special_tokens=True)

    @property
    def liger_loss(self):
        """TRL's Liger loss module: dash-fast's use_liger_kernel=True runs dash_kernels' Liger adapter instead."""
        raise NotImplementedError("dash-fast does not support GRPOTrainer.liger_loss=accessed: use_liger_kernel=True "
                                  "runs the loss through dash_kernels.liger_adapter inside the learner")

    def begin_step(self, step: int) -> None:
        """A new step's TRL `_logs` and rollouts (filled by `_reward_post` as the collector scores)."""
        self._step_rollouts = []
        self._logs = {"prompt": [], "completion": [], "rewards": {}, "extra": {}}

    def finish_step(self, step: int, record: dict) -> dict:
        """DashTrainer's step record, plus TRL's names for the same numbers (trl/logs.py); then sync_ref_model."""
        from dash_fast.engines.base import Rollout
        from dash_fast.trl.logs import rollout_metrics

        self.state.epoch = self._epoch(step)
        record.update({"learning_rate": record["lr"], "step_time": record["time_step_s"],
                       "clip_ratio/region_mean": record.get("clip_fraction", 0.0), "epoch": self.state.epoch})
        if self._step_rollouts:
            rollout = Rollout.concat([r for r, _, _ in self._step_rollouts], self.pad_id)
            rewards = torch.cat([r for _, r, _ in self._step_rollouts])
            per_func = torch.cat([f for _, _, f in self._step_rollouts])
            record.update(rollout_metrics([len(p) for p in rollout.prompt_ids], rollout, rewards, per_func,
                                          self.reward_names, self.config.group_size, self.stop_ids,
                                          self.config.max_completion_tokens))
        bonus = self.learner.entropy_bonus
        if bonus is not None:
            contribution = bonus.take_contribution()
            if "loss" in record:  # TRL's policy_loss: the loss before the bonus is subtracted
                record["policy_loss"] = record["loss"] + contribution / max(record.get("optimizer_steps", 1), 1)
                record["entropy_coef"] = bonus.coef
        self._sync_ref_model()
        return record

    @property
    def entropy_coef(self) -> float:
        """TRL's trainer.entropy_coef: the entropy bonus coefficient now (moved by the adaptive controller)."""
        bonus = self.learner.entropy_bonus
        return 0.0 if bonus is None else bonus.coef

    @entropy_coef.setter
    def entropy_coef(self, value: float) -> None:
        bonus = self.learner.entropy_bonus
        if bonus is not None:
            bonus.set_coef(value)
        elif value != 0:
            raise ValueError(refusal("entropy_coef", value, "set after construction without an entropy bonus "
                                     "configured (pass entropy_coef in GRPOConfig)"))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The HF Trainer's log(): `logs` (with epoch and step) into state.log_history, and on_log. The loop's own
        logs do not pass through here (an override of log() is refused at train())."""
        del start_time
        entry = {**logs, "epoch": self.state.epoch, "step": self.state.global_step}
        self._extra_logs.append(entry)  # merged into log_history by train()
        if not self._training:
            self.state.log_history.append(entry)
        self.emit("on_log", logs=logs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's helper, same signature and return (trl/masks.per_token_logps_and_entropies at the run's
        temperature; entropies with gradient only while the entropy bonus is on, as TRL). Training does not
        call it (the learner's own forward and kernels compute the same numbers)."""
        given = sorted(k for k, v in multimodal.items() if v is not None)
        if given:
            raise NotImplementedError(refusal(given[0], "...", "vision-language inputs are not supported"))
        if compute_aux_loss:
            raise NotImplementedError(refusal("compute_aux_loss", True, "the MoE load-balancing loss is not added"))
        return per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, self.config.temperature,
                                             batch_size, compute_entropy, self._entropy_bonus_enabled)

    def saved(self, step: int, path: str) -> None:
        """TRL's checkpoint layout beside DashTrainer's checkpoints/step-N: `output_dir/checkpoint-N` (a link to
        it) with `trainer_state.json`. Links whose checkpoint `save_total_limit` removed are dropped."""
        self.state.save_to_json(os.path.join(path, "trainer_state.json"))
        link = os.path.join(self.output_dir, f"checkpoint-{step}")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(path, self.output_dir), link)
        for name in os.listdir(self.output_dir):
            entry = os.path.join(self.output_dir, name)
            if name.startswith("checkpoint-") and os.path.islink(entry) and not os.path.exists(entry):
                os.remove(entry)

    def _sync_ref_model(self) -> None:
        """TRL's sync_ref_model: every `ref_model_sync_steps` optimizer steps,
        ref <- alpha * policy + (1 - alpha) * ref (TRL's SyncRefModelCallback)."""
        a = self.grpo_args
        if not isinstance(a, GRPOConfig) or not a.sync_ref_model or self.ref_model is None:
            return
        syncs = self.learner.weights_version // a.ref_model_sync_steps
        if syncs <= self._ref_syncs:
            return
        self._ref_syncs = syncs
        with torch.no_grad():
            for ref, cur in zip(self.ref_model.parameters(), self.model.parameters(), strict=True):
                ref.mul_(1.0 - a.ref_model_mixup_alpha).add_(cur.detach().to(ref.dtype), alpha=a.ref_model_mixup_alpha)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """TRL's train(): returns a transformers TrainOutput(global_step, training_loss, metrics).
        Afterwards `state.log_history` is TRL's: one averaged entry per `logging_steps` steps, then the
        final entry (train_loss, train_runtime, ... and the metrics of the steps since the last log);
        dash-fast's per-step records stay in `step_records`."""
        from transformers.trainer_utils import TrainOutput

        from dash_fast.trl.logs import log_entries

        if kwargs:
            raise NotImplementedError(f"GRPOTrainer.train: {sorted(kwargs)} not supported by dash-fast")
        for name, own in _OWN_INTERNALS.items():  # an override of a TRL internal would be silently ignored
            if name in self.__dict__ or getattr(type(self), name) is not own:
                raise NotImplementedError(f"dash-fast does not support GRPOTrainer.{name}=overridden: "
                                          f"{_TRL_INTERNALS[name]}, so the override would not run")
        if resume_from_checkpoint:
            self.config.resume = "auto" if resume_from_checkpoint is True else str(resume_from_checkpoint)
        # the loop appends per-step records (a second train() call continues from them); evaluations made
        # outside train() are in eval_history, merged back below
        self.state.log_history = list(self.step_records or [])
        self._training = True
        try:
            summary = super().train()
        finally:
            self._training = False
        self.step_records = list(self.state.log_history)
        losses = [r["loss"] for r in self.step_records if isinstance(r.get("loss"), float)]
        runtime = summary["rl_wall_time_s"]
        metrics = {"train_runtime": runtime, "train_steps_per_second": self.state.global_step / max(runtime, 1e-9),
                   "train_loss": sum(losses) / len(losses) if losses else 0.0, "train_steps": summary["steps"]}
        entries, pending = log_entries(self.step_records, self.config.logging_steps)
        final = {**pending, **metrics, "epoch": self.state.epoch, "step": self.state.global_step}
        # TRL's order: a step's train log, then its evaluation; the final entry last
        ordered = [(e["step"], 0, e) for e in entries] + [(e["step"], 1, e) for e in self.eval_history] + \
            [(e["step"], 1, e) for e in self._extra_logs]
        self.state.log_history = [e for _, _, e in sorted(ordered, key=lambda t: t[:2])] + [final]
        super().emit("on_log", logs=final)
        super().emit("on_train_end")  # the epoch's end already fired, before the final on_log
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    # TRL internals the loop does not go through: refused when called (and when overridden, at train())
    training_step = _trl_internal("training_step")
    compute_loss = _trl_internal("compute_loss")
    _compute_loss = _trl_internal("_compute_loss")
    _prepare_inputs = _trl_internal("_prepare_inputs")
    _generate_and_score_completions = _trl_internal("_generate_and_score_completions")
    _generate = _trl_internal("_generate")
    _generate_single_turn = _trl_internal("_generate_single_turn")
    _calculate_rewards = _trl_internal("_calculate_rewards")
    prediction_step = _trl_internal("prediction_step")

    def save_model(self, output_dir: str | None = None) -> None:
        """Save the model and tokenizer in HF format (rank 0)."""
        if not self.dist.is_main:
            return
        output_dir = output_dir or self.config.output_dir
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)


_OWN_INTERNALS = {name: GRPOTrainer.__dict__[name] for name in _TRL_INTERNALS}
