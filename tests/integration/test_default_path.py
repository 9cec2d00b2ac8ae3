"""The default configuration end to end (loss_impl=fused, the default): every trainer feature that makes
tokens clip or adds a KL term runs whole steps through `train()` and writes plain-number records.
(The naive-loss comparisons live in test_trainer / test_overlap / test_refill / test_distributed.)"""

import pytest
import torch
from helpers import TINY_TASK as TINY
from plain_json import assert_plain_numbers, read_jsonl

from dash_fast import DashConfig, DashTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer, make_task


def half_constant_reward(prompts, completions, **columns):
    """Varies within a group for about two prompts in three, constant for the rest: the filter drops some groups."""
    return [0.0 if sum(map(ord, p)) % 3 == 0 else float(len(set(c))) for p, c in zip(prompts, completions)]


def run(tmp_path, steps: int = 2, **overrides) -> DashTrainer:
    assert DashConfig().loss_impl == "fused"  # the default path is the one tested here
    tok = build_tokenizer()
    model = build_model(tok, TINY, seed=0)
    train, test = make_task(TINY, seed=0)
    args = dict(output_dir=str(tmp_path), max_steps=steps, prompts_per_step=4, group_size=4,
                max_completion_tokens=8, max_prompt_tokens=16, report_to=[], disable_tqdm=True,
                learning_rate=3e-2, eval_examples=4, filter_tau=0.1)
    args.update(overrides)
    trainer = DashTrainer(model, half_constant_reward, args=DashConfig(**args), train_dataset=train,
                          eval_dataset=test, processing_class=tok)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in trainer.state.log_history:
        assert_plain_numbers(record)
    return trainer


@pytest.mark.parametrize("overrides, clips", [
    (dict(beta=0.04), False),
    (dict(updates_per_rollout=2), True),
    (dict(minibatches=2), True),
    (dict(minibatches=3), True),  # 3 does not divide the kept rows
    # step 2 trains on rows sampled before step 1's update: off-policy. Without sampler importance sampling the
    # stale sampler is the old policy (the clip acts); with it (the default) the trainer's weights are, and the
    # truncated ratio corrects the staleness (K = 1: ratio 1, no clip)
    (dict(overlap=True, sampler_is_correction=False), True),
    (dict(overlap=True), False),
    (dict(refill=True), False),
    (dict(beta=0.04, updates_per_rollout=2, minibatches=2, overlap=True, refill=True), True),
], ids=["beta", "K2", "M2", "M3", "overlap", "overlap_is", "refill", "all"])
def test_fused_default_trains_and_records_plain_numbers(tmp_path, overrides, clips):
    trainer = run(tmp_path, **overrides)
    last = trainer.state.log_history[-1]
    if clips:  # the statistics that crashed metrics.jsonl as 0-d tensors were really non-zero here
        assert any(r["clip_fraction"] > 0 for r in trainer.state.log_history)
    if overrides.get("beta"):
        assert last["kl"] > 0
    if overrides.get("refill"):
        assert "refill_rounds" in last
    M, K = overrides.get("minibatches", 1), overrides.get("updates_per_rollout", 1)
    assert trainer.scheduler.last_epoch == 2 * K * M  # the LR schedule counts max_steps * K * M updates
    if overrides.get("overlap"):
        assert last["rollout_lag"] == trainer.state.log_history[0]["optimizer_steps"]  # sampled before step 1's
        if overrides.get("sampler_is_correction") is None:
            assert last["sampling/importance_sampling_ratio/mean"] != 1.0  # the stale sampler differs


def constant_reward(prompts, completions, **columns):
    return [1.0] * len(completions)


def test_a_step_without_signal_skips_forward_backward_optimizer_and_scheduler(tmp_path):
    """Every group has one reward: all A = 0, the filter keeps only its fallback row (A = 0). The step does no
    forward or backward pass and no optimizer or scheduler step; its record says so."""
    tok = build_tokenizer()
    train, _ = make_task(TINY, seed=0)
    args = DashConfig(output_dir=str(tmp_path), max_steps=2, prompts_per_step=4, group_size=4,
                      max_completion_tokens=8, report_to=[], disable_tqdm=True, lr_scheduler_type="linear",
                      learning_rate=1e-2)
    trainer = DashTrainer(build_model(tok, TINY, seed=0), constant_reward, args=args, train_dataset=train,
                          processing_class=tok)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    lr = trainer.scheduler.get_last_lr()
    trainer.train()
    for record in trainer.state.log_history:
        assert record["no_signal"] == 1 and record["optimizer_steps"] == 0 and record["kept_fraction"] == 1 / 16
        assert_plain_numbers(record)
    assert trainer.learner.forward_passes == 0
    assert trainer.scheduler.get_last_lr() == lr and trainer.scheduler.last_epoch == 0
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert trainer.learner.weights_version == 0


def test_sampling_streams_are_distinct_across_seeds_steps_and_rows(tmp_path):
    """Each (seed, step, global row) keys its own stream. The old linear seed (seed * 1_000_003 + step + row)
    gave rank 1's rows of step 1 (row offset 1) the very stream of rank 0's rows at step 2."""
    from dash_fast.collect import stream_seed

    keys = [(s, t, r) for s in range(3) for t in range(60) for r in range(0, 256, 4)]
    assert len({stream_seed(*k) for k in keys}) == len(keys)
    tok = build_tokenizer()
    train, _ = make_task(TINY, seed=0)
    trainer = DashTrainer(build_model(tok, TINY, seed=0), constant_reward, processing_class=tok, train_dataset=train,
                          args=DashConfig(output_dir=str(tmp_path), report_to=[], max_completion_tokens=12,
                                          temperature=1.5, top_k=0))
    prompts = [trainer.train_data.prompt_ids[0]] * 4
    a = trainer.collector.generate(prompts, step=2, row_offset=0)
    b = trainer.collector.generate(prompts, step=1, row_offset=1)
    again = trainer.collector.generate(prompts, step=2, row_offset=0)
    assert torch.equal(a.completion_ids, again.completion_ids)  # a function of its key: reproducible
    assert not torch.equal(a.completion_ids, b.completion_ids)
