"""TRL's GRPOConfig on dash-fast: TRL's GRPO argument names (and the Hugging Face TrainingArguments that TRL
scripts routinely pass), plus dash-fast's own, mapped onto a DashConfig (`GRPOConfig.to_dash_config`).

Every name is checked: a TRL argument dash-fast does not support is an error that names it, an unknown name
suggests the nearest known one. How each option maps, and where dash-fast differs from TRL: trl/trainer.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Any

from dash_fast.config import ALIASES, ConfigError, DashConfig, did_you_mean
from dash_fast.losses import TrlLoss
from dash_fast.trl.config_fields import AcceptedFields, DashFields, GrpoFields, TrainingArgumentsFields

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
class GRPOConfig(DashFields, AcceptedFields, GrpoFields, TrainingArgumentsFields):
    """TRL's GRPOConfig names -> DashConfig. The fields are config_fields.py's groups; a dataclass takes its
    bases' fields from the last base to the first, so they come in TrainingArguments, GRPO, accepted,
    dash-fast order."""

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
                raise ConfigError(refusal(key, getattr(self, key), why))
        if self.loss_type not in _LOSS_TYPES:
            raise ConfigError(refusal("loss_type", self.loss_type, "unknown (supported: " + ", ".join(_LOSS_TYPES) + ")"))
        if (self.entropy_coef != 0 or self.use_adaptive_entropy) and self.top_entropy_quantile < 1.0:
            raise ConfigError(refusal("entropy_coef", self.entropy_coef, "the entropy bonus together with "
                                      "top_entropy_quantile < 1 is not implemented (its mean is over all tokens)"))
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ConfigError(refusal("top_entropy_quantile", self.top_entropy_quantile, "must be in [0, 1]"))
        if self.cast_lm_head_to_fp32 and (self.bf16 or self.fp16 or self._bf16_by_default()):
            raise ConfigError(refusal("cast_lm_head_to_fp32", True, "a bf16/fp16 run (bf16 left unset trains bf16 "
                                      "on a GPU; set bf16=False for float32) keeps the head in its dtype (the loss "
                                      "kernels compute log-probs in fp32)"))
        _check_importance_sampling(self)
        if self.sync_ref_model and self.ref_model_sync_steps < 1:
            raise ConfigError(refusal("ref_model_sync_steps", self.ref_model_sync_steps, "must be >= 1"))
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

    def _liger_loss(self) -> bool:
        return self.use_liger_kernel or self.loss_impl == "liger" or self.extra.get("loss_impl") == "liger"

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
            kernel_kl_correction=not self._liger_loss(),
            entropy_bonus=self.entropy_coef != 0 or self.use_adaptive_entropy)

    def _bf16_by_default(self) -> bool:
        """Whether bf16 left unset trains in bfloat16 here: DashConfig's dtype="auto" on the device the run gets."""
        from dash_fast.models.loading import resolve_device
        from dash_fast.runtime.device import resolve_dtype

        if self.bf16 is not None or self.fp16:
            return False
        return resolve_dtype("auto", resolve_device("cpu" if self.use_cpu else "auto")) == "bfloat16"

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
            raise ConfigError(refusal("steps_per_generation", spg, "must be a multiple of gradient_accumulation_steps="
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
            # bf16 unset: DashConfig's "auto" (bfloat16 on CUDA, as TRL's default bf16=True; float32 on CPU)
            dtype="bfloat16" if self.bf16 else "float16" if self.fp16 else "float32" if self.bf16 is False else "auto",
            device="cpu" if self.use_cpu else "auto",
            prompts_per_step=prompts_per_step, group_size=self.num_generations,
            **{"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p or 0.0,
               "repetition_penalty": self.repetition_penalty, **self._sampling},  # generation_kwargs override
            chat_template_kwargs=self.chat_template_kwargs,
            max_prompt_tokens=prompt_len, max_completion_tokens=self.max_completion_length,
            # normalize_then_sum: the trainer sums group-normalised rewards (GRPOTrainer._reward_post), then
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
            # token level: in the fused kernels (Liger's loss has none: losses.py's path then computes it)
            kl_bias_correction=self.use_bias_correction_kl and not self._liger_loss(),
            # TRL's vLLM correction: on with use_vllm; without vLLM DashConfig's rule (on for bf16 / overlap),
            # except VESPO with a sequence mode (TRL refuses that pair with vLLM)
            sampler_is_correction=(True if self.use_vllm else None if not (
                self.loss_type == "vespo" and self.vllm_importance_sampling_mode.startswith("sequence")) else False)
            if self.vllm_importance_sampling_correction else False,
            sampler_is_mode=self.vllm_importance_sampling_mode, sampler_is_clip_min=self.vllm_importance_sampling_clip_min,
            sampler_is_clip_max=self.vllm_importance_sampling_clip_max,
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


def _check_importance_sampling(args: GRPOConfig) -> None:
    """TRL's GRPOConfig / GRPOTrainer checks of the vllm_importance_sampling_* arguments (the deprecated cap
    becomes clip_max, as in TRL)."""
    from dash_kernels.utils import IS_MODES

    if args.vllm_importance_sampling_cap is not None:
        import warnings

        warnings.warn("The `vllm_importance_sampling_cap` argument is deprecated and will be removed in v2.0.0. Use "
                      "`vllm_importance_sampling_clip_max` instead.", FutureWarning, stacklevel=3)
        args.vllm_importance_sampling_clip_max = args.vllm_importance_sampling_cap
    lo, hi, mode = (args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max,
                    args.vllm_importance_sampling_mode)
    if mode not in IS_MODES:
        raise ConfigError(refusal("vllm_importance_sampling_mode", mode, f"must be one of {', '.join(IS_MODES)}"))
    if lo is not None and hi is not None and lo >= hi:
        raise ConfigError(f"GRPOConfig: vllm_importance_sampling_clip_min ({lo}) must be less than "
                          f"vllm_importance_sampling_clip_max ({hi}).")
    if args.vllm_importance_sampling_correction and mode.endswith("truncate") and lo is None and hi is None:
        raise ConfigError("GRPOConfig: at least one of vllm_importance_sampling_clip_min or "
                          "vllm_importance_sampling_clip_max must be set when vllm_importance_sampling_mode is a "
                          "*_truncate mode.")
    if (args.loss_type == "vespo" and args.use_vllm and args.vllm_importance_sampling_correction
            and mode not in ("token_truncate", "token_mask")):
        raise ConfigError(f"GRPOConfig: VESPO loss requires vllm_importance_sampling_mode to be either "
                          f"'token_truncate' or 'token_mask'. Got: {mode}.")


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


def refusal(name: str, value: Any, why: str) -> str:
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
        return refusal(key, value, "not implemented (a TRL / TrainingArguments option dash-fast's trainer lacks)")
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
            raise ConfigError(refusal("generation_kwargs['temperature']", value, f"differs from temperature="
                                      f"{temperature} (the training log-probs use the sampling temperature)"))
        elif key == "num_beams":
            raise ConfigError(refusal("generation_kwargs['num_beams']", value, "beam search is not implemented "
                                      "(the engines sample one token per row and step)"))
        else:
            raise ConfigError(refusal(f"generation_kwargs[{key!r}]", value, "the engines implement temperature, "
                                      "top_k, top_p, min_p and repetition_penalty"))
    return out


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
            raise ConfigError(refusal(f"accelerator_config.{f.name}", getattr(config, f.name),
                                      "one process per device: accelerate's batch dispatching is not used"))
    return config


def _every(value: float | None, steps: int) -> int:
    """HF's `*_steps`: an int, or a float < 1 meaning that fraction of the run."""
    if not value:
        return 0
    return max(1, math.ceil(value * steps)) if value < 1 else int(value)
