"""GRPOConfig's fields, in four groups that GRPOConfig (trl/config.py) inherits in this order: the Hugging Face
TrainingArguments that TRL scripts routinely pass, TRL's GRPO arguments, TRL arguments accepted as they are,
and dash-fast's own. Each group is a plain dataclass with no __init__: GRPOConfig's own __init__ checks and
sets every field. Defaults are TRL's (trl 1.16) unless a comment says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(init=False)
class TrainingArgumentsFields:
    """The Hugging Face TrainingArguments that GRPOConfig honours (the run, optimizer, logging, saving)."""

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


@dataclass(init=False)
class GrpoFields:
    """TRL's GRPO arguments: sampling, the loss and its variants, the reference model, importance sampling."""

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
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_cap: float | None = None  # TRL's deprecated name of clip_max
    cast_lm_head_to_fp32: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


@dataclass(init=False)
class AcceptedFields:
    """TRL arguments whose TRL behaviour dash-fast has already (the first four), or that change nothing here
    (DataLoader, logging and hub settings of the HF Trainer)."""

    eval_on_start: bool = False
    num_generations_eval: int | None = None
    pad_to_multiple_of: int | str | None = "auto"
    log_multimodal: bool = True
    # no effect
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


@dataclass(init=False)
class DashFields:
    """dash-fast's own options (DashConfig's keys of the same name; `extra`: any other DashConfig key)."""

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
