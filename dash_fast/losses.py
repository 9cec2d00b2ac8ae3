"""The policy-gradient losses, chosen by name from a registry, and TRL 1.16's loss variants.

Every loss takes one micro-batch's `LossInputs` (hidden states, lm_head, targets and per-token values, flat
over the completion tokens of its rows) and returns `(loss, stats)`; the learner sums micro-batch losses
into one optimizer step. `get_loss(name, **options)` returns the registered function with its options
bound; `register_loss(name)` adds one (a layer over the core, or a test, injects a loss this way).

Registered: "fused" / "liger" / "naive" (dash_kernels' clipped surrogate + k3 KL: the fused Triton/CPU
kernel, Liger's, the plain torch reference; `loss_impl` picks one) and "variant" (TRL's other objectives,
below, `spec=TrlLoss(...)`).

TRL's other objectives (GRPOTrainer._compute_loss in trl/trainer/grpo_trainer.py) are written here once,
the plain way, on [rows, T] tensors: sequence-level importance ratios (GSPO), the bias-corrected KL, the
two-sided `delta` clip, loss types cispo / sapo / luspo / vespo, the high-entropy token mask, the
off-policy sequence mask, and the entropy bonus (EntropyBonus); the sampler importance-sampling ratio and the
token-level bias-corrected KL (in the fused kernels too) apply here when this path runs. They run on the materialised logits of one
micro-batch (dash_kernels.logprobs_ref), so memory is bounded by the micro-batch token budget, not the
rollout; the fused kernels are not used for the loss there.

How it meets DASH: rows are filtered (|A| > tau) before the forward, and every per-row quantity here
(sequence ratio, off-policy mask, VESPO weight) is computed over a whole kept row, so the filter only
removes rows, as on the default path. Aggregation is DASH's: the per-token loss is multiplied by the
learner's token weights (mask / global normaliser of `loss_agg`), so micro-batches sum to the
minibatch loss. TRL's loss types map onto loss_agg as: grpo / sapo -> seq-mean-token-mean, dapo / bnpo /
cispo / vespo -> token-mean, dr_grpo -> dr_grpo, luspo -> dr_grpo weights times max_completion_tokens
(= per-row sum / rows). The entropy quantile of `top_entropy_quantile` is taken over the real tokens of
the micro-batch on this rank (TRL: of its per-device micro-batch, gathered over ranks); dash-fast's
micro-batches are token-budget packs of kept rows, so the set of tokens the quantile sees differs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dash_fast.config import DashConfig


@dataclass
class LossInputs:
    """One micro-batch: hidden states [N, H] predicting its N completion tokens (rows in order, `lengths`
    tokens each), the lm_head, and per-token values flat over the same N tokens. `step_tokens`: the
    completion tokens of this rank's rows in the whole optimizer step (the entropy bonus's mean)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    lengths: list[int]
    advantages: torch.Tensor
    token_weights: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    step_tokens: int = 0
    sampler_logp: torch.Tensor | None = None  # the sampler's log-probs: sampler importance sampling is on
    row_ids: torch.Tensor | None = None  # each token's row (sequence-level importance sampling)
    # the head weight's existing .grad, when the caller backwards from the loss (gradient 1) next: a loss may add
    # the head's gradient into it during forward instead of returning it (fused_linear_pg_loss's grad_weight_into)
    weight_grad: torch.Tensor | None = None


# loss(inputs, config, entropy_bonus) -> (0-d loss tensor, stats: clip_fraction, kl_mean, entropy, logp)
LossFn = Callable[["LossInputs", "DashConfig", "EntropyBonus | None"], tuple[torch.Tensor, dict]]
LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {}


def register_loss(name: str) -> Callable:
    """Decorator: `fn(inputs, config, bonus, **options)` becomes the loss called `name` (replacing one)."""

    def add(fn: Callable) -> Callable:
        LOSSES[name] = fn
        return fn

    return add


def get_loss(name: str, **options: Any) -> LossFn:
    """The loss registered as `name`, with `options` bound (e.g. "variant", spec=TrlLoss(...))."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (registered: {', '.join(sorted(LOSSES))})")
    return functools.partial(LOSSES[name], **options) if options else LOSSES[name]


def _kernel_loss(impl: str, x: LossInputs, a: DashConfig, bonus: EntropyBonus | None) -> tuple[torch.Tensor, dict]:
    """dash_kernels' clipped surrogate + k3 KL per token, weighted by the learner's token weights."""
    if bonus is not None:
        raise ValueError(f"the entropy bonus needs the 'variant' loss, not {impl!r}")
    args = (x.hidden, x.weight, x.bias, x.targets, x.advantages, x.token_weights, x.old_logp, x.ref_logp)
    kwargs = dict(temperature=a.temperature, eps_low=a.epsilon, eps_high=a.eps_high, beta=a.beta,
                  tau=None,  # rows were filtered before this forward; the kept fallback row must stay
                  return_entropy=True)
    if x.sampler_logp is not None:  # sampler importance sampling (DashConfig.sampler_is_*)
        kwargs.update(sampler_logp=x.sampler_logp, row_ids=x.row_ids, is_mode=a.sampler_is_mode,
                      is_clip_min=a.sampler_is_clip_min, is_clip_max=a.sampler_is_clip_max)
    if a.kl_bias_correction and a.beta > 0:
        kwargs["kl_correction"] = True
    if impl == "fused":
        from dash_kernels import fused_linear_pg_loss

        return fused_linear_pg_loss(*args, bwd=a.triton_bwd, grad_weight_into=x.weight_grad, **kwargs)
    if impl == "liger":
        from dash_kernels.liger_adapter import liger_pg_loss

        return liger_pg_loss(*args, **kwargs)
    from dash_kernels import pg_loss_ref

    return pg_loss_ref(*args, **kwargs)


for _impl in ("fused", "liger", "naive"):
    register_loss(_impl)(functools.partial(_kernel_loss, _impl))


@dataclass(frozen=True)
class TrlLoss:
    """The TRL loss options that select this path (names and defaults as TRL's GRPOConfig)."""

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_bonus: bool = False  # entropy_coef != 0 or use_adaptive_entropy (the coefficient: EntropyBonus)
    luspo_scale: float = 1.0  # max_completion_tokens: turns dr_grpo's token weights into luspo's per-row sums
    kernel_kl_correction: bool = True  # the loss kernels have the bias-corrected KL (fused, naive; not Liger)

    def is_variant(self) -> bool:
        """True when the default clipped-surrogate + k3 kernels would compute something else (the token-level
        bias-corrected KL is theirs: DashConfig.kl_bias_correction, unless `kernel_kl_correction` is False)."""
        return (self.loss_type in ("cispo", "sapo", "luspo", "vespo") or self.importance_sampling_level != "token"
                or self.delta is not None
                or (self.beta != 0.0 and self.use_bias_correction_kl and not self.kernel_kl_correction)
                or self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None
                or self.entropy_bonus)


@dataclass
class EntropyBonus:
    """TRL's entropy bonus, L = L_policy - coef * H with H the mean entropy of the optimizer step's real
    tokens (here: the step's kept rows on this rank; TRL: per micro-batch, / accumulation steps), and its
    adaptive controller: after each optimizer step coef moves by `delta` towards more entropy when the
    step's mean entropy is <= `target` and back otherwise, within [coef_min, coef_max]; under the
    controller the coefficient applies only while the last step's entropy is <= target (TRL's gate)."""

    coef: float
    adaptive: bool = False
    target: float = 0.2
    delta: float = 0.005
    coef_min: float = 0.0
    coef_max: float = 1.0
    last_entropy: float = math.inf
    window_sum: float = 0.0
    window_tokens: float = 0.0
    contribution: float = 0.0  # sum of coef x H subtracted since the last record (policy_loss = loss + this)

    def term(self, entropies: torch.Tensor, mask: torch.Tensor, step_tokens: int) -> torch.Tensor:
        """coef x (this micro-batch's share of the step's mean entropy), with gradient."""
        coef = self.coef if not self.adaptive or self.last_entropy <= self.target else 0.0
        total = (entropies * mask).sum()
        self.window_sum += float(total.detach())
        self.window_tokens += float(mask.sum())
        out = coef * total / max(step_tokens, 1)
        self.contribution += float(out.detach())
        return out

    def state_dict(self) -> dict:
        """The controller's state, saved in checkpoints so that a resumed run continues with the same coef."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def take_contribution(self) -> float:
        """The coef x H subtracted since the last call, then 0 (TRL's policy_loss = loss + this)."""
        out, self.contribution = self.contribution, 0.0
        return out

    def set_coef(self, value: float) -> None:
        """Set the coefficient (TRL's `trainer.entropy_coef = value`)."""
        self.coef = float(value)

    def end_step(self) -> None:
        """After an optimizer step: the adaptive update, then a fresh window."""
        if self.adaptive:
            entropy = self.window_sum / max(self.window_tokens, 1.0)
            if entropy <= self.target:
                self.coef = min(self.coef + self.delta, self.coef_max)
            else:
                self.coef = max(self.coef - self.delta, self.coef_min)
            self.last_entropy = entropy
        self.window_sum = self.window_tokens = 0.0


def vespo_gamma_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                        k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float,
                        is_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """VESPO's detached per-row weight phi(w) = exp(lambda + k log w - lambda w), w the sequence ratio
    exp(sum_t log_ratio_t) times the sampler IS ratios' product when given (TRL's get_gamma_weights). [R, 1]."""
    with torch.no_grad():
        lower = math.log(1e-8)
        seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_ratio is not None:  # log w = log(pi / pi_old) + log(pi_old / pi_sampler), every position as TRL
            seq_log_ratio = seq_log_ratio + torch.clamp(torch.log(is_ratio), lower, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq_log_ratio, lower, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, torch.full_like(advantages, k_pos), torch.full_like(advantages, k_neg))
        lam = torch.where(nonneg, torch.full_like(advantages, lambda_pos),
                          torch.full_like(advantages, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def trl_token_loss(spec: TrlLoss, logp: torch.Tensor, old_logp: torch.Tensor | None,
                   ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                   entropies: torch.Tensor | None = None, is_ratio: torch.Tensor | None = None,
                   sampler_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """TRL's per-token loss [R, T] before aggregation (mask not yet applied), and its statistics.

    `advantages` is [R] or [R, T]; `old_logp` None means on-policy (logp.detach()); `mask` is 1 on real
    completion tokens. The order of operations is TRL's, so sequence-level tensors broadcast as there.
    `is_ratio` [R, T]: the sampler IS ratios (dash_kernels.sampler_is_ratio; TRL's vLLM correction), which
    multiply the policy term (VESPO: enter its weights); `sampler_logp` [R, T]: the sampler's log-probs, which
    the off-policy mask reads when given (TRL with vLLM), else the old ones."""
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    adv = adv.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    keep = mask
    if spec.top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs the token entropies")
        real = entropies[mask.bool()].detach().float()
        entropy_mask = torch.zeros_like(mask, dtype=torch.bool)
        if real.numel():
            threshold = torch.quantile(real, 1 - spec.top_entropy_quantile)
            entropy_mask = (entropies.detach() * mask >= threshold) & mask.bool()
    else:
        entropy_mask = None
    if spec.off_policy_mask_threshold is not None:  # the sampler's log-probs (the old ones without an IS ratio)
        kl_seq = torch.nan_to_num((old if sampler_logp is None else sampler_logp) - logp.detach(), nan=0.0)
        mean_kl = (kl_seq * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        off_policy = ((adv >= 0) | (mean_kl <= spec.off_policy_mask_threshold)).to(logp.dtype)
    log_ratio = logp - old
    if spec.importance_sampling_level == "token":
        log_w = log_ratio
    elif spec.importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                         f"{spec.importance_sampling_level!r}")
    coef_1 = torch.exp(log_w)
    kl = None
    if spec.beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if spec.use_bias_correction_kl:
            kl = kl * coef_1
    lt = spec.loss_type
    if lt == "cispo":
        per_token = -torch.clamp(coef_1, max=spec.epsilon_high).detach() * adv * logp
    elif lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
        c1 = coef_1 if spec.delta is None else torch.clamp(coef_1, max=spec.delta)
        per_token = -torch.minimum(c1 * adv, coef_2 * adv)
    elif lt == "sapo":
        temps = torch.where(adv > 0, torch.full_like(adv, spec.sapo_temperature_pos),
                            torch.full_like(adv, spec.sapo_temperature_neg))
        per_token = -(torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps) * adv
    elif lt == "vespo":
        phi = vespo_gamma_weights(adv, log_ratio, mask, spec.vespo_k_pos, spec.vespo_lambda_pos,
                                  spec.vespo_k_neg, spec.vespo_lambda_neg, is_ratio)
        per_token = -phi * adv * logp
    else:
        raise ValueError(f"unknown loss_type {lt!r}")
    if spec.off_policy_mask_threshold is not None:
        per_token = per_token * off_policy
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if is_ratio is not None and lt != "vespo":
        per_token = per_token * is_ratio
    if kl is not None:
        per_token = per_token + spec.beta * kl
    per_token = per_token.expand_as(logp)
    if lt == "cispo":
        clipped = (coef_1 > spec.epsilon_high) & (adv > 0)
    else:
        clipped = ((coef_1 < 1 - spec.epsilon_low) & (adv < 0)) | ((coef_1 > 1 + spec.epsilon_high) & (adv > 0))
    n = keep.sum().clamp(min=1)
    stats = {"clip_fraction": (clipped.expand_as(logp) * keep).sum().detach() / n,
             "kl_mean": None if kl is None else (kl.detach().expand_as(logp) * keep).sum() / n}
    return per_token, stats


def to_rows(flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Flat per-token values of consecutive rows -> [rows, max length], zero-padded."""
    return torch.nn.utils.rnn.pad_sequence(list(torch.split(flat, lengths)), batch_first=True)


def variant_micro_loss(spec: TrlLoss, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor, lengths: list[int], advantages: torch.Tensor,
                       token_weights: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                       temperature: float = 1.0, bonus: EntropyBonus | None = None,
                       step_tokens: int = 0, sampler_logp: torch.Tensor | None = None,
                       row_ids: torch.Tensor | None = None, is_mode: str = "token_truncate",
                       is_clip_min: float | None = None, is_clip_max: float | None = 3.0) -> tuple[torch.Tensor, dict]:
    """One micro-batch's loss on this path: flat tokens of rows with `lengths` -> rows, TRL's per-token
    loss, then sum of loss x DASH token weights (which carry the mask and the global normaliser).
    `sampler_logp` given: TRL's vLLM importance sampling (dash_kernels.sampler_is_ratio of the old log-probs,
    or this forward's detached ones, against the sampler's; `row_ids`: each token's row)."""
    from dash_kernels import logprobs_ref, sampler_is_ratio

    logp, ent = logprobs_ref(hidden, weight, bias, targets, temperature=temperature, return_entropy=True)
    mask = to_rows(torch.ones_like(logp), lengths)
    ratio = None
    if sampler_logp is not None:
        trainer = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
        ratio = sampler_is_ratio(trainer, sampler_logp, is_mode, is_clip_min, is_clip_max, row_ids)
        one = torch.zeros(1, dtype=logp.dtype, device=logp.device)  # padding: TRL's ratio of a zero difference
        pad = sampler_is_ratio(one, one, is_mode, is_clip_min, is_clip_max, one.long())
    rows = [to_rows(x, lengths) if x is not None else None for x in (logp, advantages, token_weights, old_logp,
                                                                      ref_logp, ent, ratio, sampler_logp)]
    logp_r, adv_r, w_r, old_r, ref_r, ent_r, ratio_r, samp_r = rows
    ref_r = None if ref_r is None else ref_r.to(logp_r.dtype)
    old_r = None if old_r is None else torch.where(mask.bool(), old_r.to(logp_r.dtype), logp_r.detach())
    if ratio_r is not None:
        ratio_r = torch.where(mask.bool(), ratio_r, pad)
        samp_r = torch.where(mask.bool(), samp_r.to(logp_r.dtype), logp_r.detach())
    per_token, stats = trl_token_loss(spec, logp_r, old_r, ref_r, adv_r, mask, ent_r, ratio_r, samp_r)
    w = w_r.to(per_token.dtype) * (spec.luspo_scale if spec.loss_type == "luspo" else 1.0)
    loss = (per_token * w * mask).sum()
    if bonus is not None:
        loss = loss - bonus.term(ent_r, mask, step_tokens)
    stats["entropy"] = ent.detach()
    stats["logp"] = logp.detach()
    stats["is_ratio"] = ratio
    return loss, stats


@register_loss("variant")
def variant_loss(x: LossInputs, a: DashConfig, bonus: EntropyBonus | None, *, spec: TrlLoss) -> tuple[torch.Tensor, dict]:
    """The registry's entry for TRL's objectives (`variant_micro_loss` with the run's temperature)."""
    return variant_micro_loss(spec, x.hidden, x.weight, x.bias, x.targets, x.lengths, x.advantages, x.token_weights,
                              x.old_logp, x.ref_logp, temperature=a.temperature, bonus=bonus,
                              step_tokens=x.step_tokens, sampler_logp=x.sampler_logp, row_ids=x.row_ids,
                              is_mode=a.sampler_is_mode, is_clip_min=a.sampler_is_clip_min,
                              is_clip_max=a.sampler_is_clip_max)
