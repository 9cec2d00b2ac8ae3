"""The learner: the optimizer steps of one batch.

K epochs (`epochs_per_rollout`) x M minibatches of optimizer steps over the rows the filter kept; each
step accumulates gradients over token-budget micro-batches with one global normaliser (algo.py), halves
the budget and retries on out-of-memory, skips a step whose loss or gradient is non-finite, and pushes
the new weights to the rollout engine. Under torchrun each rank trains its own rows of the joined batch
(`global_rows` maps them) and gradients are summed over ranks; under FSDP2 a rank with fewer
micro-batches runs zero-loss ones so that every rank takes part in the same collectives.
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch

from dash_fast import algo, metrics
from dash_fast.config import DashConfig
from dash_fast.data.prompts import pad_right
from dash_fast.engines.base import Rollout
from dash_fast.mixed_precision import MixedPrecision
from dash_fast.models.decoder import logit_multiplier
from dash_fast.overlap import OverlapScheduler
from dash_fast.runtime import distributed as ddp
from dash_fast.runtime.profiling import nvtx_range


class TrainingAborted(RuntimeError):
    """Training stopped on an error; the last checkpoint on disk is intact."""


class Learner:
    """Owns the optimizer side of training: `update` is the entry; the forward pieces (micro-batches,
    hidden states, log-prob passes, the loss) are its methods so tests can count or wrap them."""

    def __init__(self, args: DashConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, engine, dist: ddp.DistInfo, overlap: OverlapScheduler | None = None,
                 ref_model: torch.nn.Module | None = None, fsdp_root=None, shared_prompt: bool = False,
                 pad_id: int = 0, device: torch.device | None = None, ref_context=None,
                 precision: MixedPrecision | None = None) -> None:
        self.args, self.model, self.optimizer, self.scheduler, self.engine = args, model, optimizer, scheduler, engine
        self.dist, self.overlap, self.ref_model, self.fsdp_root = dist, overlap, ref_model, fsdp_root
        self.ref_context = ref_context  # PEFT: a context under which the policy is the reference (no ref_model)
        self.shared_prompt, self.pad_id, self.device = shared_prompt, pad_id, device or torch.device("cpu")
        # bf16 compute over fp32 masters (mixed_precision.py); off: fp32, or bf16 weights trained in place
        self.precision = precision or MixedPrecision(model, self.device)
        self.micro_batch_tokens = args.micro_batch_tokens  # halved on out-of-memory; saved in checkpoints
        self.nonfinite_in_a_row = 0
        self.weights_version = 0  # optimizer steps applied to the policy (the staleness of a rollout)
        self.forward_passes = 0  # policy forwards (train + old log-prob), counted for tests and stats
        self.trl_loss = None  # a trl_losses.TrlLoss: TRL's loss variants instead of the loss kernels
        self.entropy_bonus = None  # a trl_losses.EntropyBonus (needs trl_loss set)
        self.step_tokens = 0  # completion tokens of this rank's rows in the current optimizer step
        self.on_substep_end = None  # called after each micro-batch's backward but an optimizer step's last
        self.logit_multiplier = logit_multiplier(model)
        # sampler importance sampling in the loss (DashConfig.sampler_is_*): on where sampler and trainer differ
        bf16 = self.precision.enabled or any(p.dtype == torch.bfloat16 for p in model.parameters())
        self.sampler_is = args.sampler_is_on(bf16=bf16)

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
                step_stats = self.optimizer_step(rollout, local(rows), local_adv, weights, old, ref, step, measure)
                n_updates += 1
                for k in stats:
                    stats[k] += step_stats.get(k, 0.0) or 0.0
        for k in ("loss", "clip_fraction", "kl", "entropy", "grad_norm"):
            stats[k] /= max(n_updates, 1)
        stats["optimizer_steps"] = n_updates
        stats.update(difference.record(partial(ddp.all_reduce_sum, info=self.dist),
                                       partial(ddp.all_reduce_max, info=self.dist)))
        return stats

    def optimizer_step(self, rollout, rows, advantages, weights, old, ref, step: int = 1,
                       measure: metrics.LogpDifference | None = None) -> dict:
        """One optimizer step over `rows`; halves the micro-batch budget and retries on out-of-memory
        (on every rank when any rank ran out, so the ranks stay in step). `measure`: gets the sampler vs
        trainer log-probs of the tokens the loss forwards computed."""
        while True:
            sums, oom = None, False
            try:
                sums = self._accumulate(rollout, rows, advantages, weights, old, ref, measure)
            except torch.OutOfMemoryError:
                oom = True
            if not ddp.any_rank(oom, self.dist):
                return self._apply(sums, step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.micro_batch_tokens <= 1:
                raise TrainingAborted("out of memory in backward even with micro_batch_tokens=1")
            self.micro_batch_tokens = max(1, self.micro_batch_tokens // 2)
            print(f"dash-fast: out of memory in backward; micro_batch_tokens -> {self.micro_batch_tokens}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _accumulate(self, rollout, rows, advantages, weights, old, ref,
                    measure: metrics.LogpDifference | None = None) -> list[float]:
        """Forward/backward over token-budget micro-batches of this rank's `rows`; returns loss sums."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micros: list = self.micro_batches(rollout, rows) if rows else []
        self.step_tokens = int(rollout.completion_lengths[rows].sum()) if rows else 0
        if measure is not None:  # a retry after out-of-memory measures again
            measure.reset()
        if self.fsdp_root is not None:  # same number of forwards on every rank
            micros += [None] * (int(ddp.all_reduce_max(len(micros), self.dist)) - len(micros))
        total_loss, clip_sum, kl_sum, ent_sum, tokens = 0.0, 0.0, 0.0, 0.0, 0
        for i, micro in enumerate(micros):
            if self.overlap is not None:  # the learner may take the cores of a sampler that is done
                self.overlap.between_micro_batches()
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
            if self.on_substep_end is not None and i < len(micros) - 1:  # transformers' on_substep_end
                self.on_substep_end()
            if st is None:
                continue
            if measure is not None and st.get("logp") is not None:
                live = self._per_token(weights, rollout, micro_rows) != 0  # the tokens the loss computed
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

    def _apply(self, sums: list[float], step: int) -> dict:
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
                if self.overlap is not None:  # the sampler of the next rollout must be done reading theta
                    self.overlap.wait()
                self.optimizer.step()
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

    # ------------------------------------------------------------------ forward pieces
    def _micro_loss(self, rollout, micro_rows, advantages, weights, old, ref):
        """Forward + loss of one micro-batch. Under FSDP2 it runs inside the root's forward, where the
        lm_head weight it reads directly is unsharded."""
        a = self.args
        hidden, targets = self.hidden_and_targets(self.model, rollout, micro_rows)
        weight, bias = _lm_head(self.model)
        sampler = {}  # sampler importance sampling (DashConfig.sampler_is_*), computed inside the loss
        if self.sampler_is:
            sampler = dict(sampler_logp=self._per_token(rollout.sampling_logps, rollout, micro_rows),
                           row_ids=self._row_ids(rollout, micro_rows), is_mode=a.sampler_is_mode,
                           is_clip_min=a.sampler_is_clip_min, is_clip_max=a.sampler_is_clip_max)
        if self.trl_loss is not None:
            from dash_fast.losses import variant_micro_loss

            loss, st = variant_micro_loss(
                self.trl_loss, hidden, weight, bias, targets, rollout.completion_lengths[micro_rows].tolist(),
                self._per_token(advantages, rollout, micro_rows), self._per_token(weights, rollout, micro_rows),
                None if old is None else self._per_token(old, rollout, micro_rows),
                None if ref is None else self._per_token(ref, rollout, micro_rows), temperature=a.temperature,
                bonus=self.entropy_bonus, step_tokens=self.step_tokens, **sampler)
            return loss, st, targets.numel()
        if a.kl_bias_correction and a.beta > 0:
            sampler["kl_correction"] = True
        loss, st = self.loss_fn(
            hidden, weight, bias, targets,
            self._per_token(advantages, rollout, micro_rows),
            self._per_token(weights, rollout, micro_rows),
            None if old is None else self._per_token(old, rollout, micro_rows),
            None if ref is None else self._per_token(ref, rollout, micro_rows),
            temperature=a.temperature, eps_low=a.epsilon, eps_high=a.eps_high, beta=a.beta,
            tau=None,  # rows were filtered before this forward; the kept fallback row must stay
            return_entropy=True, **sampler,
        )
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
                if self.overlap is not None:
                    self.overlap.between_micro_batches()
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

    def loss_fn(self, *inputs, **kwargs):
        """The policy-gradient loss of `loss_impl` (fused kernel, Liger, or the naive reference)."""
        impl = self.args.loss_impl
        with nvtx_range(f"loss/{impl}"):  # the backward runs later, under train/backward
            if impl == "fused":
                from dash_kernels import fused_linear_pg_loss

                return fused_linear_pg_loss(*inputs, bwd=self.args.triton_bwd, **kwargs)
            if impl == "liger":
                from dash_kernels.liger_adapter import liger_pg_loss

                return liger_pg_loss(*inputs, **kwargs)
            from dash_kernels import pg_loss_ref

            return pg_loss_ref(*inputs, **kwargs)


def _lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
