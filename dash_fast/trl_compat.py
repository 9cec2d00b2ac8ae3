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
- `bf16=True` trains the bf16 weights themselves (no autocast, no fp32 master copy: a warning says so);
  `fp16=True` is refused (no loss scaler); the default is float32.
  `gradient_checkpointing` defaults to False (TRL: True).
- Prompts longer than `max_prompt_length` are an error naming the row (TRL truncates them).
- Accepted with no effect: dataloader_num_workers, dataloader_pin_memory, logging_dir, run_name,
  remove_unused_columns (every column reaches the reward functions, as TRL's default),
  per_device_eval_batch_size, logging_first_step, overwrite_output_dir, do_train, do_eval,
  log_completions, num_completions_to_print, ddp_find_unused_parameters, gradient_checkpointing_kwargs,
  vllm_gpu_memory_utilization.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dash_fast.config import ALIASES, ConfigError, DashConfig, did_you_mean
from dash_fast.trainer import DashTrainer

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

# Arguments accepted only at these values (anything else is a feature dash-fast does not have).
_ONLY = {
    "shuffle_dataset": (True,),
    "mask_truncated_completions": (False,),
    "importance_sampling_level": ("token",),
    "multi_objective_aggregation": ("sum_then_normalize",),
    "min_p": (None,),
    "repetition_penalty": (1.0,),
    "delta": (None,),
    "top_entropy_quantile": (1.0,),
    "sync_ref_model": (False,),
    "vllm_mode": ("colocate",),
    "logging_strategy": ("steps",),
    "save_strategy": ("steps", "no"),
    "eval_strategy": ("no", "steps"),
    "optim": ("adamw_torch", "adamw_torch_fused"),
    "adam_epsilon": (1e-8,),
    "torch_compile": (False,),
    "push_to_hub": (False,),
    "model_init_kwargs": (None,),
    "generation_kwargs": (None,),
}
_LOSS_TYPES = {"dapo": "token-mean", "dr_grpo": "dr_grpo", "grpo": "seq-mean-token-mean"}
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
    generation_kwargs: dict | None = None
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
    extra: dict[str, Any] = field(default_factory=dict)  # any other DashConfig keys, e.g. {"dtype": ...}

    def __init__(self, output_dir: str | None = None, **kwargs: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        for key in kwargs:
            if key not in names:
                raise ConfigError(_unknown(key, names))
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, kwargs.get(f.name, default))
        self.output_dir = output_dir
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        for key, allowed in _ONLY.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"GRPOConfig: {key}={getattr(self, key)!r} is not supported by dash-fast "
                                  f"(supported: {', '.join(map(repr, allowed))})")
        if self.loss_type not in _LOSS_TYPES:
            raise ConfigError(f"GRPOConfig: loss_type={self.loss_type!r} is not supported by dash-fast "
                              f"(supported: {', '.join(_LOSS_TYPES)})")
        if self.lr_scheduler_type not in _SCHEDULERS:
            raise ConfigError(f"GRPOConfig: lr_scheduler_type={self.lr_scheduler_type!r} is not supported by "
                              f"dash-fast (supported: {', '.join(_SCHEDULERS)})")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("GRPOConfig: generation_batch_size and steps_per_generation cannot both be set")
        self.report_to = _report_to(self.report_to)

    def to_dash_config(self, world_size: int = 1, n_train: int | None = None) -> DashConfig:
        """The DashConfig this run trains with (`n_train`: prompts in the train set, for epochs)."""
        per_step = self.per_device_train_batch_size * world_size  # completions per micro-step, all ranks
        if self.generation_batch_size is not None:
            if self.generation_batch_size % per_step:
                raise ConfigError(f"GRPOConfig: generation_batch_size={self.generation_batch_size} must be "
                                  f"divisible by per_device_train_batch_size x world size ({per_step})")
            spg = self.generation_batch_size // per_step
        else:
            spg = self.steps_per_generation or self.gradient_accumulation_steps
        if spg % self.gradient_accumulation_steps:
            raise ConfigError(f"GRPOConfig: steps_per_generation={spg} must be a multiple of "
                              f"gradient_accumulation_steps={self.gradient_accumulation_steps}")
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
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            max_prompt_tokens=prompt_len, max_completion_tokens=self.max_completion_length,
            scale_rewards=self.scale_rewards, filter_tau=self.filter_tau, refill=self.refill,
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
            eval_examples=self.eval_examples, logging_steps=_every(self.logging_steps, steps),
            save_steps=_every(self.save_steps, steps) if self.save_strategy == "steps" else 0,
            keep_last_checkpoints=self.save_total_limit or 0, report_to=self.report_to,
            disable_tqdm=bool(self.disable_tqdm), on_reward_error=self.on_reward_error,
            max_nonfinite_steps=self.max_nonfinite_steps, system_prompt=self.system_prompt,
            prompt_column=self.prompt_column, dataset_format=self.dataset_format, reward_weights=self.reward_weights,
        )
        dash_names = {f.name for f in dataclasses.fields(DashConfig)} | set(ALIASES)
        for key in self.extra:
            if key not in dash_names:
                raise ConfigError(f"GRPOConfig: extra key {key!r} is not a DashConfig key"
                                  f"{did_you_mean(key, sorted(dash_names))}")
        values.update(self.extra)
        if values["reward_weights"] is None:
            values.pop("reward_weights")
        return DashConfig(**values)


def _unknown(key: str, names: list[str]) -> str:
    import transformers

    trl_names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)} | set(_TRL_ONLY)
    if key in trl_names:
        return f"GRPOConfig: {key!r} is a TRL argument that dash-fast does not support"
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
        reward_funcs: Any,
        args: GRPOConfig | DashConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
    ) -> None:
        from dash_fast.data import load_rows

        for name, value, ok in (("reward_processing_classes", reward_processing_classes, None),
                                ("optimizers", optimizers, (None, None)), ("peft_config", peft_config, None)):
            if value != ok and value is not ok:
                raise NotImplementedError(f"GRPOTrainer: {name} is not supported by dash-fast")
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = GRPOConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-GRPO")
        if train_dataset is None:
            raise ValueError("GRPOTrainer: train_dataset is required")
        rows = load_rows(train_dataset)
        self.grpo_args = args
        dash_args = args.to_dash_config(int(os.environ.get("WORLD_SIZE", "1")), len(rows)) \
            if isinstance(args, GRPOConfig) else args
        callbacks = [cb() if isinstance(cb, type) else cb for cb in (callbacks or [])]
        super().__init__(model, reward_funcs, args=dash_args, train_dataset=rows, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks)
        self.callback_args = args
        self.processing_class = self.tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self._n_train = len(rows)
        if isinstance(args, GRPOConfig):
            if args.disable_dropout:
                for m in self.model.modules():
                    if isinstance(m, torch.nn.Dropout):
                        m.p = 0.0
            if args.gradient_checkpointing or args.activation_checkpointing:
                self.model.gradient_checkpointing_enable()

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def train_step(self, step: int) -> dict:
        """DashTrainer's step record, plus TRL's names for the same numbers."""
        record = super().train_step(step)
        self.state.epoch = step * self.args.prompts_per_step / max(self._n_train, 1)
        record.update({"reward": record["reward_mean"], "completions/mean_length": record["completion_len_mean"],
                       "epoch": self.state.epoch})
        for name in self.reward_names:
            if f"rewards/{name}" in record:
                record[f"rewards/{name}/mean"] = record[f"rewards/{name}"]
        return record

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """TRL's train(): returns a transformers TrainOutput(global_step, training_loss, metrics)."""
        from transformers.trainer_utils import TrainOutput

        if kwargs:
            raise NotImplementedError(f"GRPOTrainer.train: {sorted(kwargs)} not supported by dash-fast")
        if resume_from_checkpoint:
            self.args.resume = "auto" if resume_from_checkpoint is True else str(resume_from_checkpoint)
        summary = super().train()
        losses = [r["loss"] for r in self.state.log_history if isinstance(r.get("loss"), float)]
        metrics = {"train_runtime": summary["rl_wall_time_s"], "train_steps": summary["steps"],
                   "train_loss": sum(losses) / len(losses) if losses else 0.0}
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def save_model(self, output_dir: str | None = None) -> None:
        """Save the model and tokenizer in HF format (rank 0)."""
        if not self.dist.is_main:
            return
        output_dir = output_dir or self.args.output_dir
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
