"""The DASH training loop. One optimizer step = one rollout:

    sample (one big generate) -> reward -> advantage -> filter |A| > tau -> micro-batches -> step

`DashTrainer` wires the stages and runs the loop; `train_step` is the algorithm in one screen. Each
stage is a module with one job: collect.py (prompts, sampling incl. overlap and refill, rewards ->
a `Batch`), algo.py (advantages, filter, losses: pure functions), learner.py (epochs x minibatches of
optimizer steps, micro-batches, OOM retry, weight sync), evaluation.py, checkpoint.py, callbacks.py
and metrics.py (the step record).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import time
from typing import Any

import torch

from dash_fast import algo, metrics
from dash_fast import callbacks as callbacks_lib
from dash_fast.checkpoint import (
    latest_checkpoint,
    load_weights,
    pending_rollout_state,
    restore_pending_rollout,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dash_fast.collect import Collector, RewardFunc, RewardScorer
from dash_fast.config import DashConfig
from dash_fast.data.formats import DEFAULT_REWARDS, load_dataset_rows
from dash_fast.data.prompts import PromptDataset, PromptSampler
from dash_fast.engines.base import Rollout
from dash_fast.evaluation import greedy_accuracy
from dash_fast.learner import Learner, TrainingAborted
from dash_fast.memory_plan import enable_gradient_checkpointing, startup_plan
from dash_fast.metrics import MetricsLogger
from dash_fast.mixed_precision import MixedPrecision, is_bf16_run, to_masters
from dash_fast.models.peft import is_peft_model, reference_policy
from dash_fast.overlap import OverlapScheduler, usable_cpus
from dash_fast.runtime import distributed as ddp
from dash_fast.runtime.cpu_memory import keep_freed_memory
from dash_fast.runtime.device import SPINNING_NOTICE, apply_cpu_threads, make_deterministic, resolve_dtype
from dash_fast.runtime.profiling import ProfileWindow

__all__ = ["DashTrainer", "TrainingAborted", "attn_implementation", "load_model", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per local rank
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(name)


def attn_implementation(device: torch.device, dtype: str) -> str:
    """flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed (`pip install dash-fast[flash]`),
    else PyTorch SDPA (which itself picks a flash / memory-efficient kernel on CUDA)."""
    import importlib.util

    if device.type == "cuda" and dtype in ("bfloat16", "float16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def load_model(model: str | torch.nn.Module, dtype: str, device: torch.device,
               masters: bool = False) -> torch.nn.Module:
    """The model on `device`: loaded in `dtype`, or with `masters` (a bf16 run's fp32 master weights,
    mixed_precision.py) loaded in fp32 / its trainable parameters cast to fp32."""
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
        return to_masters(model) if masters else model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32 if masters else getattr(torch, dtype),
                              "attn_implementation": attn_implementation(device, dtype)}
    return AutoModelForCausalLM.from_pretrained(model, **kwargs).to(device)


def logit_transform(model) -> str | None:
    """Why the model's logits are not `hidden @ lm_head.T` up to a constant factor (the loss and log-prob ops
    compute that; the learner folds Cohere's / Granite's factor into the hidden states, learner.logit_multiplier),
    naming the config field; None when they are. Gemma-2/3 soft-cap them. `model`: a module or its config."""
    config = getattr(model, "config", model)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    checks = (("final_logit_softcapping", None),)
    for name, neutral in checks:
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return (f"config.{name}={value}: it transforms the logits after the lm_head, which dash-fast's loss, "
                    "log-prob and sampling ops do not apply")
    return None


def check_text_only(model: str | torch.nn.Module, trust_remote_code: bool = False) -> None:
    """Refuse, before any weights load, a vision-language model (its config has a vision tower, or is one of
    transformers' image-text-to-text types: the engines and the training forward take token ids only, so its
    image inputs could not reach it) and one whose logits the ops cannot compute (`logit_transform`)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if isinstance(model, str):
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):  # not a readable config: loading the model reports it
            return
        name = model
    else:
        config = getattr(model, "config", None)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = type(inner).__name__
    model_type = getattr(config, "model_type", None)
    if getattr(config, "vision_config", None) is not None or model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"dash-fast does not support model={name!r}: its config ({model_type}) is a vision-language "
                         "config, and dash-fast's engines and training forward take token ids only (no images); "
                         "pass a text-only causal LM")
    reason = logit_transform(config)
    if reason:
        raise ValueError(f"dash-fast does not support {reason}")


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


class DashTrainer:
    """TRL-shaped trainer: `DashTrainer(model, reward_funcs, args, train_dataset, eval_dataset,
    processing_class).train()`. `model` is a path or a loaded causal LM; reward functions use TRL's
    signature `f(prompts, completions, completion_ids=..., **columns) -> list[float | None]`."""

    def __init__(
        self,
        model: str | torch.nn.Module,
        reward_funcs: RewardFunc | str | list[RewardFunc | str] | None = None,
        args: DashConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        # `config` is what the loop reads; `args` is the same object here (GRPOTrainer's `args` is its GRPOConfig)
        self.config = self.args = args = args or DashConfig()
        # first: in-process vLLM on CPU makes set_num_threads a no-op; device_setup.py says what auto picks
        if apply_cpu_threads(args.cpu_threads, args.cpu_affinity)[1] == SPINNING_NOTICE and \
                int(os.environ.get("RANK", "0")) == 0:
            print(f"dash-fast: {SPINNING_NOTICE}")
        torch.manual_seed(args.seed)
        # datasets first (a bad layout fails before any model loads), in the standard columns by dataset_format
        train_dataset = args.dataset if train_dataset is None else train_dataset
        eval_dataset = args.eval_dataset if eval_dataset is None else eval_dataset
        if train_dataset is None:
            raise ValueError("no train_dataset (pass one, or set `dataset` in the config)")
        train_rows, self.dataset_format = load_dataset_rows(train_dataset, args.dataset_format, args.prompt_column,
                                                            "train_dataset")
        eval_rows = None if eval_dataset is None else \
            load_dataset_rows(eval_dataset, args.dataset_format, args.prompt_column, "eval_dataset")[0]
        self.device = resolve_device(args.device)
        if args.deterministic:
            make_deterministic(self.device)
        self.dist = ddp.init_distributed(self.device.type)
        check_text_only(model)
        dtype = resolve_dtype(args.dtype, self.device)
        bf16 = is_bf16_run(dtype, model if isinstance(model, torch.nn.Module) else None)
        masters = bf16 and args.master_weights
        # planned before the weights load: refuses when nothing fits, sets what args leave to it (memory_plan.py)
        self.memory_plan = startup_plan(model, args, self.device, dtype, verbose=self.dist.is_main)
        self.model = load_model(model, dtype, self.device, masters=masters)
        if self.device.type == "cpu":  # activations live in host memory: reuse pages across steps (small models)
            keep_freed_memory(sum(p.numel() * p.element_size() for p in self.model.parameters()))
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if bf16 and not masters and self.dist.is_main:
            print("dash-fast: master_weights=False trains the bf16 weights in place: no fp32 master copy, AdamW "
                  "state in bf16, so updates smaller than bf16's precision (~0.4% of a weight) are lost")
        ddp.broadcast_module(self.model, self.dist)
        if processing_class is None:
            source = model if isinstance(model, str) else getattr(self.model, "name_or_path", None)
            if not source:
                raise ValueError("pass processing_class (a tokenizer) when model is a loaded module")
            processing_class = AutoTokenizer.from_pretrained(source)
        self.tokenizer = processing_class
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.rewards = RewardScorer(reward_funcs or args.reward_funcs or DEFAULT_REWARDS[self.dataset_format],
                                    args.reward_weights, args.accuracy_reward, self.tokenizer)
        if any(getattr(f, "needs_sandbox", False) for f in self.rewards.funcs):
            from dash_fast.rewards.sandbox import set_default_sandbox

            set_default_sandbox(args.sandbox)  # refuses to start (SandboxUnavailable) without containment

        data_kwargs = dict(prompt_column=args.prompt_column if self.dataset_format == "prompt" else "prompt",
                           max_prompt_tokens=args.max_prompt_tokens, system_prompt=args.system_prompt,
                           use_chat_template=args.use_chat_template, chat_template_kwargs=args.chat_template_kwargs)
        self.train_data = PromptDataset(train_rows, self.tokenizer, name="train_dataset", **data_kwargs)
        self.eval_data = None
        if eval_rows is not None:
            self.eval_data = PromptDataset(eval_rows, self.tokenizer, name="eval_dataset", **data_kwargs)
        self.sampler = PromptSampler(len(self.train_data), args.seed if args.data_seed is None else args.data_seed)
        ddp.shard_range(args.prompts_per_step, self.dist)  # fail early when prompts do not split over ranks

        self.fsdp_root = None  # FSDP2: NCCL on GPU, gloo on CPU
        if args.parallel == "fsdp2" and self.dist.enabled:
            if args.beta > 0 or args.engine != "torch":
                raise ValueError("parallel=fsdp2 supports beta=0 and engine=torch only")
            self.fsdp_root = ddp.fully_shard_model(self.model)
        # bf16 compute over the fp32 masters; the sampler reads a bf16 copy (not for PEFT, whose base stays bf16
        # and whose adapters the static engine cannot read, nor FSDP2, whose shards it would have to gather)
        self.precision = MixedPrecision(self.model, self.device, torch.bfloat16 if masters else None,
                                        sampler_copy=not is_peft_model(self.model) and self.fsdp_root is None)
        self.shared_prompt = self._use_shared_prompt()
        self.engine = make_engine(args, self.precision.sampler_model, self.tokenizer, self.pad_id)
        if self.dist.is_main:
            print("dash-fast: rollout engine: {engine_path}; training forward: {train_forward_path}".format(
                **self.paths()), flush=True)
        if args.overlap and self.fsdp_root is not None:
            raise ValueError("overlap=True is not supported with parallel=fsdp2")
        concurrent = getattr(self.engine, "can_sample_concurrently", False)
        self.overlap = OverlapScheduler(self.device, concurrent=concurrent, sampler_cores=args.sampler_cores,
                                        cpus=usable_cpus(args.cpu_affinity),
                                        bind_cpus=args.bind_cpus,
                                        cpu_sampler="thread" if getattr(self.engine, "samples_in_own_process", False)
                                        else args.cpu_sampler,
                                        engine=self.engine) if args.overlap else None
        self.collector = Collector(args, self.engine, self.train_data, self.sampler, self.rewards, self.dist,
                                   self.overlap, self.pad_id, stop_token_ids(self.tokenizer, self.model), self.fsdp_root)

        # fused: one pass over each parameter's param/grad/moments (2x faster than the default per-tensor loop
        # at the 0.5B shape on CPU, bench/results/roofline.md); FSDP2's sharded DTensors keep the default
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay,
            fused=self.fsdp_root is None or None,
        )
        total_updates = max(1, args.max_steps * args.epochs_per_rollout * args.minibatches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args, total_updates))
        ref_model, ref_context = None, None
        if args.beta > 0 and is_peft_model(self.model):  # the reference is in the policy's weights (peft_support)
            ref_context = functools.partial(reference_policy, self.model)
        elif args.beta > 0:
            ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.learner = Learner(args, self.model, optimizer, scheduler, self.engine, self.dist, self.overlap,
                               ref_model, self.fsdp_root, self.shared_prompt, self.pad_id, self.device,
                               ref_context=ref_context, precision=self.precision)
        self.learner.on_substep_end = functools.partial(self._callback, "on_substep_end")

        self.output_dir = args.output_dir or time.strftime("runs/%Y%m%d-%H%M%S")
        os.makedirs(self.output_dir, exist_ok=True)
        self.state, self.control = callbacks_lib.trainer_state(args.max_steps, args.logging_steps,
                                                                args.save_steps, self.dist.is_main)
        self.rewards.trainer_state = self.state
        self.callbacks = list(callbacks or [])
        self.callback_args: Any = args  # what callbacks receive as `args` (GRPOTrainer passes its GRPOConfig)
        self.stop_requested = False
        self.eval_history: list[dict] = []

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    @property
    def scheduler(self):
        return self.learner.scheduler

    @property
    def reward_names(self) -> list[str]:
        return self.rewards.names

    # ------------------------------------------------------------------ setup helpers
    def _use_shared_prompt(self) -> bool:
        """Train with each prompt computed once per group (shared_prompt.py) where the model allows it.
        `auto` picks it on CPU only: on GPU its speed against flash-attn / SDPA padding masks is unmeasured."""
        from dash_fast.models.shared_prompt import shared_prompt_unsupported

        self.forward_path = "model's own forward"  # what the start-up line and summary.json name
        if self.config.train_forward == "hf" or (self.config.train_forward == "auto" and self.device.type != "cpu"):
            return False
        reason = "parameters sharded by FSDP2" if self.fsdp_root is not None else shared_prompt_unsupported(self.model)
        if reason and self.config.train_forward == "shared_prompt":
            raise ValueError(f"train_forward='shared_prompt' cannot run this model: {reason}")
        self.forward_path = f"model's own forward (shared-prompt forward: {reason})" if reason else "shared-prompt"
        return reason is None

    def paths(self) -> dict:
        """Which rollout engine path and training forward run (the start-up line, summary.json)."""
        describe = getattr(self.engine, "describe", lambda: type(self.engine).__name__)  # an injected engine
        return {"engine_path": describe(), "train_forward_path": self.forward_path}

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict:
        """One optimizer step's algorithm: collect a batch -> advantages -> filter -> update -> record."""
        a, t_start = self.config, time.perf_counter()
        batch = self.collector.collect(step, self.learner.weights_version)
        if batch.skipped:  # a reward function failed and on_reward_error="skip": no update
            return {**metrics.skipped_record(step, batch.time_generate_s, time.perf_counter() - t_start, self._lr()),
                    **self.rewards.flush_logs()}
        advantages = algo.group_advantages(batch.rewards, a.group_size, a.scale_rewards)
        kept = algo.filter_rows(advantages, a.filter_tau)
        t0 = time.perf_counter()
        if a.beta == 0 and self.learner.entropy_bonus is None and not bool((advantages[kept] != 0).any()):
            # no kept row carries signal (every row filtered and the fallback row has A = 0) and no KL or entropy
            # term: the loss and its gradient are exactly 0, so no forward/backward, no optimizer or LR step
            train_stats = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0,
                           "skipped_steps": 0, "optimizer_steps": 0, "no_signal": 1,
                           **metrics.LogpDifference().record()}  # no forward ran: nothing measured (nan)
        else:
            train_stats = {**self.update(batch.rollout, advantages, kept, global_rows=batch.global_rows,
                                         lengths=batch.lengths), "no_signal": 0}
        t_train, t_step = time.perf_counter() - t0, time.perf_counter() - t_start
        record = metrics.step_record(batch, kept, train_stats, self.rewards.names, self.rewards.accuracy_index,
                                     self._lr(), t_train, t_step)
        return {**record, **self.rewards.flush_logs()}  # what reward functions logged (log_metric, log_extra)

    def update(self, rollout: Rollout, advantages: torch.Tensor, kept: torch.Tensor,
               global_rows: list[int] | None = None, lengths: torch.Tensor | None = None) -> dict:
        """The learner's optimizer steps on the kept rows of this step's batch (learner.Learner.update)."""
        return self.learner.update(rollout, advantages, kept, global_rows, lengths, step=self.state.global_step + 1)

    def generate(self, prompt_ids: list[list[int]], step: int, row_offset: int = 0) -> Rollout:
        """Sample `prompt_ids` with step `step`'s seeds (collect.Collector.generate)."""
        return self.collector.generate(prompt_ids, step, row_offset)

    def _lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, dataset: PromptDataset | None = None, max_examples: int | None = None,
                 batch_size: int = 256) -> dict:
        """Greedy accuracy (mean of the accuracy reward) on held-out prompts (split over ranks)."""
        dataset = dataset or self.eval_data
        if self.overlap is not None:  # the engine is busy with a rollout sampled ahead
            self.overlap.wait()
        if dataset is None:
            raise ValueError("no eval dataset")
        n = min(len(dataset), max_examples or self.config.eval_examples)
        params = self.collector.sampling_params(0, greedy=True, max_new=self.config.eval_max_completion_tokens)
        result = greedy_accuracy(self.engine, self.rewards, dataset, n, params, self.dist, self.fsdp_root, batch_size)
        self.collector.engine_prepared = False  # eval may have grown the cache (dropping graphs): re-capture first
        return result

    def _evaluate(self, step: int) -> dict:
        result = self.evaluate()
        self.eval_history.append({"step": step, **result})
        if self.dist.is_main:
            print(f"dash-fast: eval at step {step}: accuracy {result['accuracy']:.3f} on {result['examples']} examples")
        self._callback("on_evaluate", metrics={f"eval_{k}": v for k, v in result.items()})
        return result

    # ------------------------------------------------------------------ checkpoints and callbacks
    def _callback(self, event: str, **kwargs) -> None:
        callbacks_lib.fire(self.callbacks, event, self.callback_args, self.state, self.control, model=self.model,
                           processing_class=self.tokenizer, optimizer=self.optimizer, lr_scheduler=self.scheduler,
                           **kwargs)

    def _checkpoint_state(self, optimizer: bool = True) -> dict:
        learner = self.learner
        return {
            "step": self.state.global_step,
            "optimizer": self.optimizer.state_dict() if optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "micro_batch_tokens": learner.micro_batch_tokens,
            "nonfinite_in_a_row": learner.nonfinite_in_a_row,
            "log_history": self.state.log_history,
            "eval_history": self.eval_history,
            "config": self.config.to_dict(),
            "weights_version": learner.weights_version,
            "entropy_bonus": learner.entropy_bonus.state_dict() if learner.entropy_bonus is not None else None,
            **pending_rollout_state(self.overlap, self.dist.enabled),
        }

    def save(self, step: int) -> str | None:
        """Checkpoint on rank 0 (every rank takes part in gathering FSDP2 state); returns its path."""
        model_sd = None
        state = self._checkpoint_state() if self.fsdp_root is None else None
        if self.fsdp_root is not None:  # collective: full weights and optimizer state, on rank 0's CPU
            model_sd = ddp.full_state_dict(self.fsdp_root)
            state = {**self._checkpoint_state(optimizer=False),
                     "optimizer": ddp.full_optimizer_state(self.fsdp_root, self.optimizer)}
        path = None
        if self.dist.is_main:
            path = save_checkpoint(os.path.join(self.output_dir, "checkpoints"), step, self.model, self.tokenizer,
                                   state, keep_last=self.config.keep_last_checkpoints, state_dict=model_sd)
        ddp.barrier(self.dist)
        self._callback("on_save")
        return path

    def _resume(self) -> int:
        resume = self.config.resume
        if not resume:
            return 0
        path = latest_checkpoint(os.path.join(self.output_dir, "checkpoints")) if resume == "auto" else resume
        if path is None:
            return 0
        state = load_weights(path, self.model, self.optimizer, self.fsdp_root)
        self.precision.refresh()  # the sampler's bf16 copy of the restored masters
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        restore_pending_rollout(state, self.overlap, self.sampler)
        self.learner.weights_version = state.get("weights_version", state["step"])
        set_rng_state(state["rng"])
        self.learner.micro_batch_tokens = state["micro_batch_tokens"]
        self.learner.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        if self.learner.entropy_bonus is not None and state.get("entropy_bonus") is not None:
            self.learner.entropy_bonus.load_state_dict(state["entropy_bonus"])  # the adaptive coefficient
        self.state.log_history = state["log_history"]
        self.eval_history = state["eval_history"]
        self.state.global_step = state["step"]
        if self.dist.is_main:
            print(f"dash-fast: resumed from {path} (step {state['step']})")
        return state["step"]

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: stop now, without a checkpoint
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        print(f"dash-fast: got signal {signum}; saving at the end of this step (again to stop now)", flush=True)
        self.stop_requested = True

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Run RL for `max_steps` optimizer steps; returns the summary written to summary.json."""
        a = self.config
        t_begin = time.perf_counter()
        start = self._resume()
        logger = MetricsLogger(self.output_dir, a.report_to, append=start > 0) if self.dist.is_main else None
        if start > 0 and logger is not None:
            logger.truncate_after(start)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if _main_thread() else {}
        trace = os.path.join(self.output_dir, f"trace-rank{self.dist.rank}.json" if self.dist.enabled else "trace.json")
        profile = ProfileWindow(a.profile_steps, trace_path=trace if a.trace else None)
        try:
            if start == 0 and self.eval_data is not None:
                self._evaluate(0)
            self._callback("on_train_begin")
            bar = None
            if not a.disable_tqdm and self.dist.is_main:
                from tqdm.auto import tqdm

                bar = tqdm(total=a.max_steps, initial=start, desc="dash-fast RL", dynamic_ncols=True)
            for step in range(start + 1, a.max_steps + 1):
                profile.before_step(step)
                self._callback("on_step_begin")
                record = self.train_step(step)
                profile.after_step(step)
                self.state.global_step = step
                self.state.log_history.append(record)
                if self.eval_data is not None and ((a.eval_every and step % a.eval_every == 0) or step == a.max_steps):
                    record.update({f"eval_{k}": v for k, v in self._evaluate(step).items()})
                if logger is not None:
                    logger.log(record)
                self._callback("on_step_end")
                if a.logging_steps and step % a.logging_steps == 0:
                    self._callback("on_log", logs=record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kept=f"{record['kept_fraction']:.2f}",
                                    acc=f"{record['accuracy']:.3f}")
                last = step == a.max_steps
                stop = ddp.any_rank(self.stop_requested or self.control.should_training_stop, self.dist)
                if (a.save_steps and step % a.save_steps == 0) or last or stop:
                    self.save(step)
                if stop:
                    if not last:
                        print(f"dash-fast: stopped at step {step}; continue with --resume auto", flush=True)
                    break
            if bar is not None:
                bar.close()
            summary = self._finish(t_begin)
            self._callback("on_train_end")
            return summary
        finally:
            profile.close()
            if self.overlap is not None:  # no sampler process outlives training (a finished or failed one)
                self.overlap.close()
            if logger is not None:
                logger.close()
            for s, h in handlers.items():
                signal.signal(s, h)

    def _finish(self, t_begin: float) -> dict:
        step = self.state.global_step
        finished = step >= self.config.max_steps and not self.stop_requested
        summary = metrics.run_summary(step, finished, self.state.log_history, self.eval_history,
                                      time.perf_counter() - t_begin, self.config.to_dict())
        summary["memory_plan"] = self.memory_plan.to_dict() if self.memory_plan is not None else None
        summary.update(self.paths())
        if self.dist.is_main:
            metrics.write_summary(self.output_dir, summary, plots=bool(self.state.log_history))
        return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _lr_lambda(args: DashConfig, total: int):
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
