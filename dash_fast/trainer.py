"""The DASH training loop. One optimizer step = one rollout:

    sample (one big generate) -> reward -> advantage -> filter |A| > tau -> micro-batches -> step

`DashTrainer` wires the stages and runs the loop; `train_step` is the algorithm in one screen. Each
stage is a module with one job: collect.py (prompts, sampling incl. overlap and refill, rewards ->
a `Batch`), algo.py (advantages, filter, losses: pure functions), learner.py (epochs x minibatches of
optimizer steps, micro-batches, OOM retry, weight sync), losses.py (the loss registry), evaluation.py,
checkpoint.py, callbacks.py and metrics.py (the step record); models/loading.py loads the model and
rewards/scorer.py scores completions.

What a layer over the core may vary is declared here: `Extensions` (given to the constructor) and the
methods marked "extension point"; the TRL drop-in (trl/trainer.py) is built through them alone.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from dash_fast.collect import Collector
from dash_fast.config import DashConfig
from dash_fast.data.formats import DEFAULT_REWARDS, load_dataset_rows
from dash_fast.data.prompts import PromptDataset, PromptSampler
from dash_fast.engines.base import Rollout
from dash_fast.evaluation import greedy_accuracy
from dash_fast.learner import Learner, LearnerHooks, LearnerParts, TrainingAborted
from dash_fast.losses import EntropyBonus
from dash_fast.memory_plan import enable_gradient_checkpointing, startup_plan
from dash_fast.metrics import MetricsLogger
from dash_fast.models.loading import check_text_only, load_model, resolve_device
from dash_fast.models.mixed_precision import MixedPrecision, is_bf16_run
from dash_fast.models.peft import is_peft_model, reference_policy
from dash_fast.overlap import OverlapScheduler
from dash_fast.rewards.scorer import RewardFunc, RewardScorer
from dash_fast.runtime import distributed as ddp
from dash_fast.runtime.cpu_memory import keep_freed_memory
from dash_fast.runtime.cpus import usable_cpus
from dash_fast.runtime.device import SPINNING_NOTICE, apply_cpu_threads, make_deterministic, resolve_dtype
from dash_fast.runtime.profiling import ProfileWindow

__all__ = ["DashTrainer", "Extensions", "TrainingAborted"]


@dataclass
class Extensions:
    """What a layer over the core may vary, declared in one place; each default is the core's own behaviour.
    The TRL adapter (trl/trainer.py) builds its DashTrainer through these and through DashTrainer's methods
    marked "extension point"; nothing else of the core is replaced or rewired.

    - `prompts(train_data) -> (prompt source, sampler)`: where training draws prompts from and in which
      order (default: the PromptDataset and a seeded shuffled PromptSampler over it).
    - `reward_post(data, indices, rollout, repeat, rewards, per_func) -> rewards`: post-processing of the
      rewards of every training rollout the collector scores (refill rounds included), before the all-gather.
    - `row_mask(rollout, kept) -> kept`: rows the loss leaves out, after the gradient filter.
    - `loss` / `loss_options`: the loss by name from losses.py's registry (default: `config.loss_impl`);
      `entropy_bonus`: its stateful entropy term (saved in checkpoints, stepped after each optimizer step).
    """

    prompts: Callable[[PromptDataset], tuple[Any, Any]] | None = None
    reward_post: Callable[..., torch.Tensor] | None = None
    row_mask: Callable[[Rollout, torch.Tensor], torch.Tensor] | None = None
    loss: str | None = None
    loss_options: dict = field(default_factory=dict)
    entropy_bonus: EntropyBonus | None = None


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
    signature `f(prompts, completions, completion_ids=..., **columns) -> list[float | None]`.

    A layer over it varies the run through `extensions` (Extensions) and by overriding the methods marked
    "extension point" (emit, begin_step, finish_step, eval_during_training, saved, end_training)."""

    def __init__(
        self,
        model: str | torch.nn.Module,
        reward_funcs: RewardFunc | str | list[RewardFunc | str] | None = None,
        args: DashConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
        extensions: Extensions | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        ext = self.extensions = extensions or Extensions()
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
        self.dist = ddp.init_distributed(self.device.type, args.dist_timeout_s)
        self.state, self.control = callbacks_lib.trainer_state(args.max_steps, args.logging_steps,
                                                                args.save_steps, self.dist.is_main)
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
                                    args.reward_weights, args.accuracy_reward, self.tokenizer, trainer_state=self.state)
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
        if ext.prompts is not None:
            self.train_data, self.sampler = ext.prompts(self.train_data)
        else:
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
        self.overlap = make_overlap(args, self.device, self.engine) if args.overlap else None
        self.collector = Collector(args, self.engine, self.train_data, self.sampler, self.rewards, self.dist,
                                   self.overlap, self.pad_id, stop_token_ids(self.tokenizer, self.model), self.fsdp_root,
                                   reward_post=ext.reward_post)

        optimizer, scheduler = make_optimizer(args, self.model, sharded=self.fsdp_root is not None)
        ref_model, ref_context = make_reference(args, self.model)
        parts = LearnerParts(self.model, optimizer, scheduler, self.engine, self.dist, loss=ext.loss or args.loss_impl,
                             loss_options=ext.loss_options, entropy_bonus=ext.entropy_bonus, precision=self.precision,
                             ref_model=ref_model, ref_context=ref_context, fsdp_root=self.fsdp_root,
                             shared_prompt=self.shared_prompt, pad_id=self.pad_id, device=self.device)
        self.learner = Learner(args, parts, self._learner_hooks())
        if self.dist.is_main and self.learner.sampler_is:  # DashConfig.sampler_is_*: where sampler and trainer differ
            print(f"dash-fast: sampler importance sampling: {args.sampler_is_mode}, ratio bounds "
                  f"[{args.sampler_is_clip_min}, {args.sampler_is_clip_max}]", flush=True)

        self.output_dir = args.output_dir or time.strftime("runs/%Y%m%d-%H%M%S")
        os.makedirs(self.output_dir, exist_ok=True)
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
    def _learner_hooks(self) -> LearnerHooks:
        """The overlap scheduler's and the callbacks' places in the learner's loop: the learner widens onto
        the sampler's cores between micro-batches and waits for it before an optimizer step (which changes
        the weights it reads); transformers' events around each micro-step and optimizer step."""
        overlap = self.overlap
        return LearnerHooks(
            before_micro_batch=[overlap.between_micro_batches] if overlap is not None else [],
            after_micro_batch=[self._substep_end],
            before_optimizer_step=[*([overlap.wait] if overlap is not None else []),
                                   functools.partial(self.emit, "on_pre_optimizer_step")],
            after_optimizer_step=[functools.partial(self.emit, "on_optimizer_step")])

    def _substep_end(self, index: int, count: int) -> None:
        if index < count - 1:  # transformers' on_substep_end: every micro-step but an optimizer step's last
            self.emit("on_substep_end")

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
        self.begin_step(step)
        return self.finish_step(step, self._step(step))

    def _step(self, step: int) -> dict:
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
                           "skipped_steps": 0, "optimizer_steps": 0, "no_signal": 1, "time/sync_weights": 0.0,
                           # no forward ran: nothing measured (nan), the same keys as a trained step's record
                           **metrics.LogpDifference(importance_sampling=self.learner.sampler_is).record()}
        else:
            train_stats = {**self.update(batch.rollout, advantages, kept, global_rows=batch.global_rows,
                                         lengths=batch.lengths), "no_signal": 0}
        t_train, t_step = time.perf_counter() - t0, time.perf_counter() - t_start
        record = metrics.step_record(batch, kept, train_stats, self.rewards.names, self.rewards.accuracy_index,
                                     self._lr(), t_train, t_step)
        return {**record, **self.rewards.flush_logs()}  # what reward functions logged (log_metric, log_extra)

    def update(self, rollout: Rollout, advantages: torch.Tensor, kept: torch.Tensor,
               global_rows: list[int] | None = None, lengths: torch.Tensor | None = None) -> dict:
        """The learner's optimizer steps on the kept rows of this step's batch (learner.Learner.update), less
        the rows `extensions.row_mask` leaves out."""
        if self.extensions.row_mask is not None:
            kept = self.extensions.row_mask(rollout, kept)
            if kept.numel() == 0:
                return self.learner.no_rows()
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
        self.collector.engine_changed()  # eval may have grown the cache (dropping graphs): re-capture first
        return result

    # ------------------------------------------------------------------ extension points
    def begin_step(self, step: int) -> None:
        """Extension point: called before step `step` collects its batch."""

    def finish_step(self, step: int, record: dict) -> dict:
        """Extension point: step `step`'s record, as it goes to the log (and state.log_history)."""
        return record

    def eval_during_training(self, step: int) -> dict:
        """Extension point: the evaluation the loop runs at step 0 and every `eval_every` steps (and at the
        last); returns the metrics merged into the step's record as `eval_*`."""
        result = self.evaluate()
        self.eval_history.append({"step": step, **result})
        if self.dist.is_main:
            print(f"dash-fast: eval at step {step}: accuracy {result['accuracy']:.3f} on {result['examples']} examples")
        self.emit("on_evaluate", metrics={f"eval_{k}": v for k, v in result.items()})
        return result

    def saved(self, step: int, path: str) -> None:
        """Extension point: after rank 0 wrote step `step`'s checkpoint at `path` (and on_save fired)."""

    def end_training(self, summary: dict) -> None:
        """Extension point: the end of train(), after summary.json is written."""
        self.emit("on_train_end")

    def emit(self, event: str, **kwargs) -> None:
        """Extension point: fire callback `event` (callbacks.py) with the trainer's objects."""
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
        self.emit("on_save")
        if path is not None:
            self.saved(step, path)
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
                self.eval_during_training(0)
            self.emit("on_train_begin")
            bar = None
            if not a.disable_tqdm and self.dist.is_main:
                from tqdm.auto import tqdm

                bar = tqdm(total=a.max_steps, initial=start, desc="dash-fast RL", dynamic_ncols=True)
            for step in range(start + 1, a.max_steps + 1):
                profile.before_step(step)
                self.emit("on_step_begin")
                record = self.train_step(step)
                profile.after_step(step)
                self.state.global_step = step
                self.state.log_history.append(record)
                if self.eval_data is not None and ((a.eval_every and step % a.eval_every == 0) or step == a.max_steps):
                    record.update({f"eval_{k}": v for k, v in self.eval_during_training(step).items()})
                if logger is not None:
                    logger.log(record)
                self.emit("on_step_end")
                if a.logging_steps and step % a.logging_steps == 0:
                    self.emit("on_log", logs=record)
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
            self.end_training(summary)
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


def make_overlap(args: DashConfig, device: torch.device, engine) -> OverlapScheduler:
    """overlap=True: the scheduler that samples rollout r+1 beside step r's update (overlap.py)."""
    return OverlapScheduler(device, concurrent=getattr(engine, "can_sample_concurrently", False),
                            sampler_cores=args.sampler_cores, cpus=usable_cpus(args.cpu_affinity),
                            bind_cpus=args.bind_cpus,
                            cpu_sampler="thread" if getattr(engine, "samples_in_own_process", False) else args.cpu_sampler,
                            engine=engine)


def make_optimizer(args: DashConfig, model: torch.nn.Module, sharded: bool = False):
    """AdamW over the trainable parameters and its LR schedule (one scheduler step per optimizer step).
    Fused: one pass over each parameter's param/grad/moments (2x faster than the default per-tensor loop at
    the 0.5B shape on CPU, bench/results/roofline.md); FSDP2's sharded DTensors (`sharded`) keep the default."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay, fused=not sharded or None,
    )
    total_updates = max(1, args.max_steps * args.epochs_per_rollout * args.minibatches)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args, total_updates))


def make_reference(args: DashConfig, model: torch.nn.Module):
    """The KL reference when beta > 0: (a frozen copy, None), or with PEFT (None, a context under which the
    policy is the reference: its adapters disabled, models/peft.py); (None, None) when beta = 0."""
    if args.beta > 0 and is_peft_model(model):
        return None, functools.partial(reference_policy, model)
    if args.beta > 0:
        return copy.deepcopy(model).eval().requires_grad_(False), None
    return None, None


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
