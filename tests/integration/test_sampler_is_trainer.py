"""Sampler importance sampling in training: the defaults per engine / dtype / overlap, GRPOConfig's
vllm_importance_sampling_* mapping, TRL's metric names in step records, and dash-fast's GRPOTrainer against
TRL's own GRPOTrainer._compute_loss on one batch whose sampler log-probs differ from the trainer's."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import EditedEngine, keep_grads, shifted_sampler
from helpers import make_one_step_trainer as make_trainer
from kernel_cases import trl_compute_loss, trl_ratio_rows

from dash_fast import DashConfig, GRPOConfig
from dash_fast.config import ConfigError
from dash_fast.metrics import IS_RATIO_MAX, IS_RATIO_MEAN, IS_RATIO_MIN, LOGP_DIFF_MEAN

# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("cfg, bf16, on", [
    (dict(), False, False),  # fp32 embedded engine: sampler and trainer agree to ~1e-6
    (dict(), True, True),  # bf16: the sampler's bf16 copy and static cache vs the trainer's autocast
    (dict(engine="vllm"), False, True),
    (dict(overlap=True), False, True),  # stale weights
    (dict(sampler_is_correction=False, engine="vllm"), True, False),
    (dict(sampler_is_correction=True), False, True),
    (dict(loss_impl="liger"), True, False),  # Liger's loss has no such term
])
def test_default_is_on_where_sampler_and_trainer_differ(cfg, bf16, on):
    assert DashConfig(**cfg).sampler_is_on(bf16=bf16) is on


def test_config_checks():
    with pytest.raises(ConfigError, match="sampler_is_mode"):
        DashConfig(sampler_is_mode="token_clip")
    with pytest.raises(ConfigError, match="sampler_is_clip_min"):
        DashConfig(sampler_is_clip_min=2.0, sampler_is_clip_max=1.5)
    with pytest.raises(ConfigError, match="needs a bound"):
        DashConfig(sampler_is_correction=True, sampler_is_clip_max=None)
    with pytest.raises(ConfigError, match="liger"):
        DashConfig(sampler_is_correction=True, loss_impl="liger")
    assert not DashConfig(sampler_is_clip_max=None).sampler_is_on(bf16=True)  # auto: nothing to truncate to


def test_grpo_config_maps_trls_keys_and_defaults():
    vllm = GRPOConfig(max_steps=1, use_vllm=True).to_dash_config()
    assert (vllm.sampler_is_correction, vllm.sampler_is_mode, vllm.sampler_is_clip_min,
            vllm.sampler_is_clip_max) == (True, "sequence_mask", None, 3.0)  # TRL 1.16's defaults
    assert vllm.kl_bias_correction  # TRL's use_bias_correction_kl=True
    plain = GRPOConfig(max_steps=1).to_dash_config()
    assert plain.sampler_is_correction is None  # no vLLM: DashConfig's rule (bf16 / overlap)
    assert GRPOConfig(max_steps=1, use_vllm=True,
                      vllm_importance_sampling_correction=False).to_dash_config().sampler_is_correction is False
    custom = GRPOConfig(max_steps=1, vllm_importance_sampling_mode="token_truncate",
                        vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0).to_dash_config()
    assert (custom.sampler_is_mode, custom.sampler_is_clip_min, custom.sampler_is_clip_max) == ("token_truncate",
                                                                                                0.5, 2.0)
    with pytest.warns(FutureWarning, match="vllm_importance_sampling_cap"):
        capped = GRPOConfig(max_steps=1, vllm_importance_sampling_cap=2.5)
    assert capped.to_dash_config().sampler_is_clip_max == 2.5
    with pytest.raises(ConfigError, match="must be less than"):
        GRPOConfig(max_steps=1, vllm_importance_sampling_clip_min=3.0)
    with pytest.raises(ConfigError, match="at least one of"):
        GRPOConfig(max_steps=1, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None)
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode"):
        GRPOConfig(max_steps=1, vllm_importance_sampling_mode="tokens")
    with pytest.raises(ConfigError, match="VESPO"):
        GRPOConfig(max_steps=1, loss_type="vespo", use_vllm=True)
    assert GRPOConfig(max_steps=1, loss_type="vespo").to_dash_config().sampler_is_correction is False


# ----------------------------------------------------------------------------- the learner


def test_fp32_embedded_run_has_no_correction_and_bf16_run_has_it(tmp_path, capsys):
    fp32 = make_trainer(tmp_path / "fp32")
    assert not fp32.learner.sampler_is
    assert "sampler importance sampling" not in capsys.readouterr().out
    record = fp32.train_step(1)
    assert IS_RATIO_MEAN not in record
    bf16 = make_trainer(tmp_path / "bf16", dtype=torch.bfloat16)
    assert bf16.learner.sampler_is
    assert "dash-fast: sampler importance sampling: token_truncate, ratio bounds [None, 3.0]" in capsys.readouterr().out
    record = bf16.train_step(1)
    assert record["no_signal"] == 0
    lo, mean, hi = record[IS_RATIO_MIN], record[IS_RATIO_MEAN], record[IS_RATIO_MAX]
    assert 0 < lo <= mean <= hi <= 3.0  # ratios near 1 (bf16 rounding), capped at 3


@pytest.mark.parametrize("mode, K", [("token_truncate", 1), ("token_mask", 2), ("sequence_truncate", 1)])
def test_step_record_reports_the_ratios_the_loss_applied(tmp_path, mode, K):
    """Sampler log-probs shifted by +SHIFT on every token: r = exp(-SHIFT) per token (exp(-SHIFT x length) per
    row, clipped at 0.5 here), measured from the loss forward (K = 1) or the old pass (K = 2)."""
    shift = 0.3
    trainer = make_trainer(tmp_path, sampler_is_correction=True, sampler_is_mode=mode, sampler_is_clip_min=0.5,
                           updates_per_rollout=K, rollout_engine=shifted_sampler(shift))
    record = trainer.train_step(1)
    assert record[LOGP_DIFF_MEAN] == pytest.approx(shift, abs=1e-4)
    if mode.startswith("token"):
        want = math.exp(-shift)
        assert (record[IS_RATIO_MIN], record[IS_RATIO_MEAN], record[IS_RATIO_MAX]) == pytest.approx((want,) * 3,
                                                                                                   rel=1e-3)
    else:  # completions of 2+ tokens: exp(-0.6) and below, truncated at 0.5
        assert record[IS_RATIO_MIN] == 0.5 and record[IS_RATIO_MAX] <= math.exp(-shift) + 1e-4


# ----------------------------------------------------------------------------- GRPOTrainer vs TRL


def _reward(completions, **kw):
    return [float(len(c) + sum(map(ord, c)) % 5) for c in completions]


def _dash_one_batch(tmp_path, noise, ref_noise=0.0, **extra):
    """One GRPOTrainer step at learning rate 0 (its gradient kept at the step, unclipped) on a rollout whose
    sampler log-probs are the trainer's plus per-token noise (`ref_noise`: the reference model's weights
    perturbed, so that the KL and its gradient are not 0); returns (trainer, initial model, rollout, rewards,
    gradients)."""
    from datasets import Dataset

    from dash_fast import GRPOTrainer
    from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    initial = copy.deepcopy(model)
    rewards = []

    def reward(completions, **kw):
        out = _reward(completions)
        rewards.extend(out)
        return out

    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                max_steps=1, learning_rate=0.0, max_grad_norm=0.0, report_to="none", disable_tqdm=True,
                logging_steps=1, seed=0, filter_tau=None, **extra)
    captured = []
    g = torch.Generator().manual_seed(1)

    def noisy(out):
        out.sampling_logps = out.sampling_logps + noise * torch.randn(out.sampling_logps.shape, generator=g) \
            * out.completion_mask
        captured.append(out)
        return out

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**args),
                          train_dataset=Dataset.from_list([{"prompt": f"{i}+1="} for i in range(6)]),
                          processing_class=tok, rollout_engine=EditedEngine.around(noisy))
    if ref_noise:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in trainer.learner.ref_model.parameters():
                p.add_(ref_noise * torch.randn(p.shape, generator=gen))
    grads = keep_grads(trainer)  # the last optimizer step's (the learner frees them after it)
    trainer.train()
    (rollout,) = captured
    return trainer, initial, rollout, torch.tensor(rewards), grads


def _logp_rows(model, rollout):
    """[B, T] log-probs of the completions under `model` (TRL's forward: the logits at the completion
    positions, temperature 1), right padded with 0."""
    lengths = rollout.completion_lengths.tolist()
    width = max(lengths)
    rows = []
    for p, comp, n in zip(rollout.prompt_ids, rollout.completion_ids, lengths):
        ids = torch.tensor([list(p) + comp[:n].tolist()])
        logits = model(input_ids=ids).logits[0, len(p) - 1: len(p) - 1 + n]
        lp = torch.log_softmax(logits.float(), -1).gather(1, comp[:n, None]).squeeze(1)
        rows.append(torch.cat([lp, lp.new_zeros(width - n)]))
    return torch.stack(rows)


def _trl_side(initial, rollout, rewards, group, mode, lo, hi, beta, loss_type, level, bias_correction,
              ref_model=None, use_vllm=True):
    """TRL's tensors for the same batch: per-token log-probs of the initial policy, old = the same values
    detached (TRL computes them with vLLM on), TRL's advantages and ratio, then TRL's _compute_loss and its
    gradient. `use_vllm=False`: TRL without the correction."""
    logp = _logp_rows(initial, rollout)
    width = logp.shape[1]
    mask = (torch.arange(width)[None] < rollout.completion_lengths[:, None]).float()
    old = logp.detach() * mask
    with torch.no_grad():
        ref = old if ref_model is None else _logp_rows(ref_model, rollout) * mask
    sampling = rollout.sampling_logps[:, :width].float()
    is_ratio = trl_ratio_rows(old, sampling, mask, mode, lo, hi)
    grouped = rewards.view(-1, group)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    loss, metrics = trl_compute_loss(logp, mask, adv, old, ref, is_ratio, beta=beta, loss_type=loss_type,
                                     bias_correction=bias_correction, level=level, use_vllm=use_vllm)
    loss.backward()
    flat = is_ratio.flatten() if is_ratio.shape[1] == 1 else is_ratio[mask.bool()]
    return float(loss.detach()), {n: p.grad for n, p in initial.named_parameters()}, flat


CASES = {  # name: GRPOConfig extras, the vLLM IS mode and bounds
    "dapo_token_truncate": (dict(loss_type="dapo"), "token_truncate", None, 1.1),
    "dapo_token_mask_K2": (dict(loss_type="dapo", num_iterations=2), "token_mask", 0.8, 1.25),
    "grpo_sequence_mask_kl": (dict(loss_type="grpo", beta=0.04), "sequence_mask", 0.5, 2.0),
    "gspo_sequence_truncate": (dict(loss_type="grpo", importance_sampling_level="sequence"), "sequence_truncate",
                               0.6, 1.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_grpo_trainer_matches_trls_compute_loss_on_one_batch(tmp_path, name):
    """dash-fast's GRPOTrainer with TRL's vllm_importance_sampling_* keys (switched on for this fp32 embedded
    run with extra={"sampler_is_correction": True}) gives TRL's loss and gradient, and TRL's ratio metrics,
    on one batch whose sampler log-probs differ from the trainer's by N(0, 0.3) per token."""
    extra, mode, lo, hi = CASES[name]
    trainer, initial, rollout, rewards, got = _dash_one_batch(
        tmp_path, 0.3, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo,
        vllm_importance_sampling_clip_max=hi, extra={"sampler_is_correction": True}, **extra)
    (record,) = trainer.step_records
    assert trainer.learner.sampler_is
    loss, grads, ratios = _trl_side(initial, rollout, rewards, 4, mode, lo, hi, extra.get("beta", 0.0),
                                    extra["loss_type"], extra.get("importance_sampling_level", "token"),
                                    bias_correction=True)
    assert record["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert norm > 0
    for n, g in grads.items():
        torch.testing.assert_close(got[n], g, atol=2e-5 * norm, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")
    # TRL's metrics over the batch's rows (the filter is off: every row is kept)
    assert record[IS_RATIO_MIN] == pytest.approx(float(ratios.min()), rel=1e-4, abs=1e-6)
    assert record[IS_RATIO_MEAN] == pytest.approx(float(ratios.mean()), rel=1e-4)
    assert record[IS_RATIO_MAX] == pytest.approx(float(ratios.max()), rel=1e-4)
    # the case is one where the correction matters: the ratios are not all 1 and some hit a bound
    assert float((ratios - 1).abs().max()) > 0.05
    hit = (ratios == 0) if mode.endswith("mask") else ((ratios == hi) | (ratios == (lo or -1)))
    assert bool(hit.any())


KL_CASES = {  # name: GRPOConfig extras, sampler correction on
    "bias_corrected_kl_with_is": (dict(loss_type="dapo", beta=0.1), True),  # TRL's default KL
    "bias_corrected_kl_grpo_no_is": (dict(loss_type="grpo", beta=0.2), False),
    "plain_k3": (dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=False), True),
}


@pytest.mark.parametrize("name", list(KL_CASES))
def test_trls_default_kl_trains_on_the_fused_kernels_and_matches_trl(tmp_path, name):
    """beta > 0 with TRL's use_bias_correction_kl=True no longer takes losses.py's materialised-logits path:
    the fused kernels compute it (the registry loss is "fused"), and the loss and gradient are TRL's _compute_loss's on
    one batch whose reference model differs from the policy (so the KL and its gradient are not 0)."""
    extra, on = KL_CASES[name]
    mode, lo, hi = "token_truncate", None, 1.1
    trainer, initial, rollout, rewards, got = _dash_one_batch(
        tmp_path, 0.3, ref_noise=0.05, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=hi,
        extra={"sampler_is_correction": on}, **extra)
    assert trainer.learner.loss_name == "fused" and trainer.config.loss_impl == "fused"
    assert trainer.config.kl_bias_correction == extra.get("use_bias_correction_kl", True)
    (record,) = trainer.step_records
    loss, grads, _ = _trl_side(initial, rollout, rewards, 4, mode, lo, hi, extra["beta"], extra["loss_type"],
                               "token", extra.get("use_bias_correction_kl", True),
                               ref_model=trainer.learner.ref_model, use_vllm=on)
    assert record["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
    assert record["kl"] > 1e-3  # the reference differs: the KL term is in play
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    for n, _ in trainer.model.named_parameters():
        torch.testing.assert_close(got[n], grads[n], atol=2e-5 * norm, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")
