"""The DASH training loop. One optimizer step = one rollout:

    sample (one big generate) -> reward -> advantage -> filter |A| > tau -> micro-batches -> step

`DashTrainer` wires the stages (built by builder.py) and runs the loop; `train_step` is the algorithm in one
screen. Each stage is a module with one job: collect.py (prompts, sampling incl. overlap and refill, rewards ->
a `Batch`), algo.py (advantages, filter, losses: pure functions), learner.py (epochs x minibatches of
optimizer steps, micro-batches, OOM retry, weight sync) over forward.py (the policy's forward passes),
losses.py (the loss registry), evaluation.py, checkpoint.py, callbacks.py and metrics.py (the step record);
models/loading.py loads the model and rewards/scorer.py scores completions.

What a layer over the core may vary is declared here: `Extensions` (given to the constructor) and the
methods marked "extension point"; the TRL drop-in (trl/trainer.py) is built through them alone.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dash_fast import algo, builder, metrics
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
from dash_fast.collect import Collector, CollectorParts
from dash_fast.config import DashConfig
from dash_fast.data.prompts import PromptDataset
from dash_fast.engines.base import Rollout, RolloutEngine
from dash_fast.evaluation import greedy_accuracy
from dash_fast.forward import LearnerParts
from dash_fast.learner import Learner, TrainingAborted
from dash_fast.losses import EntropyBonus
from dash_fast.metrics import MetricsLogger
from dash_fast.models.loading import resolve_device
from dash_fast.rewards.scorer import RewardFunc
from dash_fast.runtime import distributed as ddp
from dash_fast.runtime.cpu_memory import reuse_freed_memory
from dash_fast.runtime.device import make_deterministic
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


class DashTrainer:
    """TRL-shaped trainer: `DashTrainer(model, reward_funcs, args, train_dataset, eval_dataset,
    processing_class).train()`. `model` is a path or a loaded causal LM; reward functions use TRL's
    signature `f(prompts, completions, completion_ids=..., **columns) -> list[float | None]`.

    A layer over it varies the run through `extensions` (Extensions) and by overriding the methods marked
    "extension point" (emit, begin_step, finish_step, eval_during_training, saved, end_training);
    `optimizer_cls_and_kwargs` (transformers Trainer's argument) replaces AdamW, and `rollout_engine(args, model,
    tokenizer, pad_id)` builds the engine (an engines.base.RolloutEngine) in place of builder.make_engine."""

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
        optimizer_cls_and_kwargs: builder.OptimizerSpec | None = None,
        rollout_engine: Callable[..., RolloutEngine] | None = None,
    ) -> None:
        ext = self.extensions = extensions or Extensions()
        # `config` is what the loop reads; `args` is the same object here (GRPOTrainer's `args` is its GRPOConfig)
        self.config = self.args = args = args or DashConfig()
        builder.apply_threads(args)
        torch.manual_seed(args.seed)
        train_rows, eval_rows, self.dataset_format = builder.load_datasets(args, train_dataset, eval_dataset)
        self.device = resolve_device(args.device)
        if args.deterministic:
            make_deterministic(self.device)
        self.dist = ddp.init_distributed(self.device.type, args.dist_timeout_s)
        self.state, self.control = callbacks_lib.trainer_state(args.max_steps, args.logging_steps,
                                                                args.save_steps, self.dist.is_main)
        self.model, self.memory_plan, masters = builder.load_policy(model, args, self.device, self.dist)
        self.tokenizer, self.pad_id = builder.load_tokenizer(processing_class, model, self.model)
        self.rewards = builder.make_rewards(reward_funcs, args, self.dataset_format, self.tokenizer, self.state)
        self.train_data, self.eval_data, self.sampler = builder.prompt_data(
            args, train_rows, eval_rows, self.tokenizer, self.dataset_format, ext.prompts)
        ddp.shard_range(args.prompts_per_step, self.dist)  # fail early when prompts do not split over ranks
        self.fsdp_root = builder.shard_policy(args, self.model, self.dist)
        self.precision = builder.make_precision(args, self.model, self.device, masters, self.fsdp_root,
                                                own_engine=rollout_engine is None)
        self.shared_prompt, self.forward_path = builder.use_shared_prompt(args, self.device, self.model,
                                                                          self.fsdp_root)
        self.engine = (rollout_engine or builder.make_engine)(args, self.precision.sampler_model, self.tokenizer,
                                                              self.pad_id)
        if self.dist.is_main:
            print("dash-fast: rollout engine: {engine_path}; training forward: {train_forward_path}".format(
                **self.paths()), flush=True)
        self.overlap = builder.make_overlap(args, self.device, self.engine) if args.overlap else None
        self.collector = Collector(args, CollectorParts(
            self.engine, self.train_data, self.sampler, self.rewards, self.dist, self.pad_id,
            builder.stop_token_ids(self.tokenizer, self.model), self.overlap, self.fsdp_root, ext.reward_post))
        optimizer, scheduler = builder.make_optimizer(args, self.model, self.fsdp_root is not None,
                                                      optimizer_cls_and_kwargs)
        ref_model, ref_context = builder.make_reference(args, self.model)
        parts = LearnerParts(self.model, optimizer, scheduler, self.engine, self.dist, loss=ext.loss or args.loss_impl,
                             loss_options=ext.loss_options, entropy_bonus=ext.entropy_bonus, precision=self.precision,
                             ref_model=ref_model, ref_context=ref_context, fsdp_root=self.fsdp_root,
                             shared_prompt=self.shared_prompt, pad_id=self.pad_id, device=self.device,
                             checkpointing=builder.checkpointing_rule(self.memory_plan))
        self.learner = Learner(args, parts, builder.learner_hooks(self.overlap, self.emit))
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
            return {**metrics.skipped_record(step, batch.time_generate_s, time.perf_counter() - t_start,
                                          self.scheduler.get_last_lr()[0]),
                    **self.rewards.flush_logs()}
        advantages = algo.group_advantages(batch.rewards, a.group_size, a.scale_rewards)
        kept = algo.filter_rows(advantages, a.filter_tau)
        t0 = time.perf_counter()
        if a.beta == 0 and self.learner.entropy_bonus is None and not bool((advantages[kept] != 0).any()):
            # no kept row carries signal (every row filtered and the fallback row has A = 0) and no KL or entropy
            # term: the loss and its gradient are exactly 0, so no forward/backward, no optimizer or LR step
            train_stats = metrics.no_signal_stats(self.learner.sampler_is)
        else:
            train_stats = {**self.update(batch.rollout, advantages, kept, global_rows=batch.global_rows,
                                         lengths=batch.lengths), "no_signal": 0}
        t_train, t_step = time.perf_counter() - t0, time.perf_counter() - t_start
        record = metrics.step_record(batch, kept, train_stats, self.rewards.names, self.rewards.accuracy_index,
                                     self.scheduler.get_last_lr()[0], t_train, t_step)
        return {**record, **self.rewards.flush_logs()}  # what reward functions logged (log_metric, log_extra)

    def update(self, rollout: Rollout, advantages: torch.Tensor, kept: torch.Tensor,
               global_rows: list[int] | None = None, lengths: torch.Tensor | None = None) -> dict:
        """The learner's optimizer steps on the kept rows of this step's batch (learner.Learner.update), less
        the rows `extensions.row_mask` leaves out."""
        if self.extensions.row_mask is not None:
            kept = self.extensions.row_mask(rollout, kept)
            if kept.numel() == 0:
                return self.learner.no_rows()
        with reuse_freed_memory(gradients=True):  # the update's temporaries reuse the heap (runtime/cpu_memory.py)
            return self.learner.update(rollout, advantages, kept, global_rows, lengths, step=self.state.global_step + 1)

    def generate(self, prompt_ids: list[list[int]], step: int, row_offset: int = 0) -> Rollout:
        """Sample `prompt_ids` with step `step`'s seeds (collect.Collector.generate)."""
        return self.collector.generate(prompt_ids, step, row_offset)

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
        return {
            "step": self.state.global_step,
            "optimizer": self.optimizer.state_dict() if optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "log_history": self.state.log_history,
            "eval_history": self.eval_history,
            "config": self.config.to_dict(),
            **self.learner.state_dict(),
            **pending_rollout_state(self.overlap, self.dist.enabled),
        }

    def save(self, step: int) -> str | None:
        """Checkpoint on rank 0 (every rank takes part in gathering FSDP2 state); returns its path."""
        model_sd, state = None, self._checkpoint_state(optimizer=self.fsdp_root is None)
        if self.fsdp_root is not None:  # collective: full weights and optimizer state, on rank 0's CPU
            model_sd = ddp.full_state_dict(self.fsdp_root)
            state["optimizer"] = ddp.full_optimizer_state(self.fsdp_root, self.optimizer)
        path = None
        if self.dist.is_main:
            path = save_checkpoint(os.path.join(self.output_dir, "checkpoints"), step, self.model, self.tokenizer,
                                   state, keep_last=self.config.keep_last_checkpoints, state_dict=model_sd)
        ddp.barrier(self.dist)
        self.emit("on_save")
        if path is not None:
            self.saved(step, path)
        return path

    def _resume(self, resume: str | None) -> int:
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
        set_rng_state(state["rng"])
        self.learner.load_state_dict(state)
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
    def train(self, resume: str | None = None) -> dict:
        """Run RL for `max_steps` optimizer steps; returns the summary written to summary.json. `resume`: a
        checkpoint directory or "auto" (the latest under output_dir), default `config.resume`."""
        a = self.config
        t_begin = time.perf_counter()
        start = self._resume(resume or a.resume)
        logger = MetricsLogger(self.output_dir, a.report_to, append=start > 0) if self.dist.is_main else None
        if start > 0 and logger is not None:
            logger.truncate_after(start)
        handlers = _install_stop_handlers(self._on_signal)
        trace = os.path.join(self.output_dir, f"trace-rank{self.dist.rank}.json" if self.dist.enabled else "trace.json")
        profile = ProfileWindow(a.profile_steps, trace_path=trace if a.trace else None)
        try:
            if start == 0 and self.eval_data is not None:
                self.eval_during_training(0)
            self.emit("on_train_begin")
            bar = metrics.ProgressBar(a.max_steps, start, enabled=not a.disable_tqdm and self.dist.is_main)
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
                bar.update(record)
                last = step == a.max_steps
                stop = ddp.any_rank(self.stop_requested or self.control.should_training_stop, self.dist)
                if (a.save_steps and step % a.save_steps == 0) or last or stop:
                    self.save(step)
                if stop:
                    if not last:
                        print(f"dash-fast: stopped at step {step}; continue with --resume auto", flush=True)
                    break
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
        """summary.json's contents (written by rank 0): the run's figures, its memory plan and its paths."""
        step = self.state.global_step
        finished = step >= self.config.max_steps and not self.stop_requested
        summary = {**metrics.run_summary(step, finished, self.state.log_history, self.eval_history,
                                         time.perf_counter() - t_begin, self.config.to_dict()),
                   "memory_plan": self.memory_plan.to_dict() if self.memory_plan is not None else None, **self.paths()}
        if self.dist.is_main:
            metrics.write_summary(self.output_dir, summary, plots=bool(self.state.log_history))
        return summary


def _install_stop_handlers(handler: Callable) -> dict:
    """`handler` for SIGTERM and SIGINT (a checkpoint at the end of the step); returns the handlers it replaced.
    Only the main thread may set them: elsewhere (a trainer run from a worker thread) none is set."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
