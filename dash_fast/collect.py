"""The collector: one optimizer step's batch of scored rollouts.

It draws the step's prompts (the same on every rank; each rank samples its contiguous share), samples
them in one big generate (or takes the rollout sampled ahead with overlap=True and launches the next
one, overlap.py), scores them with the reward functions (skipping the batch when one fails and
on_reward_error="skip"), all-gathers rewards and lengths so every rank sees the whole batch, and with
refill=True samples more prompts until the gradient filter keeps enough rows. The result is one `Batch`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dash_fast import algo
from dash_fast.config import DashConfig
from dash_fast.engines.base import Rollout, SamplingParams
from dash_fast.engines.sampler_process import GenerationPlan, run_plan
from dash_fast.overlap import OverlapScheduler, Prefetched
from dash_fast.rewards.scorer import RewardScorer
from dash_fast.runtime import distributed as ddp
from dash_fast.runtime.device import prepare_engine
from dash_fast.runtime.profiling import nvtx_range


@dataclass
class Batch:
    """One step's scored rollout. `rollout` holds this rank's rows; row i of it is row `global_rows[i]` of
    the whole batch (every rank's rows, joined), which `rewards` [B], `per_func` [B, F] and `lengths` [B]
    cover. `rewards` is None when a reward function failed and the batch is skipped (on_reward_error)."""

    step: int
    rollout: Rollout
    rewards: torch.Tensor | None
    per_func: torch.Tensor | None
    lengths: torch.Tensor | None
    global_rows: list[int]
    lag: int  # optimizer steps between the weights that sampled it and the ones it trains (1 with overlap)
    time_generate_s: float  # sampling, including launching (or, on CPU, running) the next overlapped rollout
    time_reward_s: float  # reward functions and their all-gather (refill rounds excluded)
    refill: dict = field(default_factory=dict)  # refill=True: rounds, rows and their time

    @property
    def skipped(self) -> bool:
        return self.rewards is None


@dataclass
class CollectorParts:
    """What the collector samples with and scores: the rollout `engine`, the prompt source `data` and the
    `sampler` of its order, the `rewards`, the process group `dist`, the `pad_id` and the `stop_ids` sampling
    stops at; `overlap` (overlap=True) samples the next rollout beside the update; `fsdp_root` (FSDP2) is
    gathered while sampling; `reward_post(data, indices, rollout, repeat, rewards, per_func) -> rewards`
    post-processes every training scoring (trainer.Extensions.reward_post)."""

    engine: Any
    data: Any
    sampler: Any
    rewards: RewardScorer
    dist: ddp.DistInfo
    pad_id: int
    stop_ids: tuple[int, ...]
    overlap: OverlapScheduler | None = None
    fsdp_root: Any = None
    reward_post: Callable[..., torch.Tensor] | None = None


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, step: int, row: int) -> int:
    """The 63-bit seed of the random stream that samples rows from global row `row` on at step `step`:
    splitmix64 chained over the three counters, so distinct (seed, step, row) keys get unrelated seeds (a
    linear mix such as seed * 1_000_003 + step + row would give step 2 / row 0 the stream of step 1 / row 1,
    so one rank would replay another's uniforms of a later step). Engines draw one stream per call from it
    (torch: one generator; vLLM: seed + i per row, 2^63 apart from other calls' seeds but for chance)."""
    x = 0
    for v in (seed, step, row):
        x = _splitmix64(x ^ (v & _MASK64))
    return x >> 1


class Collector:
    """Prompts -> rollout -> rewards for one step (see the module docstring); `collect` is the entry."""

    def __init__(self, args: DashConfig, parts: CollectorParts) -> None:
        self.args, self.engine, self.data, self.sampler, self.rewards = args, parts.engine, parts.data, \
            parts.sampler, parts.rewards
        self.dist, self.overlap, self.pad_id, self.fsdp_root = parts.dist, parts.overlap, parts.pad_id, parts.fsdp_root
        self.stop_ids = tuple(parts.stop_ids)
        self.reward_post = parts.reward_post
        self.engine_prepared = False  # prepare_engine_once

    def sampling_params(self, step: int, greedy: bool = False, max_new: int | None = None,
                        row: int = 0) -> SamplingParams:
        """Sampling settings of step `step`; the seed keys the random stream of the rows from global row `row`
        on (a function of seed, step and row: resume, any rank and any chunking sample the same tokens)."""
        a = self.args
        return SamplingParams(
            temperature=0.0 if greedy else a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
            repetition_penalty=a.repetition_penalty,
            max_new_tokens=max_new or a.max_completion_tokens, stop_token_ids=self.stop_ids,
            seed=stream_seed(a.seed, step, row),
        )

    def generate(self, prompt_ids: list[list[int]], step: int, row_offset: int = 0) -> Rollout:
        """Preemptive sampling: the whole rollout in one call (dash), or in small batches (grpo preset).
        `row_offset` (this rank's first row in the global rollout) keys the sampling seed, so a chunk
        samples the same tokens whichever rank or process generates it."""
        with nvtx_range("rollout/generate"), ddp.gathered_params(self.fsdp_root):
            return run_plan(self.engine, self.generation_plan(prompt_ids, step, row_offset), self.pad_id)

    def generation_plan(self, prompt_ids: list[list[int]], step: int, row_offset: int = 0) -> GenerationPlan:
        """The engine calls that sample `prompt_ids` (`generate`): one, or one per `generation_batch_size`
        rows, each with its own reproducible stream (plain data: the CPU sampler process runs it)."""
        size = self.args.generation_batch_size or len(prompt_ids)
        if size >= len(prompt_ids):
            return [(prompt_ids, self.sampling_params(step, row=row_offset))]
        return [(prompt_ids[i : i + size], self.sampling_params(step, row=row_offset + i))
                for i in range(0, len(prompt_ids), size)]

    def collect(self, step: int, weights_version: int) -> Batch:
        """Step `step`'s batch. `weights_version` counts the optimizer steps applied to the policy now."""
        a = self.args
        t_start = time.perf_counter()
        job = self.rollout_for(step, weights_version)
        # overlap: rollout step+1 from these same weights, now; with refill after the refill rounds, which
        # use the engine and draw their prompts first (so a checkpoint can undo step+1's prompts alone)
        ahead = self.overlap is not None and step < a.max_steps
        if ahead and not a.refill:
            self._prefetch(step + 1, weights_version)
        t_gen = time.perf_counter() - t_start

        t0 = time.perf_counter()
        rollout, lag = job.rollout, weights_version - job.weights_version
        rewards, per_func = self._score(job.indices, rollout, step)
        if rewards is None:  # on_reward_error="skip": no update for this batch
            t_gen += self._prefetch(step + 1, weights_version) if ahead and a.refill else 0.0
            return Batch(step, rollout, None, None, None, [], lag, t_gen, time.perf_counter() - t0)
        # every rank sees the whole rollout's rewards and lengths: same advantages, filter and normaliser
        rewards, per_func = ddp.all_gather_rows(rewards, self.dist), ddp.all_gather_rows(per_func, self.dist)
        lengths = ddp.all_gather_rows(rollout.completion_lengths, self.dist)
        global_rows = list(range(job.row_offset, job.row_offset + len(rollout)))  # this rank's rows
        refill = {}
        if a.refill:
            rollout, global_rows, rewards, per_func, lengths, refill = self._refill(
                step, rollout, global_rows, rewards, per_func, lengths)
        t_prefetch = self._prefetch(step + 1, weights_version) if ahead and a.refill else 0.0
        t_reward = time.perf_counter() - t0 - refill.get("time_refill_s", 0.0) - t_prefetch
        return Batch(step, rollout, rewards, per_func, lengths, global_rows, lag, t_gen + t_prefetch, t_reward,
                     refill)

    def rollout_for(self, step: int, weights_version: int) -> Prefetched:
        """Step `step`'s prompts and rollout: the one sampled ahead (overlap=True) or a fresh one."""
        job = self.overlap.take(step) if self.overlap is not None else None
        if self.overlap is not None:
            self.prepare_engine_once()
        if job is None:
            job = self._draw_prompts(step, weights_version)
            job.rollout = self._sample(job)
            if self.args.kv_cache_release and hasattr(self.engine, "release"):
                self.engine.release()  # its cache and graphs are rebuilt at the next generate
        return job

    def prepare_engine_once(self) -> None:
        """overlap=True: the engine's cache for the largest call and every CUDA graph, on the main thread,
        before the first rollout (a later, larger reserve would drop the graphs) and so before any worker
        samples. `engine_prepared = False` (after an eval that may have grown the cache) repeats it."""
        if not self.engine_prepared:
            a = self.args
            prepare_engine(self.engine, min(a.generation_batch_size or a.rows_per_step, a.rows_per_step),
                           a.max_prompt_tokens, a.max_completion_tokens)
            self.engine_prepared = True

    def set_stop_ids(self, stop_ids: tuple[int, ...]) -> None:
        """The token ids sampling stops at (default: the tokenizer's and generation_config's eos)."""
        self.stop_ids = tuple(stop_ids)

    def engine_changed(self) -> None:
        """Someone else used the engine (an evaluation may have grown its cache, dropping the CUDA graphs):
        prepare it again before the next overlapped rollout."""
        self.engine_prepared = False

    def _draw_prompts(self, step: int, weights_version: int) -> Prefetched:
        """The next `prompts_per_step` prompts (the same on every rank) and this rank's share of them."""
        before = self.sampler.state_dict()
        indices = self.sampler.next(self.args.prompts_per_step)
        lo, hi = ddp.shard_range(len(indices), self.dist)  # this rank samples prompts [lo, hi)
        return Prefetched(step, indices[lo:hi], lo * self.args.group_size, before, weights_version)

    def _sample(self, job: Prefetched) -> Rollout:
        return self.generate(self._prompt_rows(job), job.step, row_offset=job.row_offset)

    def _prompt_rows(self, job: Prefetched) -> list[list[int]]:
        return [self.data.prompt_ids[i] for i in job.indices for _ in range(self.args.group_size)]

    def _prefetch(self, step: int, weights_version: int) -> float:
        """Sample rollout `step` now, from the current weights, beside this step's update (overlap.py).
        Returns the seconds it took here: the sampling itself in order (CPU), the launch when concurrent."""
        t0 = time.perf_counter()
        self.prepare_engine_once()
        job = self._draw_prompts(step, weights_version)
        plan = None
        if self.overlap.use_process:  # what the sampler process runs, as plain data
            plan = self.generation_plan(self._prompt_rows(job), job.step, job.row_offset)
        self.overlap.launch(job, lambda: self._sample(job), plan)
        return time.perf_counter() - t0

    def _score(self, indices: list[int], rollout: Rollout, step: int):
        """Rewards of this rank's rows; (None, None) when a reward function failed on any rank and
        on_reward_error="skip". With "raise" the RewardError propagates and the last checkpoint stays."""
        from dash_fast.rewards import RewardError

        error: RewardError | None = None
        try:
            rewards, per_func = self.rewards.score(self.data, indices, rollout, self.args.group_size)
            if self.reward_post is not None:
                rewards = self.reward_post(self.data, indices, rollout, self.args.group_size, rewards, per_func)
        except RewardError as e:
            error, rewards, per_func = e, None, None
        if ddp.any_rank(error is not None, self.dist):
            error = error or RewardError("a reward function failed on another rank")
            if self.args.on_reward_error == "raise":
                raise error
            print(f"dash-fast: step {step}: {error}; batch skipped (on_reward_error=skip)")
            return None, None
        return rewards, per_func

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
            prompt_ids = [self.data.prompt_ids[i] for i in indices[lo:hi] for _ in range(G)]
            offset = len(rewards) + lo * G  # seeds continue the step's rows
            more = self.generate(prompt_ids, step, row_offset=offset)
            more_rewards, more_per_func = self._score(indices[lo:hi], more, step)
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
        rollout = Rollout.concat(parts, self.pad_id)
        mine = [i for i, g in enumerate(global_rows) if g < len(rewards)]  # never empty: round 0 is kept whole
        if len(mine) < len(rollout):
            rollout, global_rows = rollout.select(mine), [global_rows[i] for i in mine]
        stats = {"refill_rounds": rounds, "refill_rows": sampled - first,
                 "refill_rows_unused": sampled - len(rewards), "time_refill_s": time.perf_counter() - t0}
        return rollout, global_rows, rewards, per_func, lengths, stats
