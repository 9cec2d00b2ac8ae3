"""Drop-in for TRL: `from dash_fast import GRPOTrainer, GRPOConfig` in place of `from trl import ...`.

GRPOConfig takes TRL's GRPO argument names (and the Hugging Face TrainingArguments that TRL scripts
routinely pass), plus dash-fast's own (filter_tau, overlap, loss_impl, ...), and maps them onto a
DashConfig. Every name is checked: a TRL argument dash-fast does not support is an error that names it,
an unknown name suggests the nearest known one.

Differences from TRL worth knowing:
- One optimizer step samples one rollout of `per_device_train_batch_size x world_size x
  gradient_accumulation_steps` completions (`num_generations` per prompt), as TRL's defaults do.
  `steps_per_generation` (or `generation_batch_size`) > that gives PPO "Mini" minibatches, and
  `num_iterations` gives K epochs over a rollout; TRL's `max_steps` counts optimizer steps and is
  converted to rollouts (dash-fast's steps, which `state.global_step` counts).
- The DASH gradient filter is on (`filter_tau=0.1`); `filter_tau=None` gives plain GRPO.
- `per_device_train_batch_size` only sets the micro-batch token budget
  (`micro_batch_tokens = per_device_train_batch_size x (max_prompt_length + max_completion_length)`)
  unless `micro_batch_tokens` is given; micro-batches pack rows by tokens.
- `bf16=True` trains fp32 master weights with bf16 compute, as TRL's autocast (mixed_precision.py: the
  sampler reads a bf16 copy refreshed after each optimizer step); `fp16=True` is refused (no loss scaler);
  the default is float32.
  `gradient_checkpointing` defaults to False (TRL: True); when on, training runs the model's own forward
  (checkpointed per decoder layer), not the shared-prompt forward.
- Prompts longer than `max_prompt_length` are an error naming the row (TRL truncates them).
- `reward_funcs` entries may be reward models (an id / path or a loaded sequence-classification model,
  reward_models.py): scored as TRL does, on the chat-rendered prompt + completion, logit of class 0.
- LoRA / PEFT (`peft_config` or a PeftModel, peft_support.py): only adapters train; generation and the
  training forward run the model's own forward (the static engine and shared-prompt forward read base
  weights). With `beta > 0` the reference is, as in TRL, the base with adapters disabled (`peft_config`)
  or a frozen copy of the adapter, "ref" (a PeftModel passed in); no copy of the base weights;
  `sync_ref_model` is refused with PEFT (as TRL). A LoRA adapter on lm_head and prompt-learning methods are
  refused.
- `loss_type`: dapo and bnpo are DashConfig's token-mean over the whole rollout (bnpo's local-batch
  count is the rollout's here), grpo is seq-mean-token-mean, dr_grpo is dr_grpo. cispo / sapo / luspo /
  vespo, `importance_sampling_level="sequence"` (GSPO), `delta`, `top_entropy_quantile < 1`,
  `off_policy_mask_threshold` and `use_bias_correction_kl=True` with `beta > 0` (TRL's default) are TRL's
  formulas in trl_losses.py: such a run trains on that path, which materialises the logits of one
  micro-batch (memory bounded by the micro-batch token budget; `loss_impl` is then not used for the
  loss). Its entropy quantile is over the micro-batch's tokens (see trl_losses). The entropy bonus
  (`entropy_coef`, `use_adaptive_entropy`, `entropy_target`, `entropy_coef_*`) is trl_losses.EntropyBonus:
  coef x the mean entropy of the optimizer step's tokens, the controller stepping once per optimizer step;
  logged as TRL's `policy_loss` / `entropy_coef`; refused under torchrun and with top_entropy_quantile < 1.
  The adaptive controller's state is saved in checkpoints (a resumed run continues it exactly).
- `multi_objective_aggregation="normalize_then_sum"`: each reward normalised in its group, weighted sum,
  then divided by the batch std (TRL's formula; scale_rewards is then "batch").
- `sync_ref_model`: ref <- alpha * policy + (1 - alpha) * ref every `ref_model_sync_steps` optimizer steps.
- Evaluation is TRL's (trl_eval.py): `evaluate()` samples `num_generations_eval` completions per prompt with
  the training sampling settings, in batches of `per_device_eval_batch_size` rows, and returns `eval_loss`
  (the training loss at ratio 1, no gradient, on every row: the DASH filter selects training rows only) and
  TRL's eval metrics (`eval_reward`, `eval_rewards/<name>/mean`, `eval_completions/*`, ...); a dict /
  DatasetDict of eval sets gives `eval_<name>_*`; an IterableDataset eval set is read whole at each
  evaluation. In training: every `eval_steps` with eval_strategy="steps", before the first step with
  `eval_on_start`; entries in `log_history` as TRL's. Not under torchrun (DashTrainer.evaluate is).
- `state.log_history` after `train()` is TRL's: one entry per `logging_steps` steps with the means of
  TRL's metrics over them (`reward`, `reward_std`, `rewards/<name>/mean|std`, `frac_reward_zero_std`,
  `kl`, `entropy`, `clip_ratio/region_mean`, `num_tokens`, `completions/*`, `loss`, `grad_norm`,
  `learning_rate`, `epoch`, `step_time`) and dash-fast's own (`kept_fraction`, `time_*_s`), then the
  final entry with `train_loss` / `train_runtime` and the metrics of the steps since the last log.
  The per-step records stay in `trainer.step_records`.
- Sampling: temperature, top_k, top_p, `min_p`, `repetition_penalty` (transformers' processors, in
  generate()'s order; the log-probs stay those of the tempered distribution, as the trainer recomputes them)
  on the embedded engine; with `use_vllm=True` min_p / repetition_penalty are refused. `generation_kwargs`
  may override top_k / top_p / min_p / repetition_penalty; other keys (num_beams > 1, length_penalty, a
  different temperature, ...) are refused naming the key. `chat_template_kwargs` reach apply_chat_template
  for prompts and chat-rendered reward-model texts.
- Datasets: a streamed train set (`IterableDataset`, trl_data.py) is read as training draws prompts
  (`max_steps` required, as TRL; shuffled with the seed unless `shuffle_dataset=False`; a new pass when it
  ends; resumable by re-reading); `dispatch_batches` / `dataloader_num_workers` follow TRL's rules for
  iterable sets. `get_train_dataloader()` / `get_eval_dataloader()` return DataLoaders of TRL's batches
  (lists of rows, each prompt repeated), for inspection: training does not read them.
- `mask_truncated_completions` drops completions cut without a stop token from the loss (one process only);
  `shuffle_dataset=False` draws prompts in dataset order; image columns are refused.
- Checkpoints: `output_dir/checkpoint-N` links to dash-fast's `checkpoints/step-N` (model or PEFT adapters,
  tokenizer, exact-resume state) and holds `trainer_state.json`; `save_total_limit` keeps the last N;
  `train(resume_from_checkpoint=True | path)` resumes bit-exactly, a LoRA run too (its adapters are loaded
  from the checkpoint's PEFT files onto the base the trainer was given; AdamW state covers the adapters only).
- Callbacks get TRL's events (`on_init_end`, `on_train_begin`, `on_epoch_begin/end`, `on_step_begin`,
  `on_substep_end`, `on_pre_optimizer_step`, `on_optimizer_step`, `on_step_end`, `on_log` (also for the
  final entry, before `on_train_end`, as transformers), `on_evaluate`, `on_save`, `on_train_end`; the
  substeps are the learner's micro-batches, callbacks.py) and their `control.should_training_stop /
  should_evaluate / should_save / should_log` are honoured. `trainer.args` is the GRPOConfig (TRL's config:
  every TrainingArguments field reads back, `generation_batch_size` / `steps_per_generation` resolved, an
  AcceleratorConfig); the loop reads `trainer.config`, the DashConfig it maps to. `log()` adds an entry.
- TRL internals the loop does not go through (`training_step`, `compute_loss`, `_prepare_inputs`, `_generate`,
  `_generate_and_score_completions`, `prediction_step`, ...) are refused when called, and a subclass or
  patch overriding one (or `log`, `_get_per_token_logps_and_entropies`) is refused at train(), since the
  override would not run. `_get_per_token_logps_and_entropies` itself works (TRL's signature and return).
- `logging_strategy="no"`: no log entries but the final one (the run's metrics averaged into it).
- Accepted with no effect: dataloader_num_workers, dataloader_pin_memory, logging_dir, run_name,
  remove_unused_columns (every column reaches the reward functions, as TRL's default),
  per_device_eval_batch_size, logging_first_step, overwrite_output_dir, do_train, do_eval,
  log_completions, num_completions_to_print, ddp_find_unused_parameters, vllm_gpu_memory_utilization,
  pad_to_multiple_of (micro-batches are packed and padded by the trainer; padding does not change the
  loss), log_multimodal, and any other TrainingArguments option at its default value.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dash_fast.config import ALIASES, ConfigError, DashConfig, did_you_mean
from dash_fast.data.prompts import PromptDataset
from dash_fast.losses import EntropyBonus, TrlLoss
from dash_fast.models.loading import attn_implementation, check_text_only
from dash_fast.trainer import DashTrainer, Extensions
from dash_fast.trl.data import (
    StreamedPrompts,
    is_iterable_dataset,
    peek_rows,
    rows_dataloader,
    stream_dataloader,
)
from dash_fast.trl.eval import trl_evaluate
from dash_fast.trl.extensions import InOrderSampler, normalize_then_sum, truncated_rows

logger = logging.getLogger(__name__)

# TRL GRPOConfig names beyond TrainingArguments (trl 1.16), so that those dash-fast lacks are told apart
# from typos without importing trl.
_TRL_ONLY = """beta cache_implementation cast_lm_head_to_fp32 chat_template_kwargs delta disable_dropout
ds3_gather_for_generation entropy_coef entropy_coef_delta entropy_coef_max entropy_coef_min entropy_target
epsilon epsilon_high generation_batch_size generation_kwargs importance_sampling_level log_completions
log_completions_hub_repo log_multimodal log_unique_prompts loss_type mask_truncated_completions
max_completion_length max_prompt_length max_tool_calling_iterations min_p model_init_kwargs
multi_objective_aggregation num_completions_to_print num_generations num_generations_eval num_iterations
off_policy_mask_threshold pad_to_multiple_of ref_model_mixup_alpha ref_model_sync_steps repetition_penalty
reward_weights router_aux_loss_coef sapo_temperature_neg sapo_temperature_pos scale_rewards shuffle_dataset
steps_per_generation sync_ref_model temperature top_entropy_quantile top_k top_p
transformers_continuous_batching_config trust_remote_code use_adaptive_entropy use_bias_correction_kl
use_transformers_continuous_batching use_transformers_paged use_vllm vespo_k_neg vespo_k_pos
vespo_lambda_neg vespo_lambda_pos vllm_enable_sleep_mode vllm_gpu_memory_utilization vllm_group_port
vllm_importance_sampling_cap vllm_importance_sampling_clip_max vllm_importance_sampling_clip_min
vllm_importance_sampling_correction vllm_importance_sampling_mode vllm_max_model_length vllm_mode
vllm_model_impl vllm_server_base_url vllm_server_host vllm_server_port vllm_server_timeout
vllm_structured_outputs_regex vllm_tensor_parallel_size""".split()

# Arguments accepted only at these values: name -> (accepted values, why others are refused). A refusal
# reads "dash-fast does not support <name>=<value>: <why>".
_ONLY: dict[str, tuple[tuple, str]] = {
    "importance_sampling_level": (("token", "sequence"), "TRL 1.16 knows 'token' and 'sequence'"),
    "multi_objective_aggregation": (("sum_then_normalize", "normalize_then_sum"), "unknown aggregation"),
    "vllm_mode": (("colocate",), "only the in-process vLLM engine exists"),
    "logging_strategy": (("steps", "no"), "logs are written every logging_steps steps"),
    "save_strategy": (("steps", "no"), "checkpoints are written every save_steps steps"),
    "eval_strategy": (("no", "steps"), "evaluation runs every eval_steps steps"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "the optimizer is torch AdamW"),
    "adam_epsilon": ((1e-8,), "AdamW uses torch's default eps"),
    "torch_compile": ((False,), "the model is not compiled"),
    "push_to_hub": ((False,), "nothing is uploaded"),
    "cache_implementation": ((None,), "the embedded engine manages its own KV cache"),
    "use_transformers_paged": ((False,), "generation goes through dash-fast's own engines"),
    "use_transformers_continuous_batching": ((False,), "generation goes through dash-fast's own engines"),
    "max_tool_calling_iterations": ((None,), "tool calling is not supported"),
    "router_aux_loss_coef": ((None,), "the MoE load-balancing loss is not added"),
    "log_unique_prompts": ((False,), "completion tables are not logged"),
    "log_completions_hub_repo": ((None,), "nothing is uploaded"),
}
# TRL loss types: the ones that are a different aggregation of dash-fast's clipped surrogate map onto
# DashConfig.loss_agg; bnpo normalises by the tokens of the local batch, which is dapo's global count here
# (one rollout is one batch). The others change the per-token objective.
# cispo / sapo / luspo / vespo change the per-token objective: trl_losses.py computes them (luspo's
# per-row sum is dr_grpo's weights times max_completion_tokens, see trl_losses).
_LOSS_TYPES = {"dapo": "token-mean", "bnpo": "token-mean", "dr_grpo": "dr_grpo", "grpo": "seq-mean-token-mean",
               "cispo": "token-mean", "vespo": "token-mean", "sapo": "seq-mean-token-mean", "luspo": "dr_grpo"}
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


@dataclass(init=False)
class GRPOConfig:
    """TRL's GRPOConfig names (TRL's defaults unless noted in the module docstring) -> DashConfig."""

    # --- run / TrainingArguments ---
    output_dir: str | None = None
    max_steps: int = -1
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    warmup_ratio: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch_fused"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    data_seed: int | None = None
    bf16: bool | None = None
    fp16: bool = False
    use_cpu: bool = False
    gradient_checkpointing: bool = False
    activation_checkpointing: bool = False  # transformers 5's name for gradient_checkpointing
    logging_steps: float = 10
    logging_strategy: str = "steps"
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    eval_strategy: str = "no"
    eval_steps: float | None = None
    report_to: str | list[str] | None = "none"
    disable_tqdm: bool | None = None
    torch_compile: bool = False
    push_to_hub: bool = False
    use_liger_kernel: bool = False
    # --- TRL GRPO ---
    num_generations: int = 8
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    num_iterations: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str | bool = "group"
    reward_weights: list[float] | None = None
    max_prompt_length: int | None = 512
    max_completion_length: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    disable_dropout: bool = False
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    shuffle_dataset: bool = True
    mask_truncated_completions: bool = False
    importance_sampling_level: str = "token"
    multi_objective_aggregation: str = "sum_then_normalize"
    min_p: float | None = None
    repetition_penalty: float = 1.0
    delta: float | None = None
    top_entropy_quantile: float = 1.0
    sync_ref_model: bool = False
    model_init_kwargs: dict | None = None
    trust_remote_code: bool = False
    generation_kwargs: dict | None = None
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    chat_template_kwargs: dict | None = None
    cache_implementation: str | None = None
    use_transformers_paged: bool = False
    use_transformers_continuous_batching: bool = False
    max_tool_calling_iterations: int | None = None
    router_aux_loss_coef: float | None = None
    log_unique_prompts: bool = False
    log_completions_hub_repo: str | None = None
    use_bias_correction_kl: bool = True
    cast_lm_head_to_fp32: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # --- accepted: what dash-fast does already (see the module docstring) ---
    eval_on_start: bool = False
    num_generations_eval: int | None = None
    pad_to_multiple_of: int | str | None = "auto"
    log_multimodal: bool = True
    # --- accepted, no effect (see the module docstring) ---
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    logging_dir: str | None = None
    run_name: str | None = None
    remove_unused_columns: bool = False
    per_device_eval_batch_size: int = 8
    logging_first_step: bool = False
    overwrite_output_dir: bool = False
    do_train: bool = False
    do_eval: bool = False
    log_completions: bool = False
    num_completions_to_print: int | None = None
    ddp_find_unused_parameters: bool | None = None
    gradient_checkpointing_kwargs: dict | None = None
    vllm_gpu_memory_utilization: float = 0.3
    accelerator_config: Any = None  # an AcceleratorConfig after __init__; only dispatch_batches may be set
    # --- dash-fast's own ---
    filter_tau: float | None = 0.1
    overlap: bool = False
    loss_impl: str = "fused"
    refill: bool = False
    max_refill_rounds: int = 4
    normalize_over: str = "kept"
    micro_batch_tokens: int | None = None
    on_reward_error: str = "raise"
    max_nonfinite_steps: int = 3
    eval_examples: int = 500
    system_prompt: str | None = None
    prompt_column: str = "prompt"
    dataset_format: str = "auto"  # auto | prompt | gsm8k | math | mbpp (GSM8K / MATH / MBPP columns adapted)
    parallel: str = "ddp"
    # CPU runtime (DashConfig's; device_setup.py, overlap.py): torch threads (auto: one per usable CPU), the
    # CPUs to bind to, and overlap's split of them
    cpu_threads: int | str | None = "auto"
    cpu_affinity: str | None = None
    sampler_cores: int | None = None
    bind_cpus: bool = False
    cpu_sampler: str = "process"
    extra: dict[str, Any] = field(default_factory=dict)  # any other DashConfig keys, e.g. {"dtype": ...}

    def __init__(self, output_dir: str | None = None, **kwargs: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        for key in [k for k in kwargs if k not in names]:
            if not _is_training_arguments_default(key, kwargs[key]):
                raise ConfigError(_unknown(key, kwargs[key], names))
            setattr(self, key, kwargs.pop(key))  # a TrainingArguments option at its default: no effect
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, kwargs.get(f.name, default))
        self.output_dir = output_dir
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        for key, (allowed, why) in _ONLY.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(_refuse(key, getattr(self, key), why))
        if self.loss_type not in _LOSS_TYPES:
            raise ConfigError(_refuse("loss_type", self.loss_type, "unknown (supported: " + ", ".join(_LOSS_TYPES) + ")"))
        if (self.entropy_coef != 0 or self.use_adaptive_entropy) and self.top_entropy_quantile < 1.0:
            raise ConfigError(_refuse("entropy_coef", self.entropy_coef, "the entropy bonus together with "
                                      "top_entropy_quantile < 1 is not implemented (its mean is over all tokens)"))
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ConfigError(_refuse("top_entropy_quantile", self.top_entropy_quantile, "must be in [0, 1]"))
        if self.cast_lm_head_to_fp32 and (self.bf16 or self.fp16):
            raise ConfigError(_refuse("cast_lm_head_to_fp32", True, "a bf16/fp16 run keeps the head in its dtype "
                                      "(the loss kernels compute log-probs in fp32)"))
        if self.sync_ref_model and self.ref_model_sync_steps < 1:
            raise ConfigError(_refuse("ref_model_sync_steps", self.ref_model_sync_steps, "must be >= 1"))
        if self.lr_scheduler_type not in _SCHEDULERS:
            raise ConfigError(f"GRPOConfig: lr_scheduler_type={self.lr_scheduler_type!r} is not supported by "
                              f"dash-fast (supported: {', '.join(_SCHEDULERS)})")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("GRPOConfig: generation_batch_size and steps_per_generation cannot both be set")
        self.report_to = _report_to(self.report_to)
        self.accelerator_config = _accelerator_config(self.accelerator_config)
        self._sampling = _generation_kwargs(self.generation_kwargs, self.temperature, self.max_completion_length)
        # TRL's GRPOConfig resolves the generation batch in __post_init__: both numbers are readable
        # (to_dash_config reads the values as given, `_generation`)
        self._generation = (self.generation_batch_size, self.steps_per_generation)
        world = self.world_size
        if self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.generation_batch_size is None:
            self.generation_batch_size = self.per_device_train_batch_size * world * self.steps_per_generation
        elif self.steps_per_generation is None:
            self.steps_per_generation = self.generation_batch_size // (self.per_device_train_batch_size * world)

    def __getattr__(self, name: str) -> Any:
        """TrainingArguments' other fields read as their defaults (what TRL's config answers; setting one to
        another value is refused in __init__)."""
        defaults = _training_arguments_defaults()
        if name.startswith("__") or name not in defaults:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return defaults[name]

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size * int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size * int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", "0"))

    def to_dict(self) -> dict[str, Any]:
        """The arguments as set (TrainingArguments.to_dict's shape: a flat dict)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["accelerator_config"] = dataclasses.asdict(self.accelerator_config)
        return out

    def trl_loss(self) -> TrlLoss:
        """The TRL loss options (trl_losses.py); `.is_variant()` says whether the learner needs that path."""
        return TrlLoss(
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
            epsilon_low=self.epsilon, epsilon_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
            delta=self.delta, beta=self.beta, use_bias_correction_kl=self.use_bias_correction_kl,
            top_entropy_quantile=self.top_entropy_quantile, off_policy_mask_threshold=self.off_policy_mask_threshold,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg, luspo_scale=float(self.max_completion_length),
            entropy_bonus=self.entropy_coef != 0 or self.use_adaptive_entropy)

    def to_dash_config(self, world_size: int = 1, n_train: int | None = None,
                       reward_names: list[str] | None = None) -> DashConfig:
        """The DashConfig this run trains with (`n_train`: prompts in the train set, for epochs;
        `reward_names`: the rewards GRPOTrainer was given, so that `reward_weights` is checked against them)."""
        per_step = self.per_device_train_batch_size * world_size  # completions per micro-step, all ranks
        generation_batch_size, steps_per_generation = self._generation
        if generation_batch_size is not None:
            if generation_batch_size % per_step:
                raise ConfigError(f"GRPOConfig: generation_batch_size={generation_batch_size} must be "
                                  f"divisible by per_device_train_batch_size x world size ({per_step})")
            spg = generation_batch_size // per_step
        else:
            spg = steps_per_generation or self.gradient_accumulation_steps
        if spg % self.gradient_accumulation_steps:
            raise ConfigError(_refuse("steps_per_generation", spg, "must be a multiple of gradient_accumulation_steps="
                                      f"{self.gradient_accumulation_steps} (one rollout spans whole optimizer steps)"))
        rows = per_step * spg
        if rows % self.num_generations:
            raise ConfigError(f"GRPOConfig: the generation batch ({rows} completions) must be divisible by "
                              f"num_generations={self.num_generations}")
        minibatches = spg // self.gradient_accumulation_steps
        updates_per_rollout = minibatches * self.num_iterations
        prompts_per_step = rows // self.num_generations
        if self.max_steps > 0:
            steps = math.ceil(self.max_steps / updates_per_rollout)
        elif n_train:
            steps = math.ceil(self.num_train_epochs * n_train / prompts_per_step)
        else:
            raise ConfigError("GRPOConfig: set max_steps (the dataset's length is unknown for num_train_epochs)")
        warmup = self.warmup_steps
        if self.warmup_ratio is not None:
            warmup = self.warmup_ratio
        if 0 < warmup < 1:  # a ratio of the run, as TrainingArguments reads it
            warmup = math.ceil(warmup * steps * updates_per_rollout)
        prompt_len = self.max_prompt_length or 10**9
        values: dict[str, Any] = dict(
            output_dir=self.output_dir or "trainer_output",
            seed=self.seed, data_seed=self.data_seed, max_steps=steps,
            dtype="bfloat16" if self.bf16 else "float16" if self.fp16 else "float32",
            device="cpu" if self.use_cpu else "auto",
            prompts_per_step=prompts_per_step, group_size=self.num_generations,
            **{"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p or 0.0,
               "repetition_penalty": self.repetition_penalty, **self._sampling},  # generation_kwargs override
            chat_template_kwargs=self.chat_template_kwargs,
            max_prompt_tokens=prompt_len, max_completion_tokens=self.max_completion_length,
            # normalize_then_sum: the trainer sums group-normalised rewards (GRPOTrainer.compute_rewards), then
            # TRL normalises by the batch: (r - group mean, which is 0) / batch std, i.e. scale_rewards="batch"
            scale_rewards="batch" if self.multi_objective_aggregation == "normalize_then_sum" else self.scale_rewards,
            filter_tau=self.filter_tau, refill=self.refill,
            max_refill_rounds=self.max_refill_rounds,
            loss_agg=_LOSS_TYPES[self.loss_type], normalize_over=self.normalize_over,
            epsilon=self.epsilon, epsilon_high=self.epsilon_high, beta=self.beta,
            epochs_per_rollout=self.num_iterations, minibatches=minibatches,
            micro_batch_tokens=self.micro_batch_tokens or self.per_device_train_batch_size
            * (min(prompt_len, 512) + self.max_completion_length),
            loss_impl="liger" if self.use_liger_kernel else self.loss_impl, overlap=self.overlap,
            engine="vllm" if self.use_vllm else "torch", parallel=self.parallel,
            learning_rate=self.learning_rate, adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm or None,  # HF: 0 = no clipping
            lr_scheduler_type=_SCHEDULERS[self.lr_scheduler_type], warmup_steps=int(warmup),
            eval_every=_every(self.eval_steps, steps) if self.eval_strategy == "steps" else 0,
            eval_examples=self.eval_examples, logging_steps=_every(self.logging_steps, steps) if self.logging_strategy == "steps" else 0,
            save_steps=_every(self.save_steps, steps) if self.save_strategy == "steps" else 0,
            keep_last_checkpoints=self.save_total_limit or 0, report_to=self.report_to,
            disable_tqdm=bool(self.disable_tqdm), on_reward_error=self.on_reward_error,
            max_nonfinite_steps=self.max_nonfinite_steps, system_prompt=self.system_prompt,
            prompt_column=self.prompt_column, dataset_format=self.dataset_format, reward_weights=self.reward_weights,
            cpu_threads=self.cpu_threads, cpu_affinity=self.cpu_affinity, sampler_cores=self.sampler_cores,
            bind_cpus=self.bind_cpus, cpu_sampler=self.cpu_sampler,
            # asked for: on; TRL's default False: left to the memory plan (memory_plan.py)
            gradient_checkpointing=True if self.gradient_checkpointing or self.activation_checkpointing else None,
        )
        if self.gradient_checkpointing or self.activation_checkpointing:
            # the shared-prompt forward runs the layers' math itself: train on the model's own, checkpointed one
            values["train_forward"] = "hf"
        dash_names = {f.name for f in dataclasses.fields(DashConfig)} | set(ALIASES)
        for key in self.extra:
            if key not in dash_names:
                raise ConfigError(f"GRPOConfig: extra key {key!r} is not a DashConfig key"
                                  f"{did_you_mean(key, sorted(dash_names))}")
        values.update(self.extra)
        if values["reward_weights"] is None:
            values.pop("reward_weights")
        if reward_names:
            values["reward_funcs"] = list(reward_names)
        return DashConfig(**values)


def loss_warnings(loss_type: str, importance_sampling_level: str) -> list[str]:
    """TRL's warnings for loss-type / importance-level pairs that are valid but not what the papers use."""
    out = []
    if loss_type == "luspo" and importance_sampling_level != "sequence":
        out.append("When using 'luspo' loss, importance_sampling_level should be 'sequence' to mirror the "
                   "paper's setup.")
    if loss_type == "vespo" and importance_sampling_level != "token":
        out.append("VESPO computes sequence-level importance weights internally; importance_sampling_level should "
                   "be 'token' (the default).")
    if importance_sampling_level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        out.append(f"With importance_sampling_level='sequence', the {loss_type!r} loss sums per-token contributions, "
                   "which effectively weights each sequence by its completion length instead of optimizing the "
                   "per-sequence objective; GSPO's setup is loss_type='grpo'.")
    return out


def _load_causal_lm(name: str, args: Any, init_kwargs: dict, peft: bool = False) -> torch.nn.Module:
    """TRL's model loading: `model_init_kwargs` (dtype, attn_implementation, ...) and `trust_remote_code`.
    `bf16=True` loads the fp32 master weights (mixed_precision.py), as TRL's autocast trains an fp32
    checkpoint; with PEFT the frozen base loads in bf16 (only the adapters train, in fp32)."""
    from transformers import AutoModelForCausalLM

    from dash_fast.models.loading import resolve_device

    dtype = "bfloat16" if getattr(args, "bf16", False) else "float16" if getattr(args, "fp16", False) else "float32"
    device = resolve_device("cpu" if getattr(args, "use_cpu", False) else "auto")
    masters = dtype == "bfloat16" and not peft and (getattr(args, "extra", None) or {}).get("master_weights", True)
    kwargs = {"dtype": torch.float32 if masters else getattr(torch, dtype), **init_kwargs}
    if isinstance(kwargs["dtype"], str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    kwargs.pop("device_map", None)
    remote = getattr(args, "trust_remote_code", False)
    if "attn_implementation" not in kwargs:
        try:
            return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=remote, **kwargs,
                                                        attn_implementation=attn_implementation(device, dtype))
        except ValueError as e:  # an architecture without SDPA / flash-attn (e.g. Gemma2): its default
            if "attention implementation" not in str(e) and "does not support" not in str(e):
                raise
    return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=remote, **kwargs)


def _refuse(name: str, value: Any, why: str) -> str:
    return f"dash-fast does not support {name}={value!r}: {why}"


@functools.lru_cache(maxsize=1)
def _training_arguments_defaults() -> dict[str, Any]:
    """TrainingArguments' field defaults (read-only: cached, since GRPOConfig asks once per argument)."""
    import transformers

    out = {}
    for f in dataclasses.fields(transformers.TrainingArguments):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _is_training_arguments_default(key: str, value: Any) -> bool:
    defaults = _training_arguments_defaults()
    return key in defaults and value == defaults[key]


def _unknown(key: str, value: Any, names: list[str]) -> str:
    trl_names = set(_training_arguments_defaults()) | set(_TRL_ONLY)
    if key in trl_names:
        return _refuse(key, value, "not implemented (a TRL / TrainingArguments option dash-fast's trainer lacks)")
    return f"GRPOConfig: unknown argument {key!r}{did_you_mean(key, sorted(set(names) | trl_names))}"


def _report_to(value) -> list[str]:
    items = [value] if isinstance(value, str) or value is None else list(value)
    out = []
    for item in items:
        if item in (None, "none"):
            continue
        if item == "all":
            out.append("tensorboard")
        elif item in ("tensorboard", "wandb"):
            out.append(item)
        else:
            raise ConfigError(f"GRPOConfig: report_to={item!r} is not supported by dash-fast "
                              "(supported: 'none', 'all', 'tensorboard', 'wandb')")
    return out


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


# generation_kwargs (TRL: passed to transformers' GenerationConfig or vLLM's SamplingParams, overriding the
# sampling arguments): the keys the engines honour, and the values of others that change nothing.
_GENERATION_KEYS = ("top_k", "top_p", "min_p", "repetition_penalty")
_GENERATION_NEUTRAL = {"do_sample": True, "num_beams": 1, "num_return_sequences": 1, "n": 1, "use_cache": True}


def _generation_kwargs(kwargs: dict | None, temperature: float, max_completion_length: int) -> dict[str, Any]:
    """The sampling settings `generation_kwargs` overrides (top_k, top_p, min_p, repetition_penalty; vLLM's
    top_k=-1 is off); a key the engines cannot honour is refused, naming it."""
    out: dict[str, Any] = {}
    for key, value in (kwargs or {}).items():
        if key in _GENERATION_KEYS:
            out[key] = 0 if key == "top_k" and value == -1 else value
        elif key == "temperature" and value == temperature or key in ("max_new_tokens", "max_tokens") \
                and value == max_completion_length or _GENERATION_NEUTRAL.get(key, object()) == value:
            continue  # the value the run has anyway
        elif key == "temperature":
            raise ConfigError(_refuse("generation_kwargs['temperature']", value, f"differs from temperature="
                                      f"{temperature} (the training log-probs use the sampling temperature)"))
        elif key == "num_beams":
            raise ConfigError(_refuse("generation_kwargs['num_beams']", value, "beam search is not implemented "
                                      "(the engines sample one token per row and step)"))
        else:
            raise ConfigError(_refuse(f"generation_kwargs[{key!r}]", value, "the engines implement temperature, "
                                      "top_k, top_p, min_p and repetition_penalty"))
    return out


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


def _accelerator_config(value: Any):
    """TrainingArguments' `accelerator_config` (a dict, an AcceleratorConfig or None) as an AcceleratorConfig.
    Only `dispatch_batches` is meaningful here (iterable datasets need it False, as in TRL); any other field
    away from its default is refused."""
    from transformers.trainer_pt_utils import AcceleratorConfig

    if value is None:
        return AcceleratorConfig()
    config = AcceleratorConfig(**value) if isinstance(value, dict) else value
    for f in dataclasses.fields(AcceleratorConfig):
        if f.name != "dispatch_batches" and getattr(config, f.name) != f.default:
            raise ConfigError(_refuse(f"accelerator_config.{f.name}", getattr(config, f.name),
                                      "one process per device: accelerate's batch dispatching is not used"))
    return config


def _every(value: float | None, steps: int) -> int:
    """HF's `*_steps`: an int, or a float < 1 meaning that fraction of the run."""
    if not value:
        return 0
    return max(1, math.ceil(value * steps)) if value < 1 else int(value)


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
        from dash_fast.models.peft import apply_peft, is_peft_model
        from dash_fast.rewards.reward_models import RewardModelFunc, resolve_reward_models

        if optimizers != (None, None):
            raise NotImplementedError("dash-fast does not support optimizers=(...): the trainer builds AdamW "
                                      "and its schedule from the config")
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError("GRPOTrainer: No reward source provided: pass reward_funcs (functions, built-in reward "
                             "names, or reward model ids / models)")
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = GRPOConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-GRPO")
        if train_dataset is None:
            raise ValueError("GRPOTrainer: `train_dataset` is required")
        check_text_only(model, getattr(args, "trust_remote_code", False))  # a VLM: refused before anything loads
        init_kwargs = getattr(args, "model_init_kwargs", None) or {}
        reward_funcs, self.reward_processing_classes = resolve_reward_models(
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
            model = _load_causal_lm(model, args, init_kwargs, peft=peft_config is not None)
        model = apply_peft(model, peft_config, beta=args.beta)
        if getattr(args, "sync_ref_model", False) and is_peft_model(model):
            raise ValueError(_refuse("sync_ref_model", True, "with PEFT the reference is the policy's own base weights "
                                     "(adapters disabled), there is no reference copy to sync (TRL refuses it too)"))
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
                raise ValueError(_refuse("entropy_coef", args.entropy_coef, "the entropy bonus is per rank's "
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
            raise ValueError(_refuse("entropy_coef", value, "set after construction without an entropy bonus "
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
        """TRL's helper, same signature and return (logps, entropies, aux_loss): log-probs of the last
        `logits_to_keep` tokens under softmax(logits / temperature) (0 where attention_mask is 0), their
        entropies when asked — with gradient only while the entropy bonus is on (`_entropy_bonus_enabled`), as
        TRL. Training does not call it (the learner's own forward and kernels compute the same numbers)."""
        given = sorted(k for k, v in multimodal.items() if v is not None)
        if given:
            raise NotImplementedError(_refuse(given[0], "...", "vision-language inputs are not supported"))
        if compute_aux_loss:
            raise NotImplementedError(_refuse("compute_aux_loss", True, "the MoE load-balancing loss is not added"))
        batch_size = batch_size or input_ids.size(0)
        temperature = self.config.temperature
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1).logits
            logits = logits[:, :-1].float() / temperature  # position t predicts token t + 1
            logp_all = torch.log_softmax(logits, dim=-1)
            keep = mask[:, -logits_to_keep:].to(logp_all.dtype)
            logps.append(logp_all.gather(-1, ids[:, -logits_to_keep:, None]).squeeze(-1) * keep)
            if compute_entropy:
                ent = -(logp_all.exp() * logp_all).sum(-1) * keep
                entropies.append(ent if self._entropy_bonus_enabled else ent.detach())
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

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
