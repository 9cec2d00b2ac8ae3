"""The trainer's update against the algorithm's promises: global normaliser, filtering
invariance, sampler/trainer log-prob agreement, and no old-logprob pass when K = 1 on-policy."""

import pytest
import torch
from helpers import assert_same_grads, grads_of_update, rollout_for
from helpers import make_float64_trainer as make_trainer

from dash_fast import algo


@pytest.mark.parametrize("loss_impl", ["naive", "fused"])  # fused: the head's gradient added into its .grad
@pytest.mark.parametrize("train_forward", ["shared_prompt", "hf"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "dr_grpo"])
def test_gradient_accumulation_equals_one_batch(tmp_path, loss_agg, train_forward, loss_impl):
    one_batch = make_trainer(tmp_path / "one", loss_agg=loss_agg, train_forward=train_forward, frozen=True,
                             micro_batch_tokens=10**6, loss_impl=loss_impl)
    rollout = rollout_for(one_batch)
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept = torch.arange(len(rollout))
    one = grads_of_update(one_batch, rollout, advantages, kept)
    # a few rows per micro-batch (a group's rows split across several); the same initial weights
    trainer = make_trainer(tmp_path / "many", loss_agg=loss_agg, train_forward=train_forward, frozen=True,
                           micro_batch_tokens=20, loss_impl=loss_impl)
    assert len(trainer.learner.micro_batches(rollout, list(range(len(rollout))))) >= 4
    many = grads_of_update(trainer, rollout, advantages, kept)
    assert_same_grads(one, many, rtol=1e-9, atol=1e-12)


def test_normalize_over_all_dropping_zero_advantage_rows_leaves_gradient_unchanged(tmp_path):
    trainer = make_trainer(tmp_path, normalize_over="all", loss_agg="token-mean", frozen=True,
                           micro_batch_tokens=10**6)
    rollout = rollout_for(trainer)
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    advantages[::3] = 0.0  # rows carrying no signal
    everything = grads_of_update(trainer, rollout, advantages, torch.arange(len(rollout)))
    filtered = grads_of_update(trainer, rollout, advantages, algo.filter_rows(advantages, 0.0))
    assert algo.filter_rows(advantages, 0.0).numel() < len(rollout)
    assert_same_grads(everything, filtered, rtol=1e-9, atol=1e-12)


def test_normalize_over_kept_does_change_the_scale(tmp_path):
    """The control for the test above: with 'kept' the same filtering rescales the gradient."""
    trainer = make_trainer(tmp_path, normalize_over="kept", loss_agg="dr_grpo", frozen=True)
    rollout = rollout_for(trainer)
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    advantages[::3] = 0.0
    kept = algo.filter_rows(advantages, 0.0)
    everything = grads_of_update(trainer, rollout, advantages, torch.arange(len(rollout)))
    filtered = grads_of_update(trainer, rollout, advantages, kept)
    name = next(iter(everything))
    ratio = (filtered[name].norm() / everything[name].norm()).item()
    assert ratio == pytest.approx(len(rollout) / kept.numel(), rel=1e-6)


def test_sampler_logprobs_match_trainer_logprobs(tmp_path):
    trainer = make_trainer(tmp_path, dtype=torch.float32, temperature=0.7, top_k=5)
    rollout = rollout_for(trainer)
    rows = list(range(len(rollout)))
    recomputed = trainer.learner.logprob_pass(trainer.model, rollout, rows, "test")
    mask = rollout.completion_mask.bool()
    assert mask.sum() > 0
    torch.testing.assert_close(recomputed[mask], rollout.sampling_logps[mask], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K, M", [(1, 1), (2, 1), (1, 2)])
def test_old_logprob_pass_only_when_off_policy(tmp_path, K, M):
    trainer = make_trainer(tmp_path, updates_per_rollout=K, minibatches=M, micro_batch_tokens=10**6)
    rollout = rollout_for(trainer)
    advantages = torch.linspace(-1, 1, len(rollout), dtype=torch.float64)
    before = trainer.learner.forward_passes  # the learner's count of policy forwards over rollout rows
    trainer.update(rollout, advantages, torch.arange(len(rollout)))
    train_forwards = K * M  # one micro-batch per minibatch with this budget
    old_pass = 0 if (K, M) == (1, 1) else 1
    assert trainer.learner.forward_passes - before == train_forwards + old_pass


def test_filtered_rows_never_reach_a_forward_pass(tmp_path):
    trainer = make_trainer(tmp_path, micro_batch_tokens=10**6)
    rollout = rollout_for(trainer)
    seen = []
    original = trainer.learner.hidden_and_targets
    trainer.learner.hidden_and_targets = lambda model, r, rows: (seen.extend(rows), original(model, r, rows))[1]
    advantages = torch.zeros(len(rollout), dtype=torch.float64)
    advantages[[1, 6]] = torch.tensor([0.5, -0.7], dtype=torch.float64)
    trainer.update(rollout, advantages, algo.filter_rows(advantages, 0.1))
    assert sorted(seen) == [1, 6]


def length_reward(prompts, completions, **columns):
    """Varies within a group even for a random model, so the step has signal."""
    return [float(len(c)) for c in completions]


def test_train_step_reports_metrics_and_moves_toward_higher_reward(tmp_path):
    """One step on the default fused loss raises the log-probs of above-average completions against the
    below-average ones: sum_i A_i * (log p_after(y_i) - log p_before(y_i)) > 0. The first Adam step is
    -lr * sign(grad), a descent direction of the surrogate -sum A log p at ratio 1 (dr_grpo: the same weight
    for every token), so this holds for a small lr; a sign-flipped loss fails it."""
    trainer = make_trainer(tmp_path, dtype=torch.float32, reward=length_reward, loss_impl="fused",
                           learning_rate=1e-3)
    seen = {}
    collect = trainer.collector.collect

    def collect_and_score(step, version):
        batch = collect(step, version)
        rows = list(range(len(batch.rollout)))
        seen.update(batch=batch, rows=rows,
                    before=trainer.learner.logprob_pass(trainer.model, batch.rollout, rows, "test/before"))
        return batch

    trainer.collector.collect = collect_and_score
    before = [p.detach().clone() for p in trainer.model.parameters()]
    record = trainer.train_step(1)
    for key in ("step", "reward_mean", "reward_std", "accuracy", "kept_fraction", "clip_fraction", "kl",
                "entropy", "completion_len_mean", "time_generate_s", "time_train_s", "time_step_s",
                "tokens_per_s"):
        assert key in record, key
    assert record["kept_fraction"] == 1  # filter_tau=None: every row trains
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    batch, rows = seen["batch"], seen["rows"]
    after = trainer.learner.logprob_pass(trainer.model, batch.rollout, rows, "test/after")
    mask = batch.rollout.completion_mask.bool()
    delta = ((after - seen["before"]) * mask).sum(dim=1).double()
    advantages = algo.group_advantages(batch.rewards, trainer.args.group_size, trainer.args.scale_rewards).double()
    assert advantages.abs().sum() > 0
    assert float((advantages * delta).sum()) > 0




def test_adamw_is_fused_outside_fsdp2(tmp_path):
    """One pass over each parameter's weight, grad and moments (bench/results/roofline.md: 171 ms vs 943 ms for
    the default per-tensor loop at the 0.5B shape on CPU)."""
    trainer = make_trainer(tmp_path, dtype=torch.float32)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["fused"] is True


def test_later_micro_batches_hand_the_loss_the_heads_gradient(tmp_path, monkeypatch):
    """From the second micro-batch of an optimizer step on, the loss gets the head's existing .grad to add its
    gradient into (LossInputs.weight_grad); the first has none yet, and no-grad passes never get one."""
    from dash_fast.losses import LOSSES

    seen, fused = [], LOSSES["fused"]

    def recording(x, a, bonus):
        seen.append(x.weight_grad is not None and x.weight_grad is x.weight.grad)
        return fused(x, a, bonus)

    monkeypatch.setitem(LOSSES, "fused", recording)
    trainer = make_trainer(tmp_path, frozen=True, micro_batch_tokens=20, loss_impl="fused")
    rollout = rollout_for(trainer)
    n_micro = len(trainer.learner.micro_batches(rollout, list(range(len(rollout)))))
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads_of_update(trainer, rollout, advantages, torch.arange(len(rollout)))
    assert n_micro >= 2 and seen == [False] + [True] * (n_micro - 1)
