"""The learner: the optimizer steps of one batch, as one loop.

    update           epochs x minibatches over the kept rows          -> optimizer_step for each minibatch
    optimizer_step   accumulate, retried with half the token budget on out-of-memory -> apply
    accumulate       token-budget micro-batches: micro_loss -> loss.backward()
    apply            sum over ranks, clip, optimizer.step() (skipped when non-finite), weights -> engine

Gradients accumulate over micro-batches with one global normaliser (algo.py); the loss is a function from
the registry in losses.py; the forward passes (micro-batches, the decoder, log-prob passes) are forward.py's
PolicyForward, which the learner extends. Under torchrun each rank trains its own rows of the joined batch
(`global_rows` maps them) and gradients are summed over ranks. Around the loop, not in it: `retry_on_oom`
halves the token budget and runs an accumulation again, and under FSDP2 `pad_micro_batches` gives a rank with
fewer micro-batches zero-loss ones so that every rank takes part in the same collectives. What others need to
see or do inside the loop hangs on `LearnerHooks`: the overlap scheduler widens the learner's cores before each
micro-batch and waits for the sampler before an optimizer step; the trainer fires transformers' callback
events (on_substep_end, on_pre_optimizer_step, on_optimizer_step).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial

import torch

from dash_fast import algo, metrics
from dash_fast.config import DashConfig
from dash_fast.engines.base import Rollout
from dash_fast.forward import LearnerHooks, LearnerParts, PolicyForward, StepBatch, call_hooks, lm_head
from dash_fast.runtime import distributed as ddp
from dash_fast.runtime.profiling import nvtx_range


class TrainingAborted(RuntimeError):
    """Training stopped on an error; the last checkpoint on disk is intact."""


ZERO_STATS = ("loss", "clip_fraction", "kl", "entropy", "grad_norm")


class Learner(PolicyForward):
    """The optimizer side of training; `update` is the entry (see the module docstring)."""

    def __init__(self, args: DashConfig, parts: LearnerParts, hooks: LearnerHooks | None = None) -> None:
        super().__init__(args, parts, hooks or LearnerHooks())
        self.optimizer, self.scheduler, self.engine, self.dist = parts.optimizer, parts.scheduler, parts.engine, \
            parts.dist
        self.entropy_bonus = parts.entropy_bonus
        self.nonfinite_in_a_row = 0
        self.weights_version = 0  # optimizer steps applied to the policy (the staleness of a rollout)
        self.step_tokens = 0  # completion tokens of this rank's rows in the current optimizer step
        if self.dist.is_main and self.sampler_is:  # DashConfig.sampler_is_*: where sampler and trainer differ
            print(f"dash-fast: sampler importance sampling: {args.sampler_is_mode}, ratio bounds "
                  f"[{args.sampler_is_clip_min}, {args.sampler_is_clip_max}]", flush=True)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the learner: the token budget (halved on out-of-memory), the non-finite
        steps in a row, the weights version (optimizer steps applied) and the entropy bonus's coefficient."""
        bonus = self.entropy_bonus
        return {"micro_batch_tokens": self.micro_batch_tokens, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "weights_version": self.weights_version,
                "entropy_bonus": bonus.state_dict() if bonus is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s keys from a checkpoint's resume state (one without a weights version: its
        step, one optimizer step per step)."""
        self.weights_version = state.get("weights_version", state["step"])
        self.micro_batch_tokens = state["micro_batch_tokens"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        if self.entropy_bonus is not None and state.get("entropy_bonus") is not None:
            self.entropy_bonus.load_state_dict(state["entropy_bonus"])  # the adaptive coefficient

    # ------------------------------------------------------------------ the loop
    def update(self, rollout: Rollout, advantages: torch.Tensor, kept: torch.Tensor,
               global_rows: list[int] | None = None, lengths: torch.Tensor | None = None, step: int = 1) -> dict:
        """K epochs x M minibatches of optimizer steps over the kept rows, each step accumulating
        gradients over token-budget micro-batches with a global normaliser.

        `advantages`, `kept` and `lengths` cover the whole (global) rollout; row i of this rank's
        `rollout` is row `global_rows[i]` of it (None: the rollout is all of it, as in one process).
        `step` (the optimizer step being trained) seeds the minibatch split."""
        a = self.args
        kept_rows = kept.tolist()
        lengths = rollout.completion_lengths if lengths is None else lengths
        global_rows = list(range(len(rollout))) if global_rows is None else global_rows
        local_of = {g: i for i, g in enumerate(global_rows)}
        local_adv = advantages[global_rows]

        def local(rows: list[int]) -> list[int]:
            return [local_of[r] for r in rows if r in local_of]

        needs_old = a.epochs_per_rollout > 1 or a.minibatches > 1
        # sampler vs trainer log-probs (and the importance-sampling ratios): metrics.LogpDifference
        difference = metrics.LogpDifference(importance_sampling=self.sampler_is)
        old = self.old_logprobs(rollout, local(kept_rows), needs_old, difference)
        ref = None
        if self.ref_model is not None or self.ref_context is not None:
            ref = self.reference_logprobs(rollout, local(kept_rows))

        stats = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0,
                 "skipped_steps": 0, "time/sync_weights": 0.0}  # the last two summed over the updates
        n_updates = 0
        generator = torch.Generator().manual_seed(a.seed + step - 1)
        for _ in range(a.epochs_per_rollout):
            for part in algo.split_minibatches(len(kept_rows), a.minibatches, generator):
                if part.numel() == 0:  # fewer kept rows than minibatches: no update, the LR schedule still advances
                    self.scheduler.step()
                    continue
                rows = [kept_rows[i] for i in sorted(part.tolist())]
                weights = algo.token_weights(rollout.completion_mask, a.loss_agg,
                                             self._normaliser(lengths, rows, len(kept_rows)))
                # no old pass ran: the first optimizer step's loss forwards (still the sampled weights) measure it
                measure = difference if n_updates == 0 and not needs_old else None
                batch = StepBatch(rollout, local(rows), local_adv, weights, old, ref)
                step_stats = self.optimizer_step(batch, step, measure)
                n_updates += 1
                for k in stats:
                    stats[k] += step_stats.get(k, 0.0) or 0.0
        for k in ZERO_STATS:
            stats[k] /= max(n_updates, 1)
        stats["optimizer_steps"] = n_updates
        stats.update(difference.record(partial(ddp.all_reduce_sum, info=self.dist),
                                       partial(ddp.all_reduce_max, info=self.dist)))
        return stats

    def _normaliser(self, lengths: torch.Tensor, rows: list[int], n_kept: int) -> float:
        """The loss normaliser of a minibatch of `rows` (global indices) out of `n_kept` kept rows."""
        a = self.args
        if a.normalize_over == "kept":
            return algo.loss_normaliser(a.loss_agg, lengths[rows], a.max_completion_tokens)
        # every sampled row counts; a minibatch carries its share of them
        return algo.loss_normaliser(a.loss_agg, lengths, a.max_completion_tokens) * (len(rows) / n_kept)

    def no_rows(self) -> dict:
        """An update with no row to train (a row mask removed them all): the LR schedule advances by the
        optimizer steps the update would have taken, with a zero loss and no gradient."""
        for _ in range(self.args.epochs_per_rollout * self.args.minibatches):
            self.scheduler.step()
        return {**dict.fromkeys(ZERO_STATS, 0.0), "skipped_steps": 0}

    def optimizer_step(self, batch: StepBatch, step: int = 1, measure: metrics.LogpDifference | None = None) -> dict:
        """One optimizer step over `batch.rows`. `measure`: gets the sampler vs trainer log-probs of the
        tokens the loss forwards computed."""
        try:
            sums = retry_on_oom(self, partial(self.accumulate, batch, measure))
            return self.apply(sums, step)
        finally:  # whatever ended the update (a skipped step, an error), the sampler's copy is whole again
            if self.precision.released:
                self.precision.refresh()

    def accumulate(self, batch: StepBatch, measure: metrics.LogpDifference | None = None) -> list[float]:
        """Forward/backward over token-budget micro-batches of this rank's rows; returns the loss sums
        [loss, clip x tokens, kl x tokens, entropy, tokens]."""
        call_hooks(self.hooks.step_begin, batch)
        rollout, rows = batch.rollout, batch.rows
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.release()  # the sampler's bf16 copy, where nothing reads it until apply's refresh
        micros: list = self.micro_batches(rollout, rows) if rows else []
        self.step_tokens = int(rollout.completion_lengths[rows].sum()) if rows else 0
        if measure is not None:  # a retry after out-of-memory measures again
            measure.reset()
        if self.fsdp_root is not None:
            micros = pad_micro_batches(micros, self.dist)
        total_loss, clip_sum, kl_sum, ent_sum, tokens = 0.0, 0.0, 0.0, 0.0, 0
        for i, micro in enumerate(micros):
            call_hooks(self.hooks.before_micro_batch)
            with nvtx_range("train/forward"):
                self.forward_passes += 1
                if micro is None:  # FSDP2 padding
                    loss, st, n = self.fsdp_root(partial(padding_loss, self), rollout), None, 0
                else:
                    micro_rows = [rows[j] for j in micro]
                    run = self.micro_loss if self.fsdp_root is None else partial(self.fsdp_root, self.micro_loss)
                    loss, st, n = run(rollout, micro_rows, batch.advantages, batch.weights, batch.old, batch.ref,
                                      self.step_tokens, self.entropy_bonus, backward_next=True)
            with nvtx_range("train/backward"):
                loss.backward()
            call_hooks(self.hooks.after_micro_batch, i, len(micros))
            if st is None:
                continue
            if measure is not None and st.get("logp") is not None:
                live = self._per_token(batch.weights, rollout, micro_rows) != 0  # the tokens the loss computed
                measure.add(st["logp"][live], self._per_token(rollout.sampling_logps, rollout, micro_rows)[live])
                if st.get("is_ratio") is not None:
                    measure.add_ratio(self._is_ratio_values(st["is_ratio"], rollout, micro_rows, live))
            total_loss += loss.item()  # the loss ops return 0-d tensors (no sync inside them): floats here
            clip_sum += float(st["clip_fraction"]) * n
            kl_sum += (float(st["kl_mean"]) if st.get("kl_mean") is not None else 0.0) * n
            if st.get("entropy") is not None:
                ent_sum += float(st["entropy"].sum())
            tokens += n
        return [total_loss, clip_sum, kl_sum, ent_sum, float(tokens)]

    def apply(self, sums: list[float], step: int) -> dict:
        """Sum gradients (and loss statistics) over ranks, clip, and take the optimizer step unless the
        loss or gradient is non-finite; then push the new weights to the engine."""
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
            t_sync = 0.0
            if finite:
                call_hooks(self.hooks.before_optimizer_step)
                self.optimizer.step()
                if self.entropy_bonus is not None:  # the adaptive coefficient moves once per optimizer step
                    self.entropy_bonus.end_step()
                call_hooks(self.hooks.after_optimizer_step)
                self.weights_version += 1
                self.optimizer.zero_grad(set_to_none=True)  # used: not held through the next generate
                t_sync = time.perf_counter()
                with nvtx_range("sync/weights"):
                    self.precision.refresh()  # the sampler's bf16 copy (none: it reads self.model)
                    self.engine.sync_weights(self.precision.sampler_model)
                t_sync = time.perf_counter() - t_sync
                self.nonfinite_in_a_row = 0
            else:  # skip the step, keep the weights
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_in_a_row += 1
                print(f"dash-fast: non-finite loss/grad at step {step}: step skipped "
                      f"({self.nonfinite_in_a_row}/{a.max_nonfinite_steps})")
                if self.nonfinite_in_a_row >= a.max_nonfinite_steps:
                    raise TrainingAborted(f"{self.nonfinite_in_a_row} non-finite steps in a row "
                                          f"(max_nonfinite_steps={a.max_nonfinite_steps})")
            self.scheduler.step()
        return {"loss": total_loss, "clip_fraction": clip_sum / max(tokens, 1),
                "kl": kl_sum / max(tokens, 1) if a.beta > 0 else 0.0, "entropy": ent_sum / max(tokens, 1),
                "grad_norm": grad_norm, "skipped_steps": 0 if finite else 1, "time/sync_weights": t_sync}

    # ------------------------------------------------------------------ around the loop


def retry_on_oom(learner: Learner, accumulate: Callable[[], list[float]]) -> list[float]:
    """`accumulate()`; when it runs out of memory (on any rank: every rank retries, so the ranks stay in step),
    halve the learner's micro-batch token budget and run it again."""
    while True:
        sums, oom = None, False
        try:
            sums = accumulate()
        except torch.OutOfMemoryError:
            oom = True
        if not ddp.any_rank(oom, learner.dist):
            return sums
        learner.optimizer.zero_grad(set_to_none=True)
        if learner.micro_batch_tokens <= 1:
            raise TrainingAborted("out of memory in backward even with micro_batch_tokens=1")
        learner.micro_batch_tokens = max(1, learner.micro_batch_tokens // 2)
        print(f"dash-fast: out of memory in backward; micro_batch_tokens -> {learner.micro_batch_tokens}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pad_micro_batches(micros: list, dist: ddp.DistInfo) -> list:
    """FSDP2: `micros` padded with None (a zero-loss forward, `padding_loss`) to the largest count of any rank,
    so every rank runs the same forward/backward collectives."""
    return micros + [None] * (int(ddp.all_reduce_max(len(micros), dist)) - len(micros))


def padding_loss(forward: PolicyForward, rollout: Rollout) -> torch.Tensor:
    """A zero loss through every parameter, the forward of a padding micro-batch (pad_micro_batches)."""
    hidden, _ = forward.hidden_and_targets(forward.model, rollout, [0])
    weight, _ = lm_head(forward.model)
    return hidden.sum() * 0.0 + weight.sum() * 0.0
