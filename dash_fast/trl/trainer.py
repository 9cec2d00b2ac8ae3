"""Drop-in for TRL: `from dash_fast import GRPOTrainer, GRPOConfig` in place of `from trl import ...`.

GRPOTrainer is an adapter over the core trainer: it maps a GRPOConfig onto a DashConfig (trl/config.py),
checks and loads TRL's inputs (trl/inputs.py), builds a DashTrainer through the core's declared extension
points (trainer.Extensions, trl/extensions.py: prompt order or a streamed train set, reward post-processing,
the truncated-row mask, TRL's loss variants by name from the loss registry; and DashTrainer's
extension-point methods: callback events, step records (trl/steps.py), evaluation schedule, checkpoint
layout, end of training), and presents TRL's public API on top (train, evaluate, log, save_model,
dataloaders, TRL's helpers; TRL internals the loop does not use are refused, trl/internals.py). Every
difference from TRL is listed in docs/trl.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dash_fast.config import DashConfig
from dash_fast.data.prompts import PromptDataset, load_rows
from dash_fast.rewards.reward_models import RewardModelFunc
from dash_fast.trainer import DashTrainer
from dash_fast.trl import data as trl_data
from dash_fast.trl import inputs
from dash_fast.trl.checkpoints import link_checkpoint
from dash_fast.trl.config import GRPOConfig, loss_warnings, refusal
from dash_fast.trl.eval import evaluate_sets, prompt_dataset
from dash_fast.trl.extensions import normalize_then_sum, trl_extensions, truncated_rows
from dash_fast.trl.internals import RefusedInternals, check_not_overridden
from dash_fast.trl.logs import train_log_history, train_metrics
from dash_fast.trl.masks import high_entropy_mask, off_policy_mask, per_token_logps_and_entropies
from dash_fast.trl.steps import Epochs, RefModelSync, StepLog

__all__ = ["GRPOConfig", "GRPOTrainer", "loss_warnings", "normalize_then_sum", "truncated_rows"]


class GRPOTrainer(DashTrainer, RefusedInternals):
    """TRL's GRPOTrainer signature on dash-fast's trainer. `args` is a GRPOConfig (or a DashConfig);
    callbacks are transformers.TrainerCallback instances (or classes) and receive the GRPOConfig.
    `rollout_engine` is dash-fast's own (not TRL's): DashTrainer's factory of the sampler, default the embedded
    engine or vLLM as configured."""

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
        rollout_engine: Any = None,
    ) -> None:
        inputs.check_optimizers(optimizers)
        args = inputs.default_args(model) if args is None else args
        model, reward_funcs, self.reward_processing_classes, rows, streamed = inputs.trl_inputs(
            model, reward_funcs, args, train_dataset, eval_dataset, reward_processing_classes, peft_config)
        inputs.check_model(model)
        self.grpo_args = args
        names = [getattr(f, "__name__", type(f).__name__) if not isinstance(f, str) else f for f in reward_funcs]
        dash_args = args.to_dash_config(inputs.world_size(), None if streamed else len(rows), names) \
            if isinstance(args, GRPOConfig) else args
        named_eval = dict(eval_dataset) if isinstance(eval_dataset, dict) else None  # DatasetDict is a dict
        first_eval = next(iter(named_eval.values())) if named_eval else eval_dataset
        self._stream = train_dataset if streamed else None
        self.step_log = StepLog(self)
        extensions = trl_extensions(args, dash_args, self._stream_prompts if streamed else None,
                                    self.step_log.reward_post, self._mask_truncated)
        super().__init__(model, reward_funcs, args=dash_args, train_dataset=rows,
                         eval_dataset=None if first_eval is None else load_rows(first_eval),
                         processing_class=processing_class,
                         callbacks=[cb() if isinstance(cb, type) else cb for cb in (callbacks or [])],
                         extensions=extensions, rollout_engine=rollout_engine)
        self.callback_args = self.args = args  # TRL's trainer.args; the loop reads self.config (the DashConfig)
        self._eval_sets = None
        if named_eval:  # TRL: a dict of eval sets is evaluated set by set, metrics prefixed by its name
            self._eval_sets = {name: prompt_dataset(self.config, self.tokenizer, ds, f"eval_dataset[{name!r}]")
                               for name, ds in named_eval.items()}
        for func in self.rewards.funcs:
            if isinstance(func, RewardModelFunc):
                func.to(self.device)
        self.processing_class = self.tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.ref_sync = RefModelSync(args.ref_model_sync_steps, args.ref_model_mixup_alpha) \
            if isinstance(args, GRPOConfig) and args.sync_ref_model else None
        self._training = False  # inside train(): evaluate() leaves state.log_history (the step records) alone
        self._extra_logs: list[dict] = []  # what log() was given
        self.use_adaptive_entropy = bool(getattr(args, "use_adaptive_entropy", False))
        self.step_records: list[dict] | None = None
        self.epochs = Epochs(self.train_data, None if streamed else len(rows), self.config.prompts_per_step,
                             super().emit)
        self.aux_loss_enabled = False  # output_router_logits=True is refused (inputs.check_model)
        inputs.enable_trl_gradient_checkpointing(self.model, args)
        self._entropy_bonus_enabled = self.learner.entropy_bonus is not None  # TRL's flag (entropies with grad)
        self.emit("on_init_end")

    # ------------------------------------------------------------------ hooks given to the core (Extensions)
    def _mask_truncated(self, rollout, kept: torch.Tensor) -> torch.Tensor:
        """TRL's mask_truncated_completions: completions cut at max_completion_length (no stop token) are
        left out of the loss and of its token count."""
        truncated = truncated_rows(rollout, self.stop_ids, self.config.max_completion_tokens)
        return kept[~truncated[kept]]

    def _stream_prompts(self, data: PromptDataset):
        """A streamed train set's reader as the prompt source and sampler (`data`, its first rows, only
        checked them)."""
        return trl_data.streamed_prompt_source(self._stream, self.config, self.tokenizer, self.dataset_format,
                                               getattr(self.grpo_args, "shuffle_dataset", True))

    # ------------------------------------------------------------------ the core's extension points
    def begin_step(self, step: int) -> None:
        """A new step's TRL `_logs` and scorings (filled by the reward hook as the collector scores)."""
        self.step_log.begin()

    def finish_step(self, step: int, record: dict) -> dict:
        """DashTrainer's step record, plus TRL's names for the same numbers (trl/steps.py); then sync_ref_model."""
        self.state.epoch = self.epochs.at(step)
        self.step_log.add_metrics(record)
        if self.ref_sync is not None and self.ref_model is not None:
            self.ref_sync(self.learner.weights_version, self.ref_model, self.model)
        return record

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

    def saved(self, step: int, path: str) -> None:
        """TRL's checkpoint layout beside DashTrainer's checkpoints/step-N: `output_dir/checkpoint-N` (a link to
        it) with `trainer_state.json`. Links whose checkpoint `save_total_limit` removed are dropped."""
        self.state.save_to_json(os.path.join(path, "trainer_state.json"))
        link_checkpoint(self.output_dir, step, path)

    def emit(self, event: str, **kwargs) -> None:
        """DashTrainer's dispatch, plus TRL's epoch events and the control flags a callback may set in
        on_step_end: should_evaluate, should_save and should_log are acted on at that step, then reset."""
        if event == "on_step_begin":
            self.epochs.step_begins(self.state.global_step)
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
        self.epochs.training_ends()

    # ------------------------------------------------------------------ TRL's Trainer API
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """TRL's train(): returns a transformers TrainOutput(global_step, training_loss, metrics).
        Afterwards `state.log_history` is TRL's: one averaged entry per `logging_steps` steps, then the
        final entry (train_loss, train_runtime, ... and the metrics of the steps since the last log);
        dash-fast's per-step records stay in `step_records`."""
        from transformers.trainer_utils import TrainOutput

        if kwargs:
            raise NotImplementedError(f"GRPOTrainer.train: {sorted(kwargs)} not supported by dash-fast")
        check_not_overridden(self, GRPOTrainer)  # an override of a TRL internal would be silently ignored
        resume = "auto" if resume_from_checkpoint is True else (str(resume_from_checkpoint) if resume_from_checkpoint else None)
        # the loop appends per-step records (a second train() call continues from them); evaluations made
        # outside train() are in eval_history, merged back below
        self.state.log_history = list(self.step_records or [])
        self._training = True
        try:
            summary = super().train(resume)
        finally:
            self._training = False
        self.step_records = list(self.state.log_history)
        metrics = train_metrics(self.step_records, summary, self.state.global_step)
        self.state.log_history = train_log_history(self.step_records, self.config.logging_steps,
                                                   self.eval_history + self._extra_logs, metrics, self.state.epoch,
                                                   self.state.global_step)
        super().emit("on_log", logs=self.state.log_history[-1])
        super().emit("on_train_end")  # the epoch's end already fired, before the final on_log
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict:
        """TRL's evaluate(): `{prefix}_loss` and TRL's eval metrics (trl_eval.py) on `eval_dataset` (a dataset,
        an IterableDataset, a DatasetDict or dict of them: each set prefixed by its name, `eval_<name>_loss`),
        default the trainer's eval set(s). Like the HF Trainer it logs the metrics (state.log_history,
        on_log) and fires on_evaluate. DashTrainer.evaluate is the greedy-accuracy evaluation."""
        del ignore_keys  # no logits are returned to filter
        source = eval_dataset if eval_dataset is not None else self._eval_sets or self.eval_data
        if source is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if isinstance(source, str):
            source = {source: (self._eval_sets or {})[source]}
        metrics = evaluate_sets(self, dict(source) if isinstance(source, dict) else {None: source}, metric_key_prefix)
        metrics["epoch"] = self.state.epoch
        entry = {**metrics, "step": self.state.global_step}
        self.eval_history.append(entry)  # merged into log_history by train() (and saved in checkpoints)
        if not self._training:
            self.state.log_history.append(entry)
        self.emit("on_log", logs=metrics)
        self.emit("on_evaluate", metrics=metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The HF Trainer's log(): `logs` (with epoch and step) into state.log_history, and on_log. The loop's own
        logs do not pass through here (an override of log() is refused at train())."""
        del start_time
        entry = {**logs, "epoch": self.state.epoch, "step": self.state.global_step}
        self._extra_logs.append(entry)  # merged into log_history by train()
        if not self._training:
            self.state.log_history.append(entry)
        self.emit("on_log", logs=logs)

    def save_model(self, output_dir: str | None = None) -> None:
        """Save the model and tokenizer in HF format (rank 0)."""
        if not self.dist.is_main:
            return
        output_dir = output_dir or self.config.output_dir
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def get_train_dataloader(self):
        """TRL's train DataLoader (trl/data.train_dataloader): the generation batches training draws next."""
        return trl_data.train_dataloader(self.train_data, self.sampler, self.config,
                                         getattr(self.args, "dataloader_num_workers", 0))

    def get_eval_dataloader(self, eval_dataset: Any = None):
        """TRL's eval DataLoader: each prompt repeated num_generations_eval times, per_device_eval_batch_size
        rows per batch; a streamed eval set is read by one worker (the setting itself is left as it is)."""
        source = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else \
            eval_dataset if eval_dataset is not None else self.eval_dataset
        return trl_data.eval_dataloader(source, self.num_generations_eval,
                                        getattr(self.args, "per_device_eval_batch_size", 8),
                                        getattr(self.args, "dataloader_num_workers", 0))

    # ------------------------------------------------------------------ TRL's attributes and helpers
    @property
    def num_generations_eval(self) -> int:
        """TRL's num_generations_eval (default: num_generations)."""
        return getattr(self.args, "num_generations_eval", None) or self.config.group_size

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

    @property
    def _logs(self) -> dict:
        """TRL's `trainer._logs` for the current step (trl/steps.StepLog)."""
        return self.step_log.logs

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

    @property
    def liger_loss(self):
        """TRL's Liger loss module: dash-fast's use_liger_kernel=True runs dash_kernels' Liger adapter instead."""
        raise NotImplementedError("dash-fast does not support GRPOTrainer.liger_loss=accessed: use_liger_kernel=True "
                                  "runs the loss through dash_kernels.liger_adapter inside the learner")

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """TRL's helper (trl_masks.high_entropy_mask); training applies trl_losses' own (per micro-batch)."""
        return high_entropy_mask(entropies, mask, threshold)

    @staticmethod
    def get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
        """TRL's helper (trl_masks.off_policy_mask); training applies trl_losses' own (same formula)."""
        return off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's helper, same signature and return (trl/masks.per_token_logps_and_entropies at the run's
        temperature; entropies with gradient only while the entropy bonus is on, as TRL). Training does not
        call it (the learner's own forward and kernels compute the same numbers)."""
        return per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, self.config.temperature,
                                             batch_size, compute_entropy, self._entropy_bonus_enabled,
                                             compute_aux_loss, **multimodal)
