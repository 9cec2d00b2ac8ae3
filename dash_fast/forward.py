"""The policy's forward over rollout rows, without changing the weights: the learner's reading side.

Rows of a rollout are grouped into token-budget micro-batches (`micro_batches`); each goes through the decoder
(`hidden_and_targets`: the model's own forward, or the shared-prompt forward that computes each prompt once per
group, models/shared_prompt.py) to the hidden states that predict its completion tokens, then through the loss
of losses.py's registry (`micro_loss`) or to token log-probs (`logprob_pass`: the old and reference passes).
Row-wise [B] and token-wise [B, L] values are read per completion token (`per_token`). learner.Learner adds the
optimizer loop on top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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
    # (padded tokens, longest row) -> whether a micro-batch checkpoints its layers (the shared-prompt forward
    # decides per micro-batch); None: the config's gradient_checkpointing for every micro-batch
    checkpointing: Callable[[int, int], bool] | None = None


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


def call_hooks(hooks: list[Callable], *args: Any) -> None:
    """Call each hook of `hooks` with `args`, in list order."""
    for hook in hooks:
        hook(*args)


class PolicyForward:
    """Forward passes of the policy (and the KL reference) over rollout rows; see the module docstring."""

    def __init__(self, args: DashConfig, parts: LearnerParts, hooks: LearnerHooks) -> None:
        self.args, self.hooks = args, hooks
        self.model, self.ref_model, self.ref_context, self.fsdp_root = parts.model, parts.ref_model, \
            parts.ref_context, parts.fsdp_root
        self.shared_prompt, self.pad_id = parts.shared_prompt, parts.pad_id
        self.device = parts.device or torch.device("cpu")
        self.precision = parts.precision or MixedPrecision(parts.model, self.device)
        self.loss_name, self.loss = parts.loss, get_loss(parts.loss, **parts.loss_options)
        self.micro_batch_tokens = args.micro_batch_tokens  # halved on out-of-memory; saved in checkpoints
        self.forward_passes = 0  # policy forwards (train + old log-prob): what a step cost, in forwards
        self.checkpoint_rule = parts.checkpointing
        self.checkpointed_micro_batches = 0
        self.logit_multiplier = logit_multiplier(parts.model)
        # sampler importance sampling in the loss (DashConfig.sampler_is_*): on where sampler and trainer differ
        bf16 = self.precision.enabled or any(p.dtype == torch.bfloat16 for p in parts.model.parameters())
        self.sampler_is = args.sampler_is_on(bf16=bf16)

    def old_logprobs(self, rollout: Rollout, rows: list[int], needs_old: bool,
                     difference: metrics.LogpDifference) -> torch.Tensor | None:
        """The log-probs [B, L] the loss's ratio is taken against (None: on-policy, the loss's own, detached).
        With overlap and no sampler importance sampling: the sampler's (sampled at the previous step's
        weights). Off-policy (`needs_old`: several epochs or minibatches): a no-grad pass of `rows` at the
        current weights, which also measures sampler vs trainer (and the IS ratios) into `difference`."""
        if self.args.overlap and not self.sampler_is:
            return rollout.sampling_logps
        if not needs_old:
            return None
        old = self.logprob_pass(self.model, rollout, rows, "train/logprob_old")
        if rows:
            flat = [self._per_token(x, rollout, rows) for x in (old, rollout.sampling_logps)]
            difference.add(*flat)
            if self.sampler_is:
                difference.add_ratio(self._is_ratio_values(self._sampler_is_ratio(*flat, rollout, rows), rollout, rows))
        return old

    def micro_loss(self, rollout: Rollout, rows: list[int], advantages: torch.Tensor, weights: torch.Tensor,
                   old: torch.Tensor | None, ref: torch.Tensor | None, step_tokens: int,
                   bonus: EntropyBonus | None, backward_next: bool = False) -> tuple[torch.Tensor, dict, int]:
        """Forward + loss of the micro-batch `rows` (the registry's loss); returns (loss, stats, tokens).
        Under FSDP2 it runs inside the root's forward, where the lm_head weight it reads is unsharded.
        `backward_next`: the caller runs loss.backward() next, so the loss may add the head's gradient into the
        head's existing .grad as it computes it (LossInputs.weight_grad; one [V, H] buffer less per micro-batch)."""
        hidden, targets = self.hidden_and_targets(self.model, rollout, rows)
        weight, bias = lm_head(self.model)
        inputs = LossInputs(hidden, weight, bias, targets, rollout.completion_lengths[rows].tolist(),
                            self._per_token(advantages, rollout, rows), self._per_token(weights, rollout, rows),
                            None if old is None else self._per_token(old, rollout, rows),
                            None if ref is None else self._per_token(ref, rollout, rows), step_tokens)
        if backward_next and self.fsdp_root is None and torch.is_grad_enabled():
            inputs.weight_grad = weight.grad
        if self.sampler_is:  # sampler importance sampling (DashConfig.sampler_is_*), computed inside the loss
            inputs.sampler_logp = self._per_token(rollout.sampling_logps, rollout, rows)
            inputs.row_ids = self._row_ids(rollout, rows)
        with nvtx_range(f"loss/{self.loss_name}"):  # the backward runs later, under train/backward
            loss, st = self.loss(inputs, self.args, bonus)
        return loss, st, targets.numel()

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

    def checkpoints(self, tokens: int, row_tokens: int) -> bool:
        """Whether the shared-prompt forward of a micro-batch this size checkpoints its layers (counted in
        `checkpointed_micro_batches`)."""
        on = bool(self.args.gradient_checkpointing) and torch.is_grad_enabled() and (  # no-grad passes keep nothing
            self.checkpoint_rule is None or self.checkpoint_rule(tokens, row_tokens))
        self.checkpointed_micro_batches += on
        return on

    def _decoder_hidden(self, model, rollout: Rollout, rows: list[int]):
        lengths = rollout.completion_lengths.tolist()
        comp = rollout.completion_ids
        if self.shared_prompt:
            from dash_fast.models.shared_prompt import shared_prompt_hidden

            row_tokens = max(len(rollout.prompt_ids[r]) + lengths[r] for r in rows)
            hidden, targets = shared_prompt_hidden(model, [rollout.prompt_ids[r] for r in rows],
                                                   [comp[r, : lengths[r]].tolist() for r in rows], self.pad_id,
                                                   checkpointing=self.checkpoints(len(rows) * row_tokens, row_tokens))
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
                call_hooks(self.hooks.before_micro_batch)
                micro_rows = [rows[i] for i in micro]
                if model is self.model and policy:
                    self.forward_passes += 1
                hidden, targets = self.hidden_and_targets(model, rollout, micro_rows)
                weight, bias = lm_head(model)
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


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight and bias (None when it has none)."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
