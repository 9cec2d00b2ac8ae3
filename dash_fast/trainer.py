"""The DASH training loop. One optimizer step = one rollout:

    sample (one big generate) -> reward -> advantage -> filter |A| > tau -> micro-batches -> step

The hot path is `train_step`; everything it calls is in this file or in algo.py (pure functions).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from dash_fast import algo
from dash_fast import distributed as ddp
from dash_fast.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dash_fast.config import DashConfig
from dash_fast.cpu_memory import keep_freed_memory
from dash_fast.data import PromptDataset, PromptSampler, pad_right
from dash_fast.formats import DEFAULT_REWARDS, load_dataset_rows
from dash_fast.metrics import MetricsLogger, plot_run
from dash_fast.overlap import OverlapScheduler, Prefetched
from dash_fast.profiling import ProfileWindow, nvtx_range
from dash_fast.rollout.base import Rollout, SamplingParams

RewardFunc = Callable[..., list]


class TrainingAborted(RuntimeError):
    """Training stopped on an error; the last checkpoint on disk is intact."""


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


def load_model(model: str | torch.nn.Module, dtype: str, device: torch.device) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model.to(device)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "attn_implementation": attn_implementation(device, dtype)}
    return AutoModelForCausalLM.from_pretrained(model, **kwargs).to(device)


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
        from transformers import AutoTokenizer, TrainerControl, TrainerState

        self.args = args = args or DashConfig()
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
        if self.device.type == "cpu":  # activations live in host memory: reuse pages across steps
            keep_freed_memory()
        self.dist = ddp.init_distributed(self.device.type)
        self.model = load_model(model, args.dtype, self.device)
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
        self.stop_ids = self._stop_token_ids()

        data_kwargs = dict(prompt_column=args.prompt_column if self.dataset_format == "prompt" else "prompt",
                           max_prompt_tokens=args.max_prompt_tokens, system_prompt=args.system_prompt,
                           use_chat_template=args.use_chat_template)
        self.train_data = PromptDataset(train_rows, self.tokenizer, name="train_dataset", **data_kwargs)
        self.eval_data = None
        if eval_rows is not None:
            self.eval_data = PromptDataset(eval_rows, self.tokenizer, name="eval_dataset", **data_kwargs)

        funcs = reward_funcs or args.reward_funcs or DEFAULT_REWARDS[self.dataset_format]
        self.reward_funcs, self.reward_names = self._resolve_rewards(funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} weights for "
                             f"{len(self.reward_funcs)} reward functions {self.reward_names}")
        self.reward_weights = torch.tensor(args.reward_weights or [1.0] * len(self.reward_funcs))
        acc = args.accuracy_reward or self.reward_names[0]
        if acc not in self.reward_names:
            raise ValueError(f"accuracy_reward {acc!r} is not one of the reward functions {self.reward_names}")
        self.accuracy_index = self.reward_names.index(acc)
        self.reward_logs: dict[str, dict[str, list]] = {"metric": {}, "extra": {}}  # log_metric / log_extra
        self.sampler = PromptSampler(len(self.train_data), args.seed if args.data_seed is None else args.data_seed)
        ddp.shard_range(args.prompts_per_step, self.dist)  # fail early when prompts do not split over ranks

        self.fsdp_root = None  # FSDP2 (GPU only, not run in this repository's tests)
        if args.parallel == "fsdp2" and self.dist.enabled:
            if args.beta > 0 or args.engine != "torch":
                raise ValueError("parallel=fsdp2 supports beta=0 and engine=torch only")
            self.fsdp_root = ddp.fully_shard_model(self.model)
        self.shared_prompt = self._use_shared_prompt()
        self.engine = self._make_engine()
        if args.overlap and self.fsdp_root is not None:
            raise ValueError("overlap=True is not supported with parallel=fsdp2")
        self.overlap = OverlapScheduler(self.device, concurrent=getattr(self.engine, "thread_safe", False)) \
            if args.overlap else None
        self.weights_version = 0  # optimizer steps applied to the policy (the staleness of a rollout)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay,
        )
        total_updates = max(1, args.max_steps * args.updates_per_rollout * args.minibatches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(args, total_updates))
        self.ref_model = None
        if args.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

        self.output_dir = args.output_dir or time.strftime("runs/%Y%m%d-%H%M%S")
        os.makedirs(self.output_dir, exist_ok=True)
        self.state = TrainerState()
        self.state.max_steps = args.max_steps
        self.state.logging_steps = args.logging_steps
        self.state.save_steps = args.save_steps
        self.state.is_world_process_zero = self.state.is_local_process_zero = self.dist.is_main
        self.control = TrainerControl()
        self.callbacks = list(callbacks or [])
        self.callback_args: Any = args  # what callbacks receive as `args` (GRPOTrainer passes its GRPOConfig)
        self.micro_batch_tokens = args.micro_batch_tokens
        self.nonfinite_in_a_row = 0
        self.forward_passes = 0  # policy forwards (train + old log-prob), counted for tests and stats
        self.stop_requested = False
        self.eval_history: list[dict] = []

    # ------------------------------------------------------------------ setup helpers
    def _stop_token_ids(self) -> tuple[int, ...]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return tuple(sorted(ids))

    @staticmethod
    def _resolve_rewards(funcs) -> tuple[list[RewardFunc], list[str]]:
        funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]
        resolved, names = [], []
        for f in funcs:
            if isinstance(f, str):
                from dash_fast.rewards import get_reward_func

                f = get_reward_func(f)
            if not callable(f):
                raise ValueError(f"reward function {f!r} is not callable")
            resolved.append(f)
            names.append(getattr(f, "__name__", type(f).__name__))
        return resolved, names

    def _use_shared_prompt(self) -> bool:
        """Train with each prompt computed once per group (shared_prompt.py) where the model allows it.
        `auto` picks it on CPU only: on GPU its speed against flash-attn / SDPA padding masks is unmeasured."""
        from dash_fast.shared_prompt import shared_prompt_unsupported

        if self.args.train_forward == "hf" or (self.args.train_forward == "auto" and self.device.type != "cpu"):
            return False
        reason = "parameters sharded by FSDP2" if self.fsdp_root is not None else shared_prompt_unsupported(self.model)
        if reason and self.args.train_forward == "shared_prompt":
            raise ValueError(f"train_forward='shared_prompt' cannot run this model: {reason}")
        return reason is None

    def _make_engine(self):
        if self.args.engine == "vllm":
            from dash_fast.rollout.vllm_engine import VLLMEngine

            return VLLMEngine(self.model, self.tokenizer, self.args)
        from dash_fast.rollout.torch_engine import TorchEngine

        return TorchEngine(self.model, self.pad_id)

    def _sampling_params(self, step: int, greedy: bool = False, max_new: int | None = None) -> SamplingParams:
        a = self.args
        return SamplingParams(
            temperature=0.0 if greedy else a.temperature, top_k=a.top_k, top_p=a.top_p,
            max_new_tokens=max_new or a.max_completion_tokens, stop_token_ids=self.stop_ids,
            seed=a.seed * 1_000_003 + step,  # a function of the step: resume samples the same tokens
        )

    # ------------------------------------------------------------------ model pieces
    def _decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, model.base_model_prefix)

    def _micro_batches(self, rollout: Rollout, rows: list[int]) -> list[list[int]]:
        """Indices into `rows`, grouped into micro-batches of about `micro_batch_tokens` padded tokens."""
        lengths = rollout.completion_lengths.tolist()
        if self.shared_prompt:
            from dash_fast.shared_prompt import pack_shared

            return pack_shared([rollout.prompt_ids[r] for r in rows], [lengths[r] for r in rows],
                               self.micro_batch_tokens)
        return algo.pack_micro_batches([len(rollout.prompt_ids[r]) + lengths[r] for r in rows],
                                       self.micro_batch_tokens)

    def _hidden_and_targets(self, model, rollout: Rollout, rows: list[int]):
        """One forward of the decoder over prompt+completion rows; returns the hidden states that predict
        each completion token, flattened to [N, H] in row order, with their targets."""
        lengths = rollout.completion_lengths.tolist()
        comp = rollout.completion_ids
        if self.shared_prompt:
            from dash_fast.shared_prompt import shared_prompt_hidden

            return shared_prompt_hidden(model, [rollout.prompt_ids[r] for r in rows],
                                        [comp[r, : lengths[r]].tolist() for r in rows], self.pad_id)
        seqs = [rollout.prompt_ids[r] + comp[r, : lengths[r]].tolist() for r in rows]
        ids, attn = pad_right(seqs, self.pad_id)
        ids, attn = ids.to(self.device), attn.to(self.device)
        hidden = self._decoder(model)(input_ids=ids, attention_mask=attn).last_hidden_state
        pred = torch.zeros_like(attn, dtype=torch.bool)
        for j, r in enumerate(rows):
            p = len(rollout.prompt_ids[r])
            pred[j, p - 1 : p - 1 + lengths[r]] = True
        targets = torch.cat([comp[r, : lengths[r]] for r in rows]).to(self.device)
        return hidden[pred], targets

    def _per_token(self, values: torch.Tensor, rollout: Rollout, rows: list[int]) -> torch.Tensor:
        """Row-wise [B] or token-wise [B, L] values -> flat per completion token of `rows`."""
        lengths = rollout.completion_lengths.tolist()
        if values.dim() == 1:
            out = torch.cat([values[r].expand(lengths[r]) for r in rows])
        else:
            out = torch.cat([values[r, : lengths[r]] for r in rows])
        return out.to(self.device)

    def _lm_head(self, model):
        head = model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    @torch.no_grad()
    def _logprob_pass(self, model, rollout: Rollout, rows: list[int], name: str) -> torch.Tensor:
        """No-grad token log-probs of rollout rows, as a [B, L] tensor (old / ref passes)."""
        out = torch.zeros_like(rollout.sampling_logps)
        lengths = rollout.completion_lengths.tolist()
        with nvtx_range(name), ddp.gathered_params(self.fsdp_root if model is self.model else None):
            for micro in self._micro_batches(rollout, rows):
                micro_rows = [rows[i] for i in micro]
                if model is self.model:
                    self.forward_passes += 1
                hidden, targets = self._hidden_and_targets(model, rollout, micro_rows)
                weight, bias = self._lm_head(model)
                logp = self._logprobs_fn(hidden, weight, bias, targets).float().cpu()
                offset = 0
                for r in micro_rows:
                    out[r, : lengths[r]] = logp[offset : offset + lengths[r]]
                    offset += lengths[r]
        return out

    def _logprobs_fn(self, hidden, weight, bias, targets) -> torch.Tensor:
        with nvtx_range(f"logprobs/{self.args.loss_impl}"):
            if self.args.loss_impl == "fused":
                from dash_kernels import fused_logprobs

                return fused_logprobs(hidden, weight, bias, targets, temperature=self.args.temperature)
            return algo.naive_logprobs(hidden, weight, bias, targets, self.args.temperature)

    def _loss_fn(self, *inputs, **kwargs):
        impl = self.args.loss_impl
        with nvtx_range(f"loss/{impl}"):  # the backward runs later, under train/backward
            if impl == "fused":
                from dash_kernels import fused_linear_pg_loss

                return fused_linear_pg_loss(*inputs, **kwargs)
            if impl == "liger":
                from dash_kernels.liger_adapter import liger_pg_loss

                return liger_pg_loss(*inputs, **kwargs)
            return algo.naive_linear_pg_loss(*inputs, **kwargs)

    # ------------------------------------------------------------------ sampling and rewards
    def generate(self, prompt_ids: list[list[int]], step: int, row_offset: int = 0) -> Rollout:
        """Preemptive sampling: the whole rollout in one call (dash), or in small batches (grpo preset).
        `row_offset` (this rank's first row in the global rollout) keys the sampling seed, so a chunk
        samples the same tokens whichever rank or process generates it."""
        params = self._sampling_params(step)
        params.seed += row_offset
        size = self.args.generation_batch_size or len(prompt_ids)
        with nvtx_range("rollout/generate"), ddp.gathered_params(self.fsdp_root):
            if size >= len(prompt_ids):
                return self.engine.generate(prompt_ids, params)
            parts = []
            for i in range(0, len(prompt_ids), size):
                params.seed = self._sampling_params(step).seed + row_offset + i  # distinct, reproducible streams
                parts.append(self.engine.generate(prompt_ids[i : i + size], params))
            return Rollout.concat(parts, self.pad_id)

    def _draw_prompts(self, step: int) -> Prefetched:
        """The next `prompts_per_step` prompts (the same on every rank) and this rank's share of them."""
        before = self.sampler.state_dict()
        indices = self.sampler.next(self.args.prompts_per_step)
        lo, hi = ddp.shard_range(len(indices), self.dist)  # this rank samples prompts [lo, hi)
        return Prefetched(step, indices[lo:hi], lo * self.args.group_size, before, self.weights_version)

    def _sample(self, job: Prefetched) -> Rollout:
        G = self.args.group_size
        prompt_ids = [self.train_data.prompt_ids[i] for i in job.indices for _ in range(G)]
        return self.generate(prompt_ids, job.step, row_offset=job.row_offset)

    def _rollout_for(self, step: int) -> Prefetched:
        """Step `step`'s prompts and rollout: the one sampled ahead (overlap=True) or a fresh one."""
        job = self.overlap.take(step) if self.overlap is not None else None
        if job is None:
            job = self._draw_prompts(step)
            job.rollout = self._sample(job)
        return job

    def _prefetch(self, step: int) -> float:
        """Sample rollout `step` now, from the current weights, beside this step's update (overlap.py).
        Returns the seconds it took here: the sampling itself in order (CPU), the launch when concurrent."""
        t0 = time.perf_counter()
        job = self._draw_prompts(step)
        self.overlap.launch(job, lambda: self._sample(job))
        return time.perf_counter() - t0

    def compute_rewards(self, dataset: PromptDataset, indices: list[int], rollout: Rollout,
                        repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted nan-sum of every reward function. Returns (rewards [B], per_function [B, F])."""
        from dash_fast.rewards import score_completions, warn_rows_without_reward

        prompts = [dataset.rows[i][dataset.prompt_column] for i in indices for _ in range(repeat)]
        token_lists = rollout.completion_token_lists()
        completions = self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        if prompts and isinstance(prompts[0], list):  # chat prompts: completions as messages, as TRL passes them
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        columns = dataset.columns(indices, repeat)
        with nvtx_range("rollout/reward"):
            values = score_completions(self.reward_funcs, prompts, completions, token_lists, columns,
                                       trainer_state=self.state, log_extra=self._log_extra,
                                       log_metric=self._log_metric)
        warn_rows_without_reward(values, prompts, completions, columns)
        per_func = torch.tensor([[float("nan") if v is None else v for v in row] for row in zip(*values)])
        rewards = torch.nansum(per_func * self.reward_weights, dim=1)  # rows where all are None -> 0, as TRL
        return rewards, per_func

    def _log_metric(self, name: str, value: float) -> None:
        """`log_metric` for reward functions (TRL): a scalar, averaged into this step's record under `name`."""
        self.reward_logs["metric"].setdefault(name, []).append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        """`log_extra` for reward functions (TRL: a completions-table column): in the step record as
        `extra/<column>`, the mean of numbers (else the values)."""
        self.reward_logs["extra"].setdefault(column, []).extend(values)

    def _flush_reward_logs(self) -> dict:
        out: dict[str, Any] = {name: sum(v) / len(v) for name, v in self.reward_logs["metric"].items() if v}
        for column, values in self.reward_logs["extra"].items():
            numeric = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            out[f"extra/{column}"] = sum(values) / len(values) if numeric else list(values)
        self.reward_logs = {"metric": {}, "extra": {}}
        return out

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict:
        a = self.args
        G = a.group_size
        t_start = time.perf_counter()
        job = self._rollout_for(step)
        indices, row_offset, rollout = job.indices, job.row_offset, job.rollout
        lag = self.weights_version - job.weights_version  # 1 with overlap (after step 1), else 0
        # overlap: rollout step+1 from these same weights, now; with refill after the refill rounds, which
        # use the engine and draw their prompts first (so a checkpoint can undo step+1's prompts alone)
        ahead = self.overlap is not None and step < a.max_steps
        prefetch_later = ahead and a.refill
        if ahead and not a.refill:
            self._prefetch(step + 1)
        t_gen = time.perf_counter() - t_start

        t0 = time.perf_counter()
        rewards, per_func = self._rewards_or_skip(indices, rollout, G, step)
        if rewards is None:  # on_reward_error="skip": no update for this batch
            t_gen += self._prefetch(step + 1) if prefetch_later else 0.0
            return self._skipped_record(step, t_start, t_gen)
        # every rank sees the whole rollout's rewards and lengths: same advantages, filter and normaliser
        rewards, per_func = ddp.all_gather_rows(rewards, self.dist), ddp.all_gather_rows(per_func, self.dist)
        all_lengths = ddp.all_gather_rows(rollout.completion_lengths, self.dist)
        global_rows = list(range(row_offset, row_offset + len(rollout)))  # this rank's rows in the rollout
        refill_stats = {}
        if a.refill:
            rollout, global_rows, rewards, per_func, all_lengths, refill_stats = self._refill(
                step, rollout, global_rows, rewards, per_func, all_lengths)
        t_prefetch = self._prefetch(step + 1) if prefetch_later else 0.0
        t_gen += t_prefetch
        advantages = algo.group_advantages(rewards, G, a.scale_rewards)
        kept = algo.filter_rows(advantages, a.filter_tau)
        t_reward = time.perf_counter() - t0 - refill_stats.get("time_refill_s", 0.0) - t_prefetch

        t0 = time.perf_counter()
        train_stats = self.update(rollout, advantages, kept, global_rows=global_rows, lengths=all_lengths)
        t_train = time.perf_counter() - t0
        t_step = time.perf_counter() - t_start

        lengths = all_lengths.float()
        acc = per_func[:, self.accuracy_index]
        record = {
            "step": step,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "accuracy": torch.nanmean(acc).item() if not acc.isnan().all() else float("nan"),
            "kept_fraction": kept.numel() / len(rewards),
            "completion_len_mean": lengths.mean().item(),
            "time_generate_s": t_gen,
            "rollout_lag": lag,
            "time_reward_s": t_reward,
            "time_train_s": t_train,
            "time_step_s": t_step,
            "tokens_per_s": float(lengths.sum()) / max(t_step, 1e-9),
            "lr": self.scheduler.get_last_lr()[0],
            **refill_stats,
            **train_stats,
        }
        for k, name in enumerate(self.reward_names):
            record[f"rewards/{name}"] = torch.nanmean(per_func[:, k]).item()
        record.update(self._flush_reward_logs())
        return record

    def _refill(self, step: int, rollout: Rollout, global_rows: list[int], rewards: torch.Tensor,
                per_func: torch.Tensor, lengths: torch.Tensor):
        """DAPO-style dynamic sampling (`refill=True`): sample more prompts, G rows each, until the gradient
        filter keeps at least `prompts_per_step * group_size` rows or `max_refill_rounds` rounds were drawn;
        then cut the batch after the group holding the target-th kept row. Each round samples about the
        missing rows divided by the kept rate so far (one large generation, not a prompt at a time).

        Under torchrun every rank draws the same round of prompts (rounded up to a multiple of the world
        size) and samples its contiguous share, as for the step's first rollout; rewards and lengths are
        all-gathered, so every rank cuts at the same row. `rollout` and `global_rows` are this rank's rows
        and their places in the joined batch; `rewards`, `per_func` and `lengths` cover all of it.
        Returns them joined and cut, and the step's refill statistics."""
        a, G, world = self.args, self.args.group_size, self.dist.world_size
        target = a.rows_per_step
        parts, global_rows, t0 = [rollout], list(global_rows), time.perf_counter()
        first, rounds = len(rewards), 0
        while True:
            kept = algo.filter_rows(algo.group_advantages(rewards, G, a.scale_rewards), a.filter_tau)
            if len(kept) >= target or rounds == a.max_refill_rounds:
                break
            rate = max(len(kept) / len(rewards), 1 / G)  # kept rows per sampled row so far
            n_prompts = min(a.prompts_per_step, math.ceil((target - len(kept)) / rate / G))
            n_prompts = -(-n_prompts // world) * world  # prompts_per_step splits over the ranks: still <= it
            indices = self.sampler.next(n_prompts)  # the same on every rank
            lo, hi = ddp.shard_range(n_prompts, self.dist)
            prompt_ids = [self.train_data.prompt_ids[i] for i in indices[lo:hi] for _ in range(G)]
            offset = len(rewards) + lo * G  # seeds continue the step's rows
            more = self.generate(prompt_ids, step, row_offset=offset)
            more_rewards, more_per_func = self._rewards_or_skip(indices[lo:hi], more, G, step)
            rounds += 1
            if more_rewards is None:  # on_reward_error="skip": train on what was gathered so far
                break
            parts.append(more)
            global_rows += range(offset, offset + len(more))
            rewards = torch.cat([rewards, ddp.all_gather_rows(more_rewards, self.dist)])
            per_func = torch.cat([per_func, ddp.all_gather_rows(more_per_func, self.dist)])
            lengths = torch.cat([lengths, ddp.all_gather_rows(more.completion_lengths, self.dist)])
        sampled = len(rewards)
        if len(kept) >= target:  # the groups up to the target-th kept row; the later ones are not used
            cut = (int(kept[target - 1]) // G + 1) * G
            rewards, per_func, lengths = rewards[:cut], per_func[:cut], lengths[:cut]
        rollout = Rollout.concat(parts, self.pad_id) if len(parts) > 1 else rollout
        mine = [i for i, g in enumerate(global_rows) if g < len(rewards)]  # never empty: round 0 is kept whole
        if len(mine) < len(rollout):
            rollout, global_rows = rollout.select(mine), [global_rows[i] for i in mine]
        stats = {"refill_rounds": rounds, "refill_rows": sampled - first,
                 "refill_rows_unused": sampled - len(rewards), "time_refill_s": time.perf_counter() - t0}
        return rollout, global_rows, rewards, per_func, lengths, stats

    def _rewards_or_skip(self, indices: list[int], rollout: Rollout, G: int, step: int):
        """Rewards of this rank's rows; (None, None) when a reward function failed on any rank and
        on_reward_error="skip". With "raise" the RewardError propagates and the last checkpoint stays."""
        from dash_fast.rewards import RewardError

        error: RewardError | None = None
        try:
            rewards, per_func = self.compute_rewards(self.train_data, indices, rollout, G)
        except RewardError as e:
            error, rewards, per_func = e, None, None
        if ddp.any_rank(error is not None, self.dist):
            error = error or RewardError("a reward function failed on another rank")
            if self.args.on_reward_error == "raise":
                raise error
            print(f"dash-fast: step {step}: {error}; batch skipped (on_reward_error=skip)")
            return None, None
        return rewards, per_func

    def _skipped_record(self, step: int, t_start: float, t_gen: float) -> dict:
        t_step = time.perf_counter() - t_start
        nan = float("nan")
        return {"step": step, "reward_mean": nan, "reward_std": nan, "accuracy": nan, "kept_fraction": 0.0,
                "completion_len_mean": nan, "time_generate_s": t_gen, "time_reward_s": t_step - t_gen,
                "time_train_s": 0.0, "time_step_s": t_step, "tokens_per_s": 0.0,
                "lr": self.scheduler.get_last_lr()[0], "skipped_steps": 1, "reward_error": True}

    def update(self, rollout: Rollout, advantages: torch.Tensor, kept: torch.Tensor,
               global_rows: list[int] | None = None, lengths: torch.Tensor | None = None) -> dict:
        """K epochs x M minibatches of optimizer steps over the kept rows, each step accumulating
        gradients over token-budget micro-batches with a global normaliser.

        `advantages`, `kept` and `lengths` cover the whole (global) rollout; row i of this rank's
        `rollout` is row `global_rows[i]` of it (None: the rollout is all of it, as in one process)."""
        a = self.args
        kept_rows = kept.tolist()
        lengths = rollout.completion_lengths if lengths is None else lengths
        global_rows = list(range(len(rollout))) if global_rows is None else global_rows
        local_of = {g: i for i, g in enumerate(global_rows)}
        local_adv = advantages[global_rows]

        def local(rows: list[int]) -> list[int]:
            return [local_of[r] for r in rows if r in local_of]

        needs_old = a.updates_per_rollout > 1 or a.minibatches > 1
        old = None
        if a.overlap:  # samples come from the previous step's weights: their log-probs are the old ones
            old = rollout.sampling_logps
        elif needs_old:
            old = self._logprob_pass(self.model, rollout, local(kept_rows), "train/logprob_old")
        ref = None
        if self.ref_model is not None:
            ref = self._logprob_pass(self.ref_model, rollout, local(kept_rows), "train/logprob_ref")

        stats = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0,
                 "skipped_steps": 0}
        n_updates = 0
        generator = torch.Generator().manual_seed(a.seed + self.state.global_step)
        for _ in range(a.updates_per_rollout):
            for part in algo.split_minibatches(len(kept_rows), a.minibatches, generator):
                rows = [kept_rows[i] for i in sorted(part.tolist())]
                if a.normalize_over == "kept":
                    norm = algo.loss_normaliser(a.loss_agg, lengths[rows], a.max_completion_tokens)
                else:  # every sampled row counts; a minibatch carries its share of them
                    norm = algo.loss_normaliser(a.loss_agg, lengths, a.max_completion_tokens)
                    norm *= len(rows) / len(kept_rows)
                weights = algo.token_weights(rollout.completion_mask, a.loss_agg, norm)
                step_stats = self._optimizer_step(rollout, local(rows), local_adv, weights, old, ref)
                n_updates += 1
                for k in stats:
                    stats[k] += step_stats.get(k, 0.0) or 0.0
        for k in ("loss", "clip_fraction", "kl", "entropy", "grad_norm"):
            stats[k] /= max(n_updates, 1)
        stats["optimizer_steps"] = n_updates
        return stats

    def _optimizer_step(self, rollout, rows, advantages, weights, old, ref) -> dict:
        """One optimizer step over `rows`; halves the micro-batch budget and retries on out-of-memory
        (on every rank when any rank ran out, so the ranks stay in step)."""
        while True:
            sums, oom = None, False
            try:
                sums = self._accumulate(rollout, rows, advantages, weights, old, ref)
            except torch.OutOfMemoryError:
                oom = True
            if not ddp.any_rank(oom, self.dist):
                return self._step(sums)
            self.optimizer.zero_grad(set_to_none=True)
            if self.micro_batch_tokens <= 1:
                raise TrainingAborted("out of memory in backward even with micro_batch_tokens=1")
            self.micro_batch_tokens = max(1, self.micro_batch_tokens // 2)
            print(f"dash-fast: out of memory in backward; micro_batch_tokens -> {self.micro_batch_tokens}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _micro_loss(self, rollout, micro_rows, advantages, weights, old, ref):
        """Forward + loss of one micro-batch. Under FSDP2 it runs inside the root's forward, where the
        lm_head weight it reads directly is unsharded."""
        a = self.args
        hidden, targets = self._hidden_and_targets(self.model, rollout, micro_rows)
        weight, bias = self._lm_head(self.model)
        loss, st = self._loss_fn(
            hidden, weight, bias, targets,
            self._per_token(advantages, rollout, micro_rows),
            self._per_token(weights, rollout, micro_rows),
            None if old is None else self._per_token(old, rollout, micro_rows),
            None if ref is None else self._per_token(ref, rollout, micro_rows),
            temperature=a.temperature, eps_low=a.epsilon, eps_high=a.eps_high, beta=a.beta,
            tau=None,  # rows were filtered before this forward; the kept fallback row must stay
            return_entropy=True,
        )
        return loss, st, targets.numel()

    def _dummy_loss(self, rollout):
        """A zero loss through every parameter: FSDP2 ranks with fewer micro-batches run it so that all
        ranks take part in the same number of forward/backward collectives."""
        hidden, _ = self._hidden_and_targets(self.model, rollout, [0])
        weight, _ = self._lm_head(self.model)
        return hidden.sum() * 0.0 + weight.sum() * 0.0

    def _accumulate(self, rollout, rows, advantages, weights, old, ref) -> list[float]:
        """Forward/backward over token-budget micro-batches of this rank's `rows`; returns loss sums."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micros: list = self._micro_batches(rollout, rows) if rows else []
        if self.fsdp_root is not None:  # same number of forwards on every rank
            micros += [None] * (int(ddp.all_reduce_max(len(micros), self.dist)) - len(micros))
        total_loss, clip_sum, kl_sum, ent_sum, tokens = 0.0, 0.0, 0.0, 0.0, 0
        for micro in micros:
            with nvtx_range("train/forward"):
                self.forward_passes += 1
                if micro is None:
                    loss, st, n = self.fsdp_root(self._dummy_loss, rollout), None, 0
                else:
                    micro_rows = [rows[i] for i in micro]
                    run = self._micro_loss if self.fsdp_root is None else partial(self.fsdp_root, self._micro_loss)
                    loss, st, n = run(rollout, micro_rows, advantages, weights, old, ref)
            with nvtx_range("train/backward"):
                loss.backward()
            if st is None:
                continue
            total_loss += loss.item()  # the loss ops return 0-d tensors (no sync inside them): floats here
            clip_sum += float(st["clip_fraction"]) * n
            kl_sum += (float(st["kl_mean"]) if st.get("kl_mean") is not None else 0.0) * n
            if st.get("entropy") is not None:
                ent_sum += float(st["entropy"].sum())
            tokens += n
        return [total_loss, clip_sum, kl_sum, ent_sum, float(tokens)]

    def _step(self, sums: list[float]) -> dict:
        """Sum gradients (and loss statistics) over ranks, clip, and take the optimizer step unless the
        loss or gradient is non-finite."""
        a = self.args
        with nvtx_range("optim/step"):
            if self.dist.enabled:
                sums = [ddp.all_reduce_sum(v, self.dist) for v in sums]
                if self.fsdp_root is None:  # FSDP2 reduce-scatters gradients itself during backward
                    ddp.all_reduce_grads([p for p in self.model.parameters() if p.requires_grad], self.dist)
            total_loss, clip_sum, kl_sum, ent_sum, tokens = sums
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = a.max_grad_norm if a.max_grad_norm is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else 0.0
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
            if finite:
                if self.overlap is not None:  # the sampler of the next rollout must be done reading theta
                    self.overlap.wait()
                self.optimizer.step()
                self.weights_version += 1
                with nvtx_range("sync/weights"):
                    self.engine.sync_weights(self.model)
                self.nonfinite_in_a_row = 0
            else:  # skip the step, keep the weights
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_in_a_row += 1
                print(f"dash-fast: non-finite loss/grad at step {self.state.global_step + 1}: step skipped "
                      f"({self.nonfinite_in_a_row}/{a.max_nonfinite_steps})")
                if self.nonfinite_in_a_row >= a.max_nonfinite_steps:
                    raise TrainingAborted(f"{self.nonfinite_in_a_row} non-finite steps in a row "
                                          f"(max_nonfinite_steps={a.max_nonfinite_steps})")
            self.scheduler.step()
        return {"loss": total_loss, "clip_fraction": clip_sum / max(tokens, 1),
                "kl": kl_sum / max(tokens, 1) if a.beta > 0 else 0.0, "entropy": ent_sum / max(tokens, 1),
                "grad_norm": grad_norm, "skipped_steps": 0 if finite else 1}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, dataset: PromptDataset | None = None, max_examples: int | None = None,
                 batch_size: int = 256) -> dict:
        """Greedy accuracy (mean of the accuracy reward) on held-out prompts (split over ranks)."""
        dataset = dataset or self.eval_data
        if self.overlap is not None:  # the engine is busy with a rollout sampled ahead
            self.overlap.wait()
        if dataset is None:
            raise ValueError("no eval dataset")
        n = min(len(dataset), max_examples or self.args.eval_examples)
        params = self._sampling_params(0, greedy=True, max_new=self.args.eval_max_completion_tokens)
        share = -(-n // self.dist.world_size)
        lo, hi = min(n, self.dist.rank * share), min(n, (self.dist.rank + 1) * share)
        acc_sum, acc_count, len_sum = 0.0, 0.0, 0.0
        with ddp.gathered_params(self.fsdp_root):
            for start in range(lo, hi, batch_size):
                idx = list(range(start, min(hi, start + batch_size)))
                rollout = self.engine.generate([dataset.prompt_ids[i] for i in idx], params)
                _, per_func = self.compute_rewards(dataset, idx, rollout, 1)
                acc = per_func[:, self.accuracy_index]
                acc_sum += float(torch.nansum(acc))
                acc_count += float((~acc.isnan()).sum())
                len_sum += float(rollout.completion_lengths.sum())
        self.reward_logs = {"metric": {}, "extra": {}}  # what reward functions logged on eval rows is not a step's
        acc_sum, acc_count, len_sum = (ddp.all_reduce_sum(v, self.dist) for v in (acc_sum, acc_count, len_sum))
        return {"accuracy": acc_sum / acc_count if acc_count else float("nan"), "examples": n,
                "completion_len_mean": len_sum / max(n, 1)}

    # ------------------------------------------------------------------ loop
    def _callback(self, event: str, **kwargs) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self.callback_args, self.state, self.control, model=self.model,
                   processing_class=self.tokenizer, optimizer=self.optimizer, lr_scheduler=self.scheduler,
                   **kwargs)

    def _checkpoint_state(self, optimizer: bool = True) -> dict:
        return {
            "step": self.state.global_step,
            "optimizer": self.optimizer.state_dict() if optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "micro_batch_tokens": self.micro_batch_tokens,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "log_history": self.state.log_history,
            "eval_history": self.eval_history,
            "config": self.args.to_dict(),
            "weights_version": self.weights_version,
            **self._overlap_state(),
        }

    def _overlap_state(self) -> dict:
        """A rollout sampled ahead is saved with the state in one process; under torchrun (rank 0 saves)
        it is undone instead: the saved sampler position is the one before its prompts (overlap.py)."""
        job = self.overlap.pending if self.overlap is not None else None
        if job is None:
            return {}
        self.overlap.wait()
        return {"sampler": job.sampler_before} if self.dist.enabled else {"pending_rollout": job.state_dict()}

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
                                   state, keep_last=self.args.keep_last_checkpoints, state_dict=model_sd)
        ddp.barrier(self.dist)
        self._callback("on_save")
        return path

    def _resume(self) -> int:
        resume = self.args.resume
        if not resume:
            return 0
        path = latest_checkpoint(os.path.join(self.output_dir, "checkpoints")) if resume == "auto" else resume
        if path is None:
            return 0
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(self.model.parameters()).dtype)
        state = load_trainer_state(path)
        if self.fsdp_root is None:
            self.model.load_state_dict(saved.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            ddp.load_full_state(self.fsdp_root, self.optimizer, saved.state_dict(), state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        pending = state.get("pending_rollout")
        if pending is not None and self.overlap is not None:
            self.overlap.pending = Prefetched.from_state_dict(pending)
        elif pending is not None:  # resumed with overlap=False: give its prompts back to the sampler
            self.sampler.load_state_dict(pending["sampler_before"])
        self.weights_version = state.get("weights_version", state["step"])
        set_rng_state(state["rng"])
        self.micro_batch_tokens = state["micro_batch_tokens"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
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

    def train(self) -> dict:
        """Run RL for `max_steps` optimizer steps; returns the summary written to summary.json."""
        a = self.args
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
            if logger is not None:
                logger.close()
            for s, h in handlers.items():
                signal.signal(s, h)

    def _evaluate(self, step: int) -> dict:
        result = self.evaluate()
        self.eval_history.append({"step": step, **result})
        if self.dist.is_main:
            print(f"dash-fast: eval at step {step}: accuracy {result['accuracy']:.3f} on {result['examples']} examples")
        self._callback("on_evaluate", metrics={f"eval_{k}": v for k, v in result.items()})
        return result

    def _finish(self, t_begin: float) -> dict:
        step = self.state.global_step
        finished = step >= self.args.max_steps and not self.stop_requested
        records = self.state.log_history
        summary = {
            "steps": step,
            "finished": finished,
            "eval_accuracy_initial": self.eval_history[0]["accuracy"] if self.eval_history else None,
            "eval_accuracy_final": self.eval_history[-1]["accuracy"] if self.eval_history else None,
            "eval_examples": self.eval_history[-1]["examples"] if self.eval_history else 0,
            "eval_history": self.eval_history,
            "rl_wall_time_s": time.perf_counter() - t_begin,
            "step_time_mean_s": sum(r["time_step_s"] for r in records) / max(len(records), 1),
            "kept_fraction_mean": sum(r["kept_fraction"] for r in records) / max(len(records), 1),
            "config": self.args.to_dict(),
        }
        if self.dist.is_main:
            with open(os.path.join(self.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            if records:
                plot_run(self.output_dir)
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
