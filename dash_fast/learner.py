"""The learner: the optimizer steps of one batch, as one loop.

    update           epochs x minibatches over the kept rows          -> optimizer_step for each minibatch
    optimizer_step   accumulate, retried with half the token budget on out-of-memory -> apply
    accumulate       token-budget micro-batches: micro_loss -> loss.backward()
    apply            sum over ranks, clip, optimizer.step() (skipped when non-finite), weights -> engine

Gradients accumulate over micro-batches with one global normaliser (algo.py); the loss is a function from
the registry in losses.py. Under torchrun each rank trains its own rows of the joined batch (`global_rows`
maps them) and gradients are summed over ranks; under FSDP2 a rank with fewer micro-batches runs zero-loss
ones (`pad_micro_batches`) so that every rank takes part in the same collectives. What others need to see
or do inside the loop hangs on `LearnerHooks`: the overlap scheduler widens the learner's cores before each
micro-batch and waits for the sampler before an optimizer step; the trainer fires transformers' callback
events (on_substep_end, on_pre_optimizer_step, on_optimizer_step); tests observe the loop the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from dash_fast import algo, metrics
from dash_fast.config import DashConfig
from dash_fast.data.prompts import pad_right
from dash_fast.engines.base import Rollout
from dash_fast.losses import EntropyBonus, LossInputs, get_loss
from dash_fast.models.decoder import logit_multiplier
from dash_fast.models.mixed_precision import MixedPrecision
from dash_fast.runtime import distributed as ddp
from dash_fast.runtime.profiling import nvtx_range


class TrainingAborted(RuntimeError):
    """Training stopped on an error; the last checkpoint on disk is intact."""


@dataclass
class LearnerParts:
    """What the learner trains and talks to. `loss` names a loss in losses.py's registry (`loss_options` bound
    to it); `entropy_bonus` is the loss's stateful term (its coefficient is saved in checkpoints);
    `ref_model` / `ref_context`: the KL reference, a frozen copy or (PEFT) a context under which the policy
    is the reference; `precision`: bf16 compute over fp32 masters (none: fp32, or bf16 trained in place)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    engine: Any
    dist: ddp.DistInfo
    loss: str = "fused"
    loss_options: dict = field(default_factory=dict)
    entropy_bonus: EntropyBonus | None = None
    precision: MixedPrecision | None = None
    ref_model: torch.nn.Module | None = None
    ref_context: Callable | None = None
    fsdp_root: Any = None
    shared_prompt: bool = False
    pad_id: int = 0
    device: torch.device | None = None


@dataclass
class StepBatch:
    """The rows one optimizer step trains (this rank's indices into `rollout`) and the values the loss reads:
    advantages [B], token weights [B, L], old and reference log-probs [B, L] (None: not used)."""

    rollout: Rollout
    rows: list[int]
    advantages: torch.Tensor
    weights: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None


@dataclass
class LearnerHooks:
    """Callables the loop calls at fixed points, in list order. `step_begin(batch)`: each accumulation of
    an optimizer step (again after an out-of-memory retry); `before_micro_batch()`: before every forward,
    log-prob passes included; `after_micro_batch(index, count)`: after a micro-batch's backward;
    `before_optimizer_step()` / `after_optimizer_step()`: around `optimizer.step()` (a finite step only)."""

    step_begin: list[Callable[[StepBatch], None]] = field(default_factory=list)
    before_micro_batch: list[Callable[[], None]] = field(default_factory=list)
    after_micro_batch: list[Callable[[int, int], None]] = field(default_factory=list)
    before_optimizer_step: list[Callable[[], None]] = field(default_factory=list)
    after_optimizer_step: list[Callable[[], None]] = field(default_factory=list)


def _call(hooks: list[Callable], *args: Any) -> None:
    for hook in hooks:
        hook(*args)


ZERO_STATS = ("loss", "clip_fraction", "kl", "entropy", "grad_norm")


class Learner:
    """The optimizer side of training; `update` is the entry (see the module docstring)."""

    def __init__(self, args: DashConfig, parts: LearnerParts, hooks: LearnerHooks | None = None) -> None:
        self.args, self.hooks = args, hooks or LearnerHooks()
        self.model, self.optimizer, self.scheduler, self.engine = parts.model, parts.optimizer, parts.scheduler, \
            parts.engine
        self.dist, self.ref_model, self.ref_context, self.fsdp_root = parts.dist, parts.ref_model, parts.ref_context, \
            parts.fsdp_root
        self.shared_prompt, self.pad_id = parts.shared_prompt, parts.pad_id
        self.device = parts.device or torch.device("cpu")
        self.precision = parts.precision or MixedPrecision(parts.model, self.device)
        self.loss_name, self.loss = parts.loss, get_loss(parts.loss, **parts.loss_options)
        self.entropy_bonus = parts.entropy_bonus
        self.micro_batch_tokens = args.micro_batch_tokens  # halved on out-of-memory; saved in checkpoints
        self.nonfinite_in_a_row = 0
        self.weights_version = 0  # optimizer steps applied to the policy (the staleness of a rollout)
        self.forward_passes = 0  # policy forwards (train + old log-prob), counted for tests and stats
        self.step_tokens = 0  # completion tokens of this rank's rows in the current optimizer step
        self.logit_multiplier = logit_multiplier(parts.model)
        # sampler importance sampling in the loss (DashConfig.sampler_is_*): on where sampler and trainer differ
        bf16 = self.precision.enabled or any(p.dtype == torch.bfloat16 for p in parts.model.parameters())
        self.sampler_is = args.sampler_is_on(bf16=bf16)

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
        old = None
        # sampler vs trainer log-probs (and the importance-sampling ratios): metrics.LogpDifference
        difference = metrics.LogpDifference(importance_sampling=self.sampler_is)
        if a.overlap and not self.sampler_is:  # samples come from the previous step's weights: old = sampler's
            old = rollout.sampling_logps
        elif needs_old:  # (with overlap and importance sampling: old = the trainer's, the sampler corrected by IS)
            old = self.logprob_pass(self.model, rollout, local(kept_rows), "train/logprob_old")
            if local(kept_rows):
                flat = [self._per_token(x, rollout, local(kept_rows)) for x in (old, rollout.sampling_logps)]
                difference.add(*flat)
                if self.sampler_is:
                    difference.add_ratio(self._is_ratio_values(self._sampler_is_ratio(*flat, rollout, local(kept_rows)),
                                                               rollout, local(kept_rows)))
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
                if a.normalize_over == "kept":
                    norm = algo.loss_normaliser(a.loss_agg, lengths[rows], a.max_completion_tokens)
                else:  # every sampled row counts; a minibatch carries its share of them
                    norm = algo.loss_normaliser(a.loss_agg, lengths, a.max_completion_tokens)
                    norm *= len(rows) / len(kept_rows)
                weights = algo.token_weights(rollout.completion_mask, a.loss_agg, norm)
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

    def no_rows(self) -> dict:
        """An update with no row to train (a row mask removed them all): the LR schedule advances by the
        optimizer steps the update would have taken, with a zero loss and no gradient."""
        for _ in range(self.args.epochs_per_rollout * self.args.minibatches):
            self.scheduler.step()
        return {**dict.fromkeys(ZERO_STATS, 0.0), "skipped_steps": 0}

    def optimizer_step(self, batch: StepBatch, step: int = 1, measure: metrics.LogpDifference | None = None) -> dict:
        """One optimizer step over `batch.rows`. `measure`: gets the sampler vs trainer log-probs of the
        tokens the loss forwards computed."""
        sums = self._retry_on_oom(partial(self.accumulate, batch, measure))
        return self.apply(sums, step)

    def accumulate(self, batch: StepBatch, measure: metrics.LogpDifference | None = None) -> list[float]:
        """Forward/backward over token-budget micro-batches of this rank's rows; returns the loss sums
        [loss, clip x tokens, kl x tokens, entropy, tokens]."""
        _call(self.hooks.step_begin, batch)
        rollout, rows = batch.rollout, batch.rows
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micros: list = self.micro_batches(rollout, rows) if rows else []
        self.step_tokens = int(rollout.completion_lengths[rows].sum()) if rows else 0
        if measure is not None:  # a retry after out-of-memory measures again
            measure.reset()
        if self.fsdp_root is not None:
            micros = self.pad_micro_batches(micros)
        total_loss, clip_sum, kl_sum, ent_sum, tokens = 0.0, 0.0, 0.0, 0.0, 0
        for i, micro in enumerate(micros):
            _call(self.hooks.before_micro_batch)
            with nvtx_range("train/forward"):
                self.forward_passes += 1
                if micro is None:  # FSDP2 padding
                    loss, st, n = self.fsdp_root(self._dummy_loss, rollout), None, 0
                else:
                    micro_rows = [rows[j] for j in micro]
                    run = self.micro_loss if self.fsdp_root is None else partial(self.fsdp_root, self.micro_loss)
                    loss, st, n = run(rollout, micro_rows, batch.advantages, batch.weights, batch.old, batch.ref,
                                      self.step_tokens, self.entropy_bonus)
            with nvtx_range("train/backward"):
                loss.backward()
            _call(self.hooks.after_micro_batch, i, len(micros))
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
                _call(self.hooks.before_optimizer_step)
                self.optimizer.step()
                if self.entropy_bonus is not None:  # the adaptive coefficient moves once per optimizer step
                    self.entropy_bonus.end_step()
                _call(self.hooks.after_optimizer_step)
                self.weights_version += 1
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
    def _retry_on_oom(self, accumulate: Callable[[], list[float]]) -> list[float]:
        """`accumulate()`; when it runs out of memory (on any rank: every rank retries, so the ranks stay
        in step), halve the micro-batch token budget and run it again."""
        while True:
            sums, oom = None, False
            try:
                sums = accumulate()
            except torch.OutOfMemoryError:
                oom = True
            if not ddp.any_rank(oom, self.dist):
                return sums
            self.optimizer.zero_grad(set_to_none=True)
            if self.micro_batch_tokens <= 1:
                raise TrainingAborted("out of memory in backward even with micro_batch_tokens=1")
            self.micro_batch_tokens = max(1, self.micro_batch_tokens // 2)
            print(f"dash-fast: out of memory in backward; micro_batch_tokens -> {self.micro_batch_tokens}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def pad_micro_batches(self, micros: list) -> list:
        """FSDP2: `micros` padded with None (a zero-loss forward) to the largest count of any rank, so every
        rank runs the same forward/backward collectives."""
        return micros + [None] * (int(ddp.all_reduce_max(len(micros), self.dist)) - len(micros))

    # ------------------------------------------------------------------ forward pieces
    def micro_loss(self, rollout: Rollout, rows: list[int], advantages: torch.Tensor, weights: torch.Tensor,
                   old: torch.Tensor | None, ref: torch.Tensor | None, step_tokens: int,
                   bonus: EntropyBonus | None) -> tuple[torch.Tensor, dict, int]:
        """Forward + loss of the micro-batch `rows` (the registry's loss); returns (loss, stats, tokens).
        Under FSDP2 it runs inside the root's forward, where the lm_head weight it reads is unsharded."""
        hidden, targets = self.hidden_and_targets(self.model, rollout, rows)
        weight, bias = _lm_head(self.model)
        inputs = LossInputs(hidden, weight, bias, targets, rollout.completion_lengths[rows].tolist(),
                            self._per_token(advantages, rollout, rows), self._per_token(weights, rollout, rows),
                            None if old is None else self._per_token(old, rollout, rows),
                            None if ref is None else self._per_token(ref, rollout, rows), step_tokens)
        if self.sampler_is:  # sampler importance sampling (DashConfig.sampler_is_*), computed inside the loss
            inputs.sampler_logp = self._per_token(rollout.sampling_logps, rollout, rows)
            inputs.row_ids = self._row_ids(rollout, rows)
        with nvtx_range(f"loss/{self.loss_name}"):  # the backward runs later, under train/backward
            loss, st = self.loss(inputs, self.args, bonus)
        return loss, st, targets.numel()

    def _dummy_loss(self, rollout):
        """A zero loss through every parameter: FSDP2 ranks with fewer micro-batches run it so that all
        ranks take part in the same number of forward/backward collectives."""
        hidden, _ = self.hidden_and_targets(self.model, rollout, [0])
        weight, _ = _lm_head(self.model)
        return hidden.sum() * 0.0 + weight.sum() * 0.0

    def micro_batches(self, rollout: Rollout, rows: list[int]) -> list[list[int]]:
        """Indices into `rows`, grouped into micro-batches of about `micro_batch_tokens` padded tokens."""
        lengths = rollout.completion_lengths.tolist()
        if self.shared_prompt:
            from dash_fast.models.shared_prompt import pack_shared

            return pack_shared([rollout.prompt_ids[r] for r in rows], [lengths[r] for r in rows],
                               self.micro_batch_tokens)
        return algo.pack_micro_batches([len(rollout.prompt_ids[r]) + lengths[r] for r in rows],
                                       self.micro_batch_tokens)

    def hidden_and_targets(self, model, rollout: Rollout, rows: list[int]):
        """One forward of the decoder over prompt+completion rows; returns the hidden states that predict
        each completion token, flattened to [N, H] in row order, with their targets. A bf16 run computes it
        under autocast and hands the loss kernels bf16 hidden states (the lm_head stays the fp32 master)."""
        with self.precision.autocast():
            hidden, targets = self._decoder_hidden(model, rollout, rows)
        return self.precision.compute(hidden), targets

    def _decoder_hidden(self, model, rollout: Rollout, rows: list[int]):
        lengths = rollout.completion_lengths.tolist()
        comp = rollout.completion_ids
        if self.shared_prompt:
            from dash_fast.models.shared_prompt import shared_prompt_hidden

            hidden, targets = shared_prompt_hidden(model, [rollout.prompt_ids[r] for r in rows],
                                                   [comp[r, : lengths[r]].tolist() for r in rows], self.pad_id,
                                                   checkpointing=bool(self.args.gradient_checkpointing))
            return (hidden if self.logit_multiplier == 1.0 else hidden * self.logit_multiplier), targets
        seqs = [rollout.prompt_ids[r] + comp[r, : lengths[r]].tolist() for r in rows]
        ids, attn = pad_right(seqs, self.pad_id)
        ids, attn = ids.to(self.device), attn.to(self.device)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel: adapters inside
        hidden = getattr(base, base.base_model_prefix)(input_ids=ids, attention_mask=attn).last_hidden_state
        pred = torch.zeros_like(attn, dtype=torch.bool)
        for j, r in enumerate(rows):
            p = len(rollout.prompt_ids[r])
            pred[j, p - 1 : p - 1 + lengths[r]] = True
        targets = torch.cat([comp[r, : lengths[r]] for r in rows]).to(self.device)
        hidden = hidden[pred]
        return (hidden if self.logit_multiplier == 1.0 else hidden * self.logit_multiplier), targets

    def _per_token(self, values: torch.Tensor, rollout: Rollout, rows: list[int]) -> torch.Tensor:
        """Row-wise [B] or token-wise [B, L] values -> flat per completion token of `rows`."""
        lengths = rollout.completion_lengths.tolist()
        if values.dim() == 1:
            out = torch.cat([values[r].expand(lengths[r]) for r in rows])
        else:
            out = torch.cat([values[r, : lengths[r]] for r in rows])
        return out.to(self.device)

    def _row_ids(self, rollout: Rollout, rows: list[int]) -> torch.Tensor:
        """The row (numbered over the rows with tokens, so ids < tokens) of each flat completion token of `rows`:
        a sequence IS ratio's row."""
        lengths = rollout.completion_lengths[rows]
        lengths = lengths[lengths > 0]
        return torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(self.device)

    def _sampler_is_ratio(self, trainer: torch.Tensor, sampler: torch.Tensor, rollout: Rollout,
                          rows: list[int]) -> torch.Tensor:
        from dash_kernels import sampler_is_ratio

        a = self.args
        return sampler_is_ratio(trainer, sampler, a.sampler_is_mode, a.sampler_is_clip_min, a.sampler_is_clip_max,
                                self._row_ids(rollout, rows))

    def _is_ratio_values(self, ratio: torch.Tensor, rollout: Rollout, rows: list[int],
                         live: torch.Tensor | None = None) -> torch.Tensor:
        """The ratios TRL logs: the live tokens' (token modes), or one per row (sequence modes)."""
        if self.args.sampler_is_mode.startswith("sequence"):
            lengths = rollout.completion_lengths[rows].to(ratio.device)
            starts = (torch.cumsum(lengths, 0) - lengths)[lengths > 0]
            return ratio[starts if live is None else starts[live[starts]]]
        return ratio if live is None else ratio[live]

    def reference_logprobs(self, rollout: Rollout, rows: list[int]) -> torch.Tensor:
        """The reference policy's token log-probs of `rows` ([B, L]): the frozen copy, or with PEFT the
        policy itself with its adapters disabled (or its "ref" adapter active)."""
        if self.ref_context is None:
            return self.logprob_pass(self.ref_model, rollout, rows, "train/logprob_ref")
        with self.ref_context():
            return self.logprob_pass(self.model, rollout, rows, "train/logprob_ref", policy=False)

    @torch.no_grad()
    def logprob_pass(self, model, rollout: Rollout, rows: list[int], name: str,
                     policy: bool = True) -> torch.Tensor:
        """No-grad token log-probs of rollout rows, as a [B, L] tensor (old / ref passes); `policy=False`:
        not a policy forward (the PEFT reference), not counted in `forward_passes`."""
        out = torch.zeros_like(rollout.sampling_logps)
        lengths = rollout.completion_lengths.tolist()
        with nvtx_range(name), ddp.gathered_params(self.fsdp_root if model is self.model else None):
            for micro in self.micro_batches(rollout, rows):
                _call(self.hooks.before_micro_batch)
                micro_rows = [rows[i] for i in micro]
                if model is self.model and policy:
                    self.forward_passes += 1
                hidden, targets = self.hidden_and_targets(model, rollout, micro_rows)
                weight, bias = _lm_head(model)
                logp = self._logprobs(hidden, weight, bias, targets).float().cpu()
                offset = 0
                for r in micro_rows:
                    out[r, : lengths[r]] = logp[offset : offset + lengths[r]]
                    offset += lengths[r]
        return out

    def _logprobs(self, hidden, weight, bias, targets) -> torch.Tensor:
        with nvtx_range(f"logprobs/{self.args.loss_impl}"):
            if self.args.loss_impl == "fused":
                from dash_kernels import fused_logprobs

                return fused_logprobs(hidden, weight, bias, targets, temperature=self.args.temperature)
            from dash_kernels import logprobs_ref

            return logprobs_ref(hidden, weight, bias, targets, temperature=self.args.temperature)


def _lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
