"""One dataclass tree for a run: defaults, presets, YAML files and dotted `key=value` overrides.

Precedence (later wins): DashConfig defaults < preset < YAML file < CLI flags < `key=value` overrides.
Every key is checked: an unknown one is a one-line error that suggests the nearest known name.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import yaml

from dash_fast.algo import LOSS_AGGS, SCALE_REWARDS
from dash_fast.data.formats import DATASET_FORMATS
from dash_fast.embedded.sft import SFTConfig
from dash_fast.embedded.tiny import TinyConfig


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming it."""


@dataclass
class DashConfig:
    """Everything a DASH run needs. Field names follow TRL's GRPOConfig where one exists."""

    # --- run ---
    output_dir: str | None = None  # default runs/<timestamp>
    seed: int = 0
    data_seed: int | None = None  # prompt order; None: seed
    max_steps: int = 100
    preset: str | None = None  # "dash" | "grpo": applied under the file and overrides
    model: str | None = None  # HF path; None = the embedded tiny model
    dataset: str | None = None  # JSONL / parquet file or HF dataset dir; None = embedded task
    eval_dataset: str | None = None
    dataset_format: str = "auto"  # auto | prompt | gsm8k | math | mbpp (auto: from the columns; both datasets)
    prompt_column: str = "prompt"
    system_prompt: str | None = None
    use_chat_template: bool | None = None  # None: when the prompt is a list of messages
    reward_funcs: list[str] | None = None  # None: the dataset format's (exact_answer, math for gsm8k/math, code)
    reward_weights: list[float] | None = None
    accuracy_reward: str | None = None  # reward whose mean is "accuracy"; default: the first one
    sandbox: str = "namespaces"  # code reward: namespaces (contained; refuses if unavailable) | unsafe-local
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 elsewhere) | float32 | bfloat16 (float16 refused)
    master_weights: bool = True  # bf16 runs: fp32 master weights + bf16 autocast (mixed_precision.py); False
    #                              trains the bf16 weights in place (half the memory; small updates round away)
    deterministic: bool = False  # bwd="dense" loss + deterministic torch/cuBLAS settings on CUDA (README)
    # --- sampling (one rollout per optimizer step) ---
    prompts_per_step: int = 64
    group_size: int = 4
    generation_batch_size: int | None = None  # rows per generate call; None = whole rollout at once
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0  # 0: off (HF's min-p: drop tokens below min_p x the top probability)
    repetition_penalty: float = 1.0  # 1: off (HF's: logits of tokens already seen / p if > 0 else x p)
    chat_template_kwargs: dict | None = None  # extra arguments of apply_chat_template (e.g. enable_thinking)
    max_prompt_tokens: int = 512
    max_completion_tokens: int = 2048
    # --- algorithm ---
    scale_rewards: str = "group"
    filter_tau: float | None = 0.1  # None disables the gradient filter
    refill: bool = False  # DAPO-style: sample more prompts until the filter keeps prompts_per_step * G rows
    max_refill_rounds: int = 4  # refill: extra generations per step at most (then train on what was kept)
    loss_agg: str = "dr_grpo"
    normalize_over: str = "kept"  # kept | all
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: same as epsilon
    beta: float = 0.0
    kl_bias_correction: bool = False  # beta > 0: TRL's use_bias_correction_kl, k3 x exp(logp - old) (token level)
    # Sampler importance sampling (TRL's vllm_importance_sampling_*, docs/design.md section 3): the PG term of
    # each token times r = exp(trainer log-prob - sampler log-prob) (detached), truncated or masked to
    # [clip_min, clip_max]; per token or per row (the row's summed log-ratio). None: on where the sampler's
    # numerics or weights differ from the trainer's (engine=vllm, a bf16 run, overlap), off otherwise (fp32
    # embedded engine: they agree to ~1e-6). The trainer's log-probs are the old pass's when one runs, else
    # the loss forward's (the same weights); with overlap the old policy is then the trainer's, not the sampler's.
    sampler_is_correction: bool | None = None
    sampler_is_mode: str = "token_truncate"  # token_truncate | token_mask | sequence_truncate | sequence_mask
    sampler_is_clip_min: float | None = None
    sampler_is_clip_max: float | None = 3.0
    epochs_per_rollout: int = 1  # K passes over each rollout (TRL's num_iterations; PPO "Multi" when > 1)
    minibatches: int = 1  # M (PPO "Mini" when > 1)
    micro_batch_tokens: int = 8192
    loss_impl: str = "fused"  # fused | naive | liger
    triton_bwd: str = "dense"  # fused loss on CUDA: dense (dZ + GEMMs, no atomics) | atomic (fp32 atomics)
    train_forward: str = "auto"  # auto (shared_prompt on CPU) | shared_prompt (each prompt once per group) | hf
    overlap: bool = False
    kv_cache_release: bool | None = None  # free the embedded engine's KV cache + CUDA graphs across each update; None: when the memory plan needs it
    gradient_checkpointing: bool | None = None  # recompute each decoder layer in backward; None: when the memory plan needs it
    memory_budget_gb: float | None = None  # the memory plan's budget; None: CUDA total memory, or available RAM on CPU
    engine: str = "torch"  # torch | vllm
    vllm_gpu_memory_utilization: float = 0.3  # engine=vllm on CUDA: vLLM's share of the GPU (KV cache + weights)
    vllm_kv_cache_bytes: int | None = None  # engine=vllm: KV cache size; None: 1 GiB on CPU, the share above on CUDA
    vllm_enforce_eager: bool | None = None  # engine=vllm: no torch.compile / CUDA graphs; None: eager on CPU only
    vllm_process: bool | None = None  # engine=vllm in its own pinned process; None: with overlap on >= 2 CPUs only
    cpu_threads: int | str | None = "auto"  # torch threads, set at start-up (before vLLM): N | auto | None (torch's); runtime/device.py
    cpu_affinity: str | None = None  # CPU ids to bind the trainer's threads to at start-up ("0-1", "0,2"); None: as started
    sampler_cores: int | None = None  # overlap=True on CPU: cores of the sampler thread (the rest: learner); None: half
    bind_cpus: bool = False  # overlap=True on CPU: bind the sampler and the learner to their own cores
    cpu_sampler: str = "process"  # overlap=True on CPU: the sampler runs in its own process | a thread (GIL-shared)
    parallel: str = "ddp"  # under torchrun: ddp (gradient all-reduce) | fsdp2 (sharded; GPU or CPU)
    # under torchrun: seconds a rank waits in a collective for the others (rank 0's SFT warm start and checkpoint
    # writes happen while the others wait) before it fails the run instead of hanging
    dist_timeout_s: float = 1800.0
    # --- optimiser ---
    learning_rate: float = 3e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_scheduler_type: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    # --- eval, logging, checkpoints ---
    eval_every: int = 0  # 0: only before and after RL
    eval_examples: int = 500
    eval_max_completion_tokens: int | None = None
    logging_steps: int = 1
    save_steps: int = 0  # 0: only the final checkpoint
    keep_last_checkpoints: int = 2
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: str | None = None  # None | "auto" | path to checkpoints/step-N
    disable_tqdm: bool = False
    on_reward_error: str = "raise"  # raise | skip
    max_nonfinite_steps: int = 3
    profile_steps: str | None = None  # "A:B"
    trace: bool = False
    # --- embedded default ---
    sft: SFTConfig = field(default_factory=SFTConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    # --- accepted old names (not stored; see ALIASES) ---
    updates_per_rollout: dataclasses.InitVar[int | None] = None  # = epochs_per_rollout

    def __post_init__(self, updates_per_rollout: int | None = None) -> None:
        if updates_per_rollout is not None:
            if self.epochs_per_rollout not in (1, updates_per_rollout):
                raise ConfigError(f"config: updates_per_rollout={updates_per_rollout!r} and epochs_per_rollout="
                                  f"{self.epochs_per_rollout!r}: the same K under its old and new name; set one")
            self.epochs_per_rollout = updates_per_rollout
        for name, cls in (("sft", SFTConfig), ("tiny", TinyConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _build(cls, getattr(self, name), prefix=f"{name}."))
        _check_types(self)
        self.validate()

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"config: {key}={getattr(self, key)!r}: {what}")

        need(self.preset in (None, *PRESETS), "preset", f"must be one of {sorted(PRESETS)}")
        need(self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"must be one of {SCALE_REWARDS}")
        need(self.loss_agg in LOSS_AGGS, "loss_agg", f"must be one of {LOSS_AGGS}")
        need(self.normalize_over in ("kept", "all"), "normalize_over", "must be 'kept' or 'all'")
        need(self.loss_impl in ("fused", "naive", "liger"), "loss_impl", "must be fused, naive or liger")
        need(self.engine in ("torch", "vllm"), "engine", "must be torch or vllm")
        need(self.sandbox in ("namespaces", "unsafe-local"), "sandbox", "must be namespaces or unsafe-local")
        need(self.train_forward in ("auto", "shared_prompt", "hf"), "train_forward",
             "must be auto, shared_prompt or hf")
        need(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "must be in (0, 1]")
        need(self.vllm_kv_cache_bytes is None or self.vllm_kv_cache_bytes > 0, "vllm_kv_cache_bytes",
             "must be > 0 or None")
        need(self.cpu_threads in (None, "auto") or (type(self.cpu_threads) is int and self.cpu_threads >= 1),
             "cpu_threads", "must be auto, an int >= 1 or None")
        need(self.sampler_cores is None or self.sampler_cores >= 1, "sampler_cores", "must be >= 1 or None")
        need(self.cpu_sampler in ("process", "thread"), "cpu_sampler", "must be process or thread")
        if self.cpu_affinity is not None:
            from dash_fast.runtime.cpus import parse_cpus

            try:
                parse_cpus(self.cpu_affinity)
            except ValueError as e:
                need(False, "cpu_affinity", str(e))
        need(self.parallel in ("ddp", "fsdp2"), "parallel", "must be ddp or fsdp2")
        need(self.dist_timeout_s > 0, "dist_timeout_s", "must be > 0 seconds")
        need(self.max_refill_rounds >= 1, "max_refill_rounds", "must be >= 1")
        need(self.on_reward_error in ("raise", "skip"), "on_reward_error", "must be raise or skip")
        need(self.lr_scheduler_type in ("constant", "linear", "cosine"), "lr_scheduler_type",
             "must be constant, linear or cosine")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be auto, float32 or bfloat16 (float16 is "
             "refused: dash-fast has no loss scaler, and fp16 gradients underflow without one)")
        need(self.triton_bwd in ("dense", "atomic"), "triton_bwd", "must be dense or atomic")
        need(not (self.deterministic and self.triton_bwd == "atomic"), "triton_bwd",
             "atomic sums depend on scheduling order: deterministic=True needs triton_bwd=dense")
        need(not (self.kv_cache_release and self.overlap), "kv_cache_release",
             "the sampler runs during the update with overlap=True: its cache cannot be freed then")
        need(self.memory_budget_gb is None or self.memory_budget_gb > 0, "memory_budget_gb", "must be > 0 or None")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             "must be auto, cpu or cuda[:N]")
        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages compare answers within a group)")
        need(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        need(self.max_steps >= 0, "max_steps", "must be >= 0")
        need(self.temperature > 0, "temperature", "must be > 0 for sampling")
        need(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        if self.engine == "vllm" and (self.min_p > 0 or self.repetition_penalty != 1.0):
            key = "min_p" if self.min_p > 0 else "repetition_penalty"
            raise ConfigError(f"dash-fast does not support {key}={getattr(self, key)!r} with engine='vllm': the vLLM "
                              "engine's log-probs would include it (the embedded engine, engine='torch', has it)")
        need(self.filter_tau is None or self.filter_tau >= 0, "filter_tau", "must be >= 0 or None")
        need(self.epochs_per_rollout >= 1, "epochs_per_rollout", "must be >= 1")
        need(1 <= self.minibatches <= self.rows_per_step, "minibatches", "must be in [1, rows per step]")
        need(self.micro_batch_tokens >= 1, "micro_batch_tokens", "must be >= 1")
        need(self.max_completion_tokens >= 1, "max_completion_tokens", "must be >= 1")
        need(self.beta >= 0, "beta", "must be >= 0")
        from dash_kernels.utils import IS_MODES

        need(self.sampler_is_mode in IS_MODES, "sampler_is_mode", f"must be one of {', '.join(IS_MODES)}")
        need(self.sampler_is_clip_min is None or self.sampler_is_clip_max is None
             or self.sampler_is_clip_min < self.sampler_is_clip_max, "sampler_is_clip_min",
             f"must be < sampler_is_clip_max={self.sampler_is_clip_max!r}")
        need(not (self.sampler_is_correction and self.sampler_is_mode.endswith("truncate")
                  and self.sampler_is_clip_min is None and self.sampler_is_clip_max is None),
             "sampler_is_clip_max", f"sampler_is_mode={self.sampler_is_mode!r} needs a bound (clip_min or clip_max)")
        need(not (self.loss_impl == "liger" and self.sampler_is_correction), "sampler_is_correction",
             "loss_impl=liger has no sampler importance sampling (fused or naive have)")
        need(not (self.loss_impl == "liger" and self.kl_bias_correction and self.beta > 0), "kl_bias_correction",
             "loss_impl=liger has no bias-corrected KL (fused or naive have)")
        need(self.generation_batch_size is None or self.generation_batch_size >= 1,
             "generation_batch_size", "must be >= 1 or None")
        need(self.reward_funcs is None or len(self.reward_funcs) >= 1, "reward_funcs",
             "needs at least one reward function (or None: the dataset format's)")
        need(self.dataset_format in DATASET_FORMATS, "dataset_format", f"must be one of {', '.join(DATASET_FORMATS)}")
        # reward_weights is checked against the reward functions the trainer resolves (they may come as callables)
        if self.profile_steps is not None:
            a, _, b = str(self.profile_steps).partition(":")
            need(a.isdigit() and b.isdigit() and int(a) <= int(b), "profile_steps", "must look like A:B")

    def sampler_is_on(self, bf16: bool) -> bool:
        """Whether the loss applies sampler importance sampling (`sampler_is_correction`; None: engine=vllm, a
        bf16 run (`bf16`: the resolved dtype) or overlap, and a loss_impl that has it)."""
        if self.sampler_is_correction is not None:
            return self.sampler_is_correction
        if self.loss_impl == "liger" or (self.sampler_is_mode.endswith("truncate") and self.sampler_is_clip_min
                                         is None and self.sampler_is_clip_max is None):
            return False
        return self.engine == "vllm" or bf16 or self.overlap

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shared_prompt_requested(train_forward: str, device_type: str) -> bool:
    """Whether `train_forward` asks for the shared-prompt training forward on a `device_type` ("cpu", "cuda")
    device: `shared_prompt` always, `auto` on CPU only (on GPU its speed against flash-attn / SDPA padding masks
    is unmeasured). Whether the model can run it is builder.use_shared_prompt's question."""
    return train_forward == "shared_prompt" or (train_forward == "auto" and device_type == "cpu")


def _updates_per_rollout(self: DashConfig) -> int:
    return self.epochs_per_rollout


def _set_updates_per_rollout(self: DashConfig, value: int) -> None:
    self.epochs_per_rollout = value


# the old name reads and writes the field (the dataclass's __init__ takes it through the InitVar above)
DashConfig.updates_per_rollout = property(_updates_per_rollout, _set_updates_per_rollout)  # type: ignore[assignment]

ALIASES = {"updates_per_rollout": "epochs_per_rollout"}  # old key -> key, in files, overrides and GRPOConfig


def _renamed(layer: dict[str, Any]) -> dict[str, Any]:
    """A config layer with old key names (ALIASES) written as the new ones."""
    out = dict(layer)
    for old, new in ALIASES.items():
        if old in out:
            value = out.pop(old)
            if new in out and out[new] != value:
                raise ConfigError(f"config: {old}={value!r} and {new}={out[new]!r}: the same setting under its "
                                  f"old and new name; set one")
            out[new] = value
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's baseline: generation in small batches (one per micro-batch of 8 rows), no filter.
    "grpo": {"generation_batch_size": 8, "filter_tau": None},
    # DASH: one large generation per optimizer step (preemptive sampling) and the gradient filter.
    "dash": {"generation_batch_size": None, "filter_tau": 0.1},
}


def _check_types(obj, prefix: str = "") -> None:
    """Coerce numbers written as strings (YAML reads `1e-4` as a string) and reject wrong types."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        if dataclasses.is_dataclass(value):
            _check_types(value, prefix=f"{prefix}{f.name}.")
            continue
        if value is None and kind.startswith("list") and "None" not in kind:  # report_to=none: an empty list
            setattr(obj, f.name, [])
            continue
        if value is None:
            if "None" not in kind:
                raise ConfigError(f"config: {prefix}{f.name} must not be None")
            continue
        if kind.startswith("int | str") and isinstance(value, str) and not value.strip().isdigit():
            continue  # a keyword (cpu_threads=auto); validate() names the allowed ones
        for name, cast in (("float", float), ("int", int)):
            if kind.startswith(name) and not isinstance(value, bool):
                try:
                    cast_value = cast(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"config: {prefix}{f.name}={value!r} is not a {name}") from None
                if name == "int" and cast_value != float(value):
                    raise ConfigError(f"config: {prefix}{f.name}={value!r} is not an int")
                setattr(obj, f.name, cast_value)
                break
        else:
            if kind.startswith("bool") and not isinstance(value, bool):
                raise ConfigError(f"config: {prefix}{f.name}={value!r} is not true/false")
            if kind.startswith("str") and not isinstance(value, str):
                raise ConfigError(f"config: {prefix}{f.name}={value!r} is not a string")
            if kind.startswith("list") and not isinstance(value, list):
                setattr(obj, f.name, [value])


def did_you_mean(name: str, choices: list[str], prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the closest of `choices` to a misspelt `name`, else ''."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _build(cls: type, values: dict[str, Any], prefix: str = ""):
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"config: unknown key {prefix + key!r}{did_you_mean(key, names, prefix)}")
    return cls(**values)


def merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Recursive dict update that rejects unknown keys (checked against `base`)."""
    out = dict(base)
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"config: unknown key {prefix + key!r}{did_you_mean(key, list(base), prefix)}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = merge(base[key], value, prefix=f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['sft.steps=200', 'filter_tau=none'] -> {'sft': {'steps': 200}, 'filter_tau': None}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config: override {item!r} is not key=value")
        value = None if raw.strip().lower() in ("none", "null", "") else yaml.safe_load(raw)
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def make_config(
    file: str | None = None,
    preset: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> DashConfig:
    """Build a validated DashConfig from every layer (see the module docstring for precedence)."""
    tree = DashConfig().to_dict()
    base = _renamed(base) if base else base
    if base:
        tree = merge(tree, {k: v for k, v in base.items() if k != "preset"})
    file_values: dict[str, Any] = {}
    if file:
        with open(file) as f:
            file_values = yaml.safe_load(f) or {}
        if not isinstance(file_values, dict):
            raise ConfigError(f"config: {file} must hold a mapping of keys to values")
    layers = [_renamed(layer) for layer in (file_values, {k: v for k, v in (flags or {}).items() if v is not None},
                                             parse_overrides(overrides or []))]
    chosen = preset or (base or {}).get("preset")
    for layer in layers:
        chosen = layer.get("preset", chosen)
    if chosen is not None:
        if chosen not in PRESETS:
            raise ConfigError(f"config: preset={chosen!r}: must be one of {sorted(PRESETS)}")
        tree = merge(tree, {**PRESETS[chosen], "preset": chosen})
    if base:  # a recipe's own values sit above its preset
        tree = merge(tree, {k: v for k, v in base.items() if k != "preset"})
    for layer in layers:
        tree = merge(tree, layer)
    try:
        return DashConfig(**tree)
    except TypeError as e:  # a wrong value type that the dataclass itself rejects
        raise ConfigError(f"config: {e}") from None


# The embedded default's recipe: every value that differs from DashConfig's defaults, in one place.
# The tiny char-level model needs a far larger learning rate and much shorter completions than the
# paper's Qwen2.5 runs; the algorithm settings (64 prompts x G=4, tau=0.1, temperature 0.9) are the paper's.
EMBEDDED_DEFAULT: dict[str, Any] = {
    # Tuned on 2 CPU cores (see README): SFT leaves the tiny model at ~40% greedy accuracy, then RL
    # with 64 prompts x 8 samples lifts it by well over 15 points in a few minutes. G = 8 rather than
    # the paper's 4: with a 0.4M-parameter policy, the larger group gives a less noisy advantage.
    "preset": "dash",
    "max_steps": 300,
    "learning_rate": 1e-4,
    "group_size": 8,
    "max_prompt_tokens": 32,
    "max_completion_tokens": 24,
    "eval_examples": 500,
    "eval_every": 100,
    "micro_batch_tokens": 4096,
    "sft": {"steps": 200},
}
