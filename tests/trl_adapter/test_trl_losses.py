"""TRL 1.16's loss variants (trl_losses.py) against a direct, row-by-row re-derivation of the formulas in
trl/trainer/grpo_trainer.py (GRPOTrainer._compute_loss, get_gamma_weights), values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from dash_fast.losses import TrlLoss, trl_token_loss, variant_micro_loss

LENGTHS = [5, 3, 1, 4]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    R, T = len(LENGTHS), max(LENGTHS)
    mask = torch.zeros(R, T)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    logp = (-torch.rand(R, T, generator=g, dtype=torch.float64) * 2) * mask
    old = (logp + 0.4 * torch.randn(R, T, generator=g, dtype=torch.float64)) * mask
    ref = (logp + 0.3 * torch.randn(R, T, generator=g, dtype=torch.float64)) * mask
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)
    ent = torch.rand(R, T, generator=g, dtype=torch.float64) * mask
    return logp, old, ref, adv, mask.double(), ent


def _expected_row(spec: TrlLoss, lp, old, ref, a, ent_keep, opm):
    """One row's per-token loss, written from TRL's source line by line, with python scalars for the row
    quantities (so it shares no broadcasting with the code under test)."""
    n = lp.numel()
    log_ratio = lp - old
    if spec.importance_sampling_level == "sequence":
        coef_1 = torch.exp(log_ratio.sum() / n).expand(n)
    else:
        coef_1 = torch.exp(log_ratio)
    out = []
    for t in range(n):
        c1 = coef_1[t]
        if spec.loss_type == "cispo":
            loss = -min(c1.detach(), torch.tensor(spec.epsilon_high, dtype=c1.dtype)) * a * lp[t]
        elif spec.loss_type == "sapo":
            temp = spec.sapo_temperature_pos if a > 0 else spec.sapo_temperature_neg
            loss = -(torch.sigmoid(temp * (c1 - 1)) * 4 / temp) * a
        elif spec.loss_type == "vespo":
            with torch.no_grad():
                log_w = min(max(float(torch.clamp(log_ratio, -20, 20).sum()), math.log(1e-8)), 20.0)
                k, lam = (spec.vespo_k_pos, spec.vespo_lambda_pos) if a >= 0 else (spec.vespo_k_neg,
                                                                                    spec.vespo_lambda_neg)
                phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
            loss = -phi * a * lp[t]
        else:
            c2 = torch.clamp(c1, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
            if spec.delta is not None:
                c1 = torch.clamp(c1, max=spec.delta)
            loss = -torch.minimum(c1 * a, c2 * a)
        loss = loss * opm * ent_keep[t]
        if spec.beta:
            d = ref[t] - lp[t]
            kl = torch.exp(d) - d - 1
            if spec.use_bias_correction_kl:
                kl = kl * coef_1[t]
            loss = loss + spec.beta * kl
        out.append(loss)
    return torch.stack(out)


def _expected_loss(spec, logp, old, ref, adv, mask, ent):
    """TRL's aggregation for the loss type (grpo/sapo: seq-mean-token-mean, dapo/cispo/vespo: token sum /
    tokens, luspo: per-row sum mean), the entropy quantile over all real tokens, TRL's off-policy mask."""
    real = torch.cat([ent[i, :n] for i, n in enumerate(LENGTHS)])
    thr = torch.quantile(real, 1 - spec.top_entropy_quantile) if spec.top_entropy_quantile < 1 else -1.0
    rows = []
    for i, n in enumerate(LENGTHS):
        lp, o, r, e = logp[i, :n], old[i, :n], ref[i, :n], ent[i, :n]
        opm = 1.0
        if spec.off_policy_mask_threshold is not None:
            mean_kl = float((o - lp.detach()).sum() / n)
            opm = 1.0 if (adv[i] >= 0 or mean_kl <= spec.off_policy_mask_threshold) else 0.0
        rows.append(_expected_row(spec, lp, o, r, float(adv[i]), (e >= thr).double(), opm))
    if spec.loss_type in ("grpo", "sapo"):
        return torch.stack([x.mean() for x in rows]).mean()
    if spec.loss_type == "luspo":
        return torch.stack([x.sum() for x in rows]).mean()
    return torch.cat(rows).sum() / sum(LENGTHS)


def _dash_weights(spec, mask):
    if spec.loss_type in ("grpo", "sapo"):
        return mask / mask.sum(1, keepdim=True) / mask.shape[0]
    if spec.loss_type == "luspo":
        return mask / mask.shape[0]
    return mask / mask.sum()


CASES = {
    "bias_correction_kl": TrlLoss(beta=0.1, use_bias_correction_kl=True),
    "delta": TrlLoss(delta=1.1, epsilon_high=0.05),
    "gspo": TrlLoss(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4),
    "gspo_dapo_kl": TrlLoss(importance_sampling_level="sequence", beta=0.05, use_bias_correction_kl=True),
    "cispo": TrlLoss(loss_type="cispo", epsilon_high=1.1),
    "sapo": TrlLoss(loss_type="sapo"),
    "luspo": TrlLoss(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": TrlLoss(loss_type="vespo"),
    "entropy": TrlLoss(top_entropy_quantile=0.4),
    "off_policy": TrlLoss(off_policy_mask_threshold=0.05),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_trl_formula(name):
    spec = CASES[name]
    logp, old, ref, adv, mask, ent = _inputs()
    lp1 = logp.clone().requires_grad_()
    per_token, _ = trl_token_loss(spec, lp1, old, ref, adv, mask, ent)
    got = (per_token * _dash_weights(spec, mask)).sum()
    lp2 = logp.clone().requires_grad_()
    want = _expected_loss(spec, lp2, old, ref, adv, mask, ent)
    got.backward()
    want.backward()
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (float(got), float(want))
    assert torch.allclose(lp1.grad * mask, lp2.grad * mask, rtol=1e-9, atol=1e-12)
    assert lp1.grad.abs().sum() > 0


def test_gspo_gradient_closed_form():
    """GSPO, unclipped: d(-w A)/d logp_t = -w A / |y| on every token of the row (w the sequence ratio)."""
    spec = TrlLoss(importance_sampling_level="sequence", epsilon_low=10.0, epsilon_high=10.0)
    logp, old, ref, adv, mask, _ = _inputs(1)
    lp = logp.clone().requires_grad_()
    per_token, _ = trl_token_loss(spec, lp, old, None, adv, mask)
    (per_token * mask).sum().backward()
    n = mask.sum(1, keepdim=True)
    w = torch.exp(((logp - old) * mask).sum(1, keepdim=True) / n)
    # every token of a row carries the row's loss, so the row's gradient is |y| x (-w A / |y|) = -w A
    assert torch.allclose(lp.grad, (-w * adv[:, None]) * mask, rtol=1e-10)


def test_off_policy_mask_drops_negative_far_rows():
    spec = TrlLoss(off_policy_mask_threshold=0.05)
    logp, _, _, adv, mask, _ = _inputs()
    old = logp + 1.0 * mask  # mean KL(old || policy) = 1 on every row
    per_token, _ = trl_token_loss(spec, logp, old, None, adv, mask)
    kept_rows = (per_token * mask).abs().sum(1) > 0
    assert kept_rows.tolist() == [a >= 0 for a in adv.tolist()]


def test_variant_path_equals_kernels_when_nothing_changes():
    """The TRL path with a no-op variant (delta far above any ratio) is the default path's loss and gradient:
    the aggregation through DASH's token weights is the same."""
    from dash_kernels import pg_loss_ref

    g = torch.Generator().manual_seed(3)
    lengths = [4, 2, 3]
    N, H, V = sum(lengths), 8, 11
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    adv = torch.cat([torch.full((n,), a) for n, a in zip(lengths, [0.9, -1.2, 0.5])]).double()
    tw = torch.rand(N, generator=g, dtype=torch.float64)
    old = -torch.rand(N, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(N, generator=g, dtype=torch.float64) * 3
    want, _ = pg_loss_ref(hidden, weight, None, targets, adv, tw, old, ref, beta=0.04)
    gw = torch.autograd.grad(want, (hidden, weight))
    got, _ = variant_micro_loss(TrlLoss(delta=1e9, beta=0.04), hidden, weight, None, targets, lengths, adv, tw,
                                old, ref)
    gg = torch.autograd.grad(got, (hidden, weight))
    assert torch.allclose(got, want, rtol=1e-10)
    for a, b in zip(gg, gw):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_plain_grpo_is_not_a_variant():
    assert not TrlLoss().is_variant()
    assert not TrlLoss(beta=0.1, use_bias_correction_kl=False).is_variant()
    assert not TrlLoss(beta=0.1, use_bias_correction_kl=True).is_variant()  # TRL's default: the fused kernels'
    assert TrlLoss(beta=0.1, use_bias_correction_kl=True, kernel_kl_correction=False).is_variant()  # Liger
    assert TrlLoss(beta=0.1, use_bias_correction_kl=True, importance_sampling_level="sequence").is_variant()


def test_luspo_through_dr_grpo_weights_is_per_row_sum_mean():
    """luspo trains with dr_grpo's weights (mask / (rows x L)); luspo_scale=L makes that TRL's per-row sum
    mean: (per_token * mask).sum(-1).mean()."""
    g = torch.Generator().manual_seed(5)
    lengths, L = [4, 2, 3], 6
    N, H, V = sum(lengths), 8, 11
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    adv = torch.cat([torch.full((n,), a) for n, a in zip(lengths, [0.9, -1.2, 0.5])]).double()
    old = -torch.rand(N, generator=g, dtype=torch.float64) * 3
    spec = TrlLoss(loss_type="luspo", importance_sampling_level="sequence", luspo_scale=float(L))
    tw = torch.full((N,), 1.0 / (len(lengths) * L), dtype=torch.float64)
    got, _ = variant_micro_loss(spec, hidden, weight, None, targets, lengths, adv, tw, old, None)
    logp = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)
    rows = []
    for lp, o, a in zip(torch.split(logp, lengths), torch.split(old, lengths), [0.9, -1.2, 0.5]):
        w = torch.exp((lp - o).mean())
        rows.append(-torch.minimum(w * a, torch.clamp(w, 0.8, 1.2) * a) * len(lp))
    want = torch.stack(rows).mean()
    assert torch.allclose(got, want, rtol=1e-6), (float(got), float(want))  # logprobs_ref: fp32 logits


def _varied_reward(completions, **kw):
    """Differs between completions of one length too: an untrained model's completions often all reach
    max_completion_length, and a length reward would then give a step with no signal (no update)."""
    return [float(len(c) + sum(map(ord, c)) % 5) for c in completions]


def _train(tmp_path, reward=_varied_reward, **extra):
    """A tiny GRPOTrainer run (as test_trl_features.make_trainer) with TRL arguments `extra`."""
    from datasets import Dataset

    from dash_fast import GRPOConfig, GRPOTrainer
    from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer

    callbacks, resume = extra.pop("callbacks", None), extra.pop("resume_from_checkpoint", None)
    torch.manual_seed(0)
    tok = build_tokenizer()
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                max_steps=2, learning_rate=1e-2, report_to="none", disable_tqdm=True, logging_steps=1, seed=0)
    args.update(extra)
    model = build_model(tok, TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    trainer = GRPOTrainer(model=model, reward_funcs=reward,
                          args=GRPOConfig(**args), train_dataset=Dataset.from_list([{"prompt": f"{i}+1="}
                                                                                    for i in range(6)]),
                          processing_class=tok, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


VARYING = dict(loss_type="grpo", max_completion_length=8, micro_batch_tokens=40)  # lengths 2..8, 3-row micros


@pytest.mark.parametrize("args, variant", [(dict(), dict(delta=1e9)), (VARYING, dict(delta=1e9)),
                                           (VARYING, dict(importance_sampling_level="sequence"))])
def test_trainer_variant_path_matches_default_path_where_they_agree(tmp_path, args, variant):
    """GRPOTrainer on trl_losses' path gives the default fused kernels' loss and gradient norm (same seed,
    one step; Adam magnifies rounding of near-zero gradients, so weights are not compared) where the
    formulas agree: delta far above any ratio, and on-policy GSPO with loss_type="grpo" (the sequence
    ratio is 1 and d/dlogp_t of it is 1/|y|, so the per-row mean makes it token-level GRPO's gradient;
    this needs the call site's rows and lengths right)."""
    plain = _train(tmp_path / "a", max_steps=1, **args)
    other = _train(tmp_path / "b", max_steps=1, **variant, **args)
    assert plain.learner.loss_name == "fused" and other.learner.loss_name == "variant"
    (p,), (v,) = plain.step_records, other.step_records
    assert p["grad_norm"] > 0 and v["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-5)
    assert v["loss"] == pytest.approx(p["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("args", [dict(importance_sampling_level="sequence", loss_type="grpo"),
                                  dict(beta=0.1, delta=10.0), dict(loss_type="vespo", top_entropy_quantile=0.5,
                                                                   off_policy_mask_threshold=0.1)])
def test_trainer_trains_with_trl_variants(tmp_path, args):
    init = _train(tmp_path / "init", max_steps=1, learning_rate=0.0)
    trainer = _train(tmp_path / "run", **args)
    assert trainer.learner.loss_name == "variant"
    losses = [r["loss"] for r in trainer.step_records]
    assert all(math.isfinite(x) for x in losses)
    changed = [not torch.equal(p, q) for p, q in zip(init.model.parameters(), trainer.model.parameters())]
    assert any(changed)


def test_loss_warnings_name_the_length_weighting():
    from dash_fast.trl.trainer import loss_warnings

    assert loss_warnings("grpo", "sequence") == [] and loss_warnings("dapo", "token") == []
    for lt in ("bnpo", "dr_grpo", "dapo", "cispo"):
        (w,) = loss_warnings(lt, "sequence")
        assert "weights each sequence by its completion length" in w and repr(lt) in w
    assert "'sequence'" in loss_warnings("luspo", "token")[0] and "'token'" in loss_warnings("vespo", "sequence")[0]


def test_entropy_bonus_term_and_adaptive_controller():
    from dash_fast.losses import EntropyBonus

    ent = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    bonus = EntropyBonus(0.5)
    term = bonus.term(ent, mask, step_tokens=6)  # this micro-batch holds 3 of the step's 6 tokens
    assert float(term) == pytest.approx(0.5 * 6.0 / 6)
    term.backward()
    assert torch.equal(ent.grad, 0.5 * mask / 6)
    assert bonus.contribution == pytest.approx(0.5)
    ada = EntropyBonus(0.01, adaptive=True, target=1.5, delta=0.1, coef_max=0.15)
    assert float(ada.term(ent.detach(), mask, 3)) == 0.0  # gated off until a step's entropy is <= target
    ada.end_step()  # step entropy 2.0 > 1.5: coef down (clamped at coef_min 0)
    assert (ada.coef, ada.last_entropy) == (0.0, 2.0)
    ada.term(ent.detach() * 0.5, mask, 3)
    ada.end_step()  # 1.0 <= 1.5: up by delta
    ada.term(ent.detach() * 0.5, mask, 3)
    ada.end_step()  # up again, clamped at coef_max
    assert ada.coef == pytest.approx(0.15) and ada.last_entropy == 1.0
    assert float(ada.term(ent.detach(), mask, 3)) == pytest.approx(0.15 * 2.0)


def test_trainer_entropy_bonus_is_coef_times_logged_entropy(tmp_path):
    """TRL's contract (its test_entropy_bonus_scale): policy_loss - loss = entropy_coef x entropy."""
    trainer = _train(tmp_path, entropy_coef=0.5, max_completion_length=8)
    for r in trainer.step_records:
        assert r["entropy"] > 0 and r["entropy_coef"] == 0.5
        assert r["policy_loss"] - r["loss"] == pytest.approx(0.5 * r["entropy"], rel=1e-4)
    ada = _train(tmp_path / "ada", entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=100.0,
                 max_steps=3)
    assert ada.entropy_coef == pytest.approx(0.01 + 0.005 * 3)  # one increment per optimizer step


def test_adaptive_entropy_coefficient_is_checkpointed_and_resumed_exactly(tmp_path):
    """The controller's state (coef, the last step's entropy that gates it) is in the checkpoint: 2 steps, stop,
    resume 2 more == 4 steps straight, bit-identical on CPU. (Restarted at entropy_coef with the gate closed, the
    resumed steps would train with another coefficient.)"""
    class StopAtTwo:
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 2

    extra = dict(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=100.0, entropy_coef_delta=0.05,
                 max_steps=4, save_steps=1, max_completion_length=8)
    straight = _train(tmp_path / "a", **extra)
    cut = _train(tmp_path / "b", callbacks=[StopAtTwo()], **extra)
    assert cut.state.global_step == 2 and cut.entropy_coef == pytest.approx(0.01 + 2 * 0.05)
    resumed = _train(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"), **extra)
    assert resumed.entropy_coef == straight.entropy_coef == pytest.approx(0.01 + 4 * 0.05)
    assert [r["entropy_coef"] for r in resumed.step_records] == [r["entropy_coef"] for r in straight.step_records]
    assert [r["policy_loss"] for r in resumed.step_records] == [r["policy_loss"] for r in straight.step_records]
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_variant_loss_subtracts_the_bonus_with_gradient():
    from dash_kernels import logprobs_ref

    from dash_fast.losses import EntropyBonus

    g = torch.Generator().manual_seed(7)
    lengths = [3, 2]
    N, H, V = 5, 6, 9
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    adv, tw = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0]), torch.full((N,), 0.2)
    base, _ = variant_micro_loss(TrlLoss(), hidden, weight, None, targets, lengths, adv, tw, None, None)
    with_bonus, _ = variant_micro_loss(TrlLoss(entropy_bonus=True), hidden, weight, None, targets, lengths, adv, tw,
                                       None, None, bonus=EntropyBonus(0.3), step_tokens=10)
    _, ent = logprobs_ref(hidden, weight, None, targets, return_entropy=True)
    expected = base - 0.3 * ent.sum() / 10
    assert torch.allclose(with_bonus, expected)
    g1 = torch.autograd.grad(with_bonus, hidden, retain_graph=True)[0]
    g2 = torch.autograd.grad(expected, hidden, retain_graph=True)[0]
    assert torch.allclose(g1, g2, atol=1e-6) and not torch.allclose(g1, torch.autograd.grad(base, hidden)[0])


def test_cross_check_with_installed_trl_static_helpers():
    """TRL's own static helpers (cheap to call) give the same VESPO weights and off-policy mask."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from dash_fast.losses import vespo_gamma_weights

    logp, old, _, adv, mask, _ = _inputs(2)
    a = adv[:, None]
    want = trl_grpo.GRPOTrainer.get_gamma_weights(a, logp - old, mask, None, 2.0, 3.0, 3.0, 2.0)
    assert torch.allclose(vespo_gamma_weights(a, logp - old, mask, 2.0, 3.0, 3.0, 2.0), want, rtol=1e-12)
    far = logp + torch.tensor([[0.01], [1.0], [1.0], [0.01]], dtype=logp.dtype) * mask
    keep = trl_grpo.GRPOTrainer.get_off_policy_mask(a, logp, far, mask, 0.05)
    per_token, _ = trl_token_loss(TrlLoss(off_policy_mask_threshold=0.05), logp, far, None, adv, mask)
    assert keep.view(-1).tolist() == [1.0, 0.0, 1.0, 1.0]  # row 1: negative advantage, mean KL 1 > 0.05
    assert ((per_token * mask).abs().sum(1) > 0).tolist() == keep.view(-1).bool().tolist()


def test_entropy_bonus_updates_even_when_no_row_has_an_advantage(tmp_path):
    """A constant reward gives A = 0 on every row, but the entropy bonus still has a gradient: the step is not
    the no-signal shortcut (no forward/backward), it trains (as TRL's loss = policy_loss - coef x entropy)."""
    def constant(completions, **kw):
        return [1.0] * len(completions)

    init = _train(tmp_path / "init", reward=constant, max_steps=1, learning_rate=0.0)
    trainer = _train(tmp_path / "run", reward=constant, entropy_coef=0.5, max_steps=1)
    (r,) = trainer.step_records
    assert r["no_signal"] == 0 and r["entropy"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(init.model.parameters(), trainer.model.parameters()))
