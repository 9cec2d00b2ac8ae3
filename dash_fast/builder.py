"""The trainer's parts, built from a config: runtime, datasets, policy and tokenizer, rewards, prompts, the
rollout engine, the overlap scheduler, the optimizer and its schedule, the KL reference, and the learner's
hooks. DashTrainer's constructor calls these in order; each refuses a configuration it cannot run before
anything expensive happens after it (datasets before weights, the memory plan before the weights load).
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import torch

from dash_fast.config import DashConfig, shared_prompt_requested
from dash_fast.data.formats import DEFAULT_REWARDS, load_dataset_rows
from dash_fast.data.prompts import PromptDataset, PromptSampler
from dash_fast.forward import LearnerHooks
from dash_fast.memory_plan import MemoryPlan, enable_gradient_checkpointing, startup_plan
from dash_fast.models.loading import check_text_only, load_model
from dash_fast.models.mixed_precision import MixedPrecision, copy_unread_while_updating, is_bf16_run
from dash_fast.models.peft import is_peft_model, reference_policy
from dash_fast.overlap import OverlapScheduler
from dash_fast.rewards.scorer import RewardFunc, RewardScorer
from dash_fast.runtime import distributed as ddp
from dash_fast.runtime.cpu_memory import keep_freed_memory
from dash_fast.runtime.cpus import usable_cpus
from dash_fast.runtime.device import SPINNING_NOTICE, apply_cpu_threads, resolve_dtype

OptimizerSpec = tuple[type[torch.optim.Optimizer], dict[str, Any]]


def apply_threads(args: DashConfig) -> None:
    """The process's CPU threads and affinity; first, since in-process vLLM on CPU makes set_num_threads a
    no-op (device_setup.py says what `auto` picks)."""
    if apply_cpu_threads(args.cpu_threads, args.cpu_affinity)[1] == SPINNING_NOTICE and \
            int(os.environ.get("RANK", "0")) == 0:
        print(f"dash-fast: {SPINNING_NOTICE}")


def load_datasets(args: DashConfig, train_dataset: Any, eval_dataset: Any) -> tuple[list, list | None, str]:
    """(train rows, eval rows or None, dataset format) in the standard columns of `args.dataset_format`; the
    config's `dataset` / `eval_dataset` where none is passed. Before any model loads: a bad layout fails fast."""
    train_dataset = args.dataset if train_dataset is None else train_dataset
    eval_dataset = args.eval_dataset if eval_dataset is None else eval_dataset
    if train_dataset is None:
        raise ValueError("no train_dataset (pass one, or set `dataset` in the config)")
    train_rows, dataset_format = load_dataset_rows(train_dataset, args.dataset_format, args.prompt_column,
                                                   "train_dataset")
    eval_rows = None if eval_dataset is None else \
        load_dataset_rows(eval_dataset, args.dataset_format, args.prompt_column, "eval_dataset")[0]
    return train_rows, eval_rows, dataset_format


def load_policy(model: str | torch.nn.Module, args: DashConfig, device: torch.device,
                dist: ddp.DistInfo) -> tuple[torch.nn.Module, MemoryPlan | None, bool]:
    """(the policy on `device`, the start-up memory plan, whether it trains fp32 masters under bf16 compute).
    The plan comes before the weights load: it refuses when nothing fits and sets what `args` leave to it
    (memory_plan.py). Every rank starts from rank 0's weights."""
    check_text_only(model)
    dtype = resolve_dtype(args.dtype, device)
    bf16 = is_bf16_run(dtype, model if isinstance(model, torch.nn.Module) else None)
    masters = bf16 and args.master_weights
    # the weights' dtype as the run trains them: bf16 compute over fp32 masters, else a loaded module's own
    weights = dtype if isinstance(model, str) else str(next(model.parameters()).dtype).removeprefix("torch.")
    plan = startup_plan(model, args, device, "bfloat16" if masters else weights, verbose=dist.is_main)
    policy = load_model(model, dtype, device, masters=masters)
    if device.type == "cpu":  # activations live in host memory: reuse pages across steps (small models)
        heads = {id(m.weight) for m in (policy.get_input_embeddings(), policy.get_output_embeddings()) if m is not None}
        sizes = [(p.numel() * p.element_size(), id(p) in heads) for p in policy.parameters()]
        keep_freed_memory(sum(n for n, _ in sizes), max((n for n, head in sizes if not head), default=0))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if bf16 and not masters and dist.is_main:
        print("dash-fast: master_weights=False trains the bf16 weights in place: no fp32 master copy, AdamW "
              "state in bf16, so updates smaller than bf16's precision (~0.4% of a weight) are lost")
    ddp.broadcast_module(policy, dist)
    return policy, plan, masters


def load_tokenizer(processing_class: Any, model: str | torch.nn.Module, policy: torch.nn.Module) -> tuple[Any, int]:
    """(the tokenizer: `processing_class`, or the model path's; its pad id, eos when it has no pad)."""
    if processing_class is None:
        from transformers import AutoTokenizer

        source = model if isinstance(model, str) else getattr(policy, "name_or_path", None)
        if not source:
            raise ValueError("pass processing_class (a tokenizer) when model is a loaded module")
        processing_class = AutoTokenizer.from_pretrained(source)
    pad_id = processing_class.pad_token_id
    return processing_class, processing_class.eos_token_id if pad_id is None else pad_id


def make_rewards(reward_funcs: RewardFunc | str | list[RewardFunc | str] | None, args: DashConfig,
                 dataset_format: str, tokenizer: Any, state: Any) -> RewardScorer:
    """The reward functions (the dataset format's defaults when none is given); a sandboxed one refuses to
    start (SandboxUnavailable) without containment."""
    rewards = RewardScorer(reward_funcs or args.reward_funcs or DEFAULT_REWARDS[dataset_format],
                           args.reward_weights, args.accuracy_reward, tokenizer, trainer_state=state)
    if any(getattr(f, "needs_sandbox", False) for f in rewards.funcs):
        from dash_fast.rewards.sandbox import set_default_sandbox

        set_default_sandbox(args.sandbox)
    return rewards


def prompt_data(args: DashConfig, train_rows: list, eval_rows: list | None, tokenizer: Any, dataset_format: str,
                prompts: Callable[[PromptDataset], tuple[Any, Any]] | None = None) -> tuple[Any, PromptDataset | None, Any]:
    """(the prompt source training draws from, the eval PromptDataset or None, the sampler of training's prompt
    order): a seeded shuffled PromptSampler over the train PromptDataset, or what `prompts` (Extensions) makes."""
    kwargs = dict(prompt_column=args.prompt_column if dataset_format == "prompt" else "prompt",
                  max_prompt_tokens=args.max_prompt_tokens, system_prompt=args.system_prompt,
                  use_chat_template=args.use_chat_template, chat_template_kwargs=args.chat_template_kwargs)
    train = PromptDataset(train_rows, tokenizer, name="train_dataset", **kwargs)
    evaluation = None if eval_rows is None else PromptDataset(eval_rows, tokenizer, name="eval_dataset", **kwargs)
    if prompts is not None:
        train, sampler = prompts(train)
    else:
        sampler = PromptSampler(len(train), args.seed if args.data_seed is None else args.data_seed)
    return train, evaluation, sampler


def shard_policy(args: DashConfig, model: torch.nn.Module, dist: ddp.DistInfo):
    """parallel=fsdp2 under torchrun: the FSDP2 root over `model` (NCCL on GPU, gloo on CPU); else None."""
    if args.parallel != "fsdp2" or not dist.enabled:
        return None
    if args.beta > 0 or args.engine != "torch":
        raise ValueError("parallel=fsdp2 supports beta=0 and engine=torch only")
    if args.overlap:
        raise ValueError("overlap=True is not supported with parallel=fsdp2")
    return ddp.fully_shard_model(model)


def use_shared_prompt(args: DashConfig, device: torch.device, model: torch.nn.Module, fsdp_root: Any) -> tuple[bool, str]:
    """(whether training computes each prompt once per group (shared_prompt.py), the training forward's name for
    the start-up line and summary.json); config.shared_prompt_requested says when `train_forward` asks for it."""
    from dash_fast.models.shared_prompt import shared_prompt_unsupported

    if not shared_prompt_requested(args.train_forward, device.type):
        return False, "model's own forward"
    reason = "parameters sharded by FSDP2" if fsdp_root is not None else shared_prompt_unsupported(model)
    if reason and args.train_forward == "shared_prompt":
        raise ValueError(f"train_forward='shared_prompt' cannot run this model: {reason}")
    return reason is None, f"model's own forward (shared-prompt forward: {reason})" if reason else "shared-prompt"


def checkpointing_rule(plan: MemoryPlan | None) -> Callable[[int, int], bool] | None:
    """When the memory plan turned gradient checkpointing on, micro-batches small enough to fit its activations
    without it skip the recomputation; a setting the config asked for holds for every micro-batch."""
    return plan.checkpointing_needed if plan is not None and plan.choices.get("gradient_checkpointing") else None


def make_precision(args: DashConfig, model: torch.nn.Module, device: torch.device, masters: bool, fsdp_root: Any,
                   own_engine: bool) -> MixedPrecision:
    """bf16 compute over the fp32 `masters` (off: an fp32 run). The sampler reads a bf16 copy, except for PEFT
    (its base stays bf16 and the static engine cannot read its adapters) and FSDP2 (whose shards it would have to
    gather). The copy's memory is freed during each update where nothing reads it then: the built-in torch
    engine (`own_engine`) in this process on CPU, without overlap."""
    return MixedPrecision(model, device, torch.bfloat16 if masters else None,
                          sampler_copy=not is_peft_model(model) and fsdp_root is None,
                          release_in_update=own_engine and copy_unread_while_updating(device.type, args.engine,
                                                                                      args.overlap))


def make_engine(args: DashConfig, model: torch.nn.Module, tokenizer, pad_id: int):
    """The rollout engine of `args.engine`: the in-process torch engine, or vLLM (rollout/)."""
    if args.engine == "vllm":
        from dash_fast.engines.vllm_engine import VLLMEngine
        from dash_fast.engines.vllm_process import VLLMProcessEngine, use_process

        device = next(model.parameters()).device
        return VLLMProcessEngine(model, tokenizer, args) if use_process(args, device) else VLLMEngine(model, tokenizer, args)
    from dash_fast.engines.torch_engine import TorchEngine

    return TorchEngine(model, pad_id)


def stop_token_ids(tokenizer, model: torch.nn.Module) -> tuple[int, ...]:
    """The tokenizer's eos and the model's generation_config eos ids: sampling stops at any of them."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return tuple(sorted(ids))


def make_overlap(args: DashConfig, device: torch.device, engine) -> OverlapScheduler:
    """overlap=True: the scheduler that samples rollout r+1 beside step r's update (overlap.py)."""
    return OverlapScheduler(device, concurrent=getattr(engine, "can_sample_concurrently", False),
                            sampler_cores=args.sampler_cores, cpus=usable_cpus(args.cpu_affinity),
                            bind_cpus=args.bind_cpus,
                            cpu_sampler="thread" if getattr(engine, "samples_in_own_process", False) else args.cpu_sampler,
                            engine=engine)


def make_optimizer(args: DashConfig, model: torch.nn.Module, sharded: bool = False,
                   optimizer_cls_and_kwargs: OptimizerSpec | None = None):
    """The optimizer over the trainable parameters and its LR schedule (one scheduler step per optimizer step).
    Default AdamW, fused: one pass over each parameter's param/grad/moments (2x faster than the default
    per-tensor loop at the 0.5B shape on CPU, bench/results/roofline.md); FSDP2's sharded DTensors (`sharded`)
    keep the default. `optimizer_cls_and_kwargs` (transformers Trainer's argument of that name): another
    optimizer class, built here over the parameters as they train (after sharding), lr `args.learning_rate`
    unless its kwargs set one."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer_cls_and_kwargs is not None:
        cls, kwargs = optimizer_cls_and_kwargs
        optimizer = cls(trainable, **{"lr": args.learning_rate, **kwargs})
    else:
        optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.weight_decay, fused=not sharded or None)
    total_updates = max(1, args.max_steps * args.epochs_per_rollout * args.minibatches)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_updates))


def make_reference(args: DashConfig, model: torch.nn.Module):
    """The KL reference when beta > 0: (a frozen copy, None), or with PEFT (None, a context under which the
    policy is the reference: its adapters disabled, models/peft.py); (None, None) when beta = 0."""
    if args.beta > 0 and is_peft_model(model):
        return None, functools.partial(reference_policy, model)
    if args.beta > 0:
        return copy.deepcopy(model).eval().requires_grad_(False), None
    return None, None


def learner_hooks(overlap: OverlapScheduler | None, emit: Callable[..., None]) -> LearnerHooks:
    """The overlap scheduler's and the callbacks' places in the learner's loop: the learner widens onto the
    sampler's cores between micro-batches and waits for it before an optimizer step (which changes the weights
    it reads); transformers' events (`emit`) around each micro-step and optimizer step."""

    def substep_end(index: int, count: int) -> None:
        if index < count - 1:  # transformers' on_substep_end: every micro-step but an optimizer step's last
            emit("on_substep_end")

    return LearnerHooks(
        before_micro_batch=[overlap.between_micro_batches] if overlap is not None else [],
        after_micro_batch=[substep_end],
        before_optimizer_step=[*([overlap.wait] if overlap is not None else []),
                               functools.partial(emit, "on_pre_optimizer_step")],
        after_optimizer_step=[functools.partial(emit, "on_optimizer_step")])


def lr_lambda(args: DashConfig, total: int) -> Callable[[int], float]:
    """The LR factor of optimizer update `update` of `total`: linear warmup, then constant, linear or cosine."""

    def f(update: int) -> float:
        if args.warmup_steps and update < args.warmup_steps:
            return (update + 1) / args.warmup_steps
        progress = min(1.0, (update - args.warmup_steps) / max(1, total - args.warmup_steps))
        if args.lr_scheduler_type == "linear":
            return 1.0 - progress
        if args.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return f
