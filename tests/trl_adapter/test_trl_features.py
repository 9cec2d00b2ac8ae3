"""TRL drop-in features built in trl/trainer.py / trl/logs.py / models/peft.py: logs, normalize_then_sum,
sync_ref_model, LoRA, named eval sets. Tiny local models only."""

import json
import math
import os

import pytest
import torch
from datasets import Dataset
from helpers import TINY_MODEL as TINY
from helpers import completion_length
from helpers import make_grpo_trainer as make_trainer

from dash_fast import GRPOConfig, GRPOTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer
from dash_fast.engines.base import Rollout
from dash_fast.trl.logs import log_entries, rollout_metrics
from dash_fast.trl.trainer import normalize_then_sum


def test_log_entries_average_each_window_and_keep_the_rest_for_the_final_entry():
    recs = [{"step": s, "loss": float(s), "num_tokens": 10.0, "epoch": s / 10, "learning_rate": 1.0 - s / 10}
            for s in range(1, 6)]
    entries, pending = log_entries(recs, 2)
    assert [e["step"] for e in entries] == [2, 4]
    assert entries[0]["loss"] == 1.5 and entries[1]["loss"] == 3.5
    assert entries[1]["num_tokens"] == 40.0  # cumulative, as TRL logs it
    assert entries[1]["epoch"] == 0.4 and entries[1]["learning_rate"] == pytest.approx(0.6)  # at log time
    assert pending["loss"] == 5.0 and pending["num_tokens"] == 50.0 and "step" not in pending
    assert log_entries(recs[:4], 2)[1] == {}


def test_rollout_metrics_lengths_clipping_and_rewards():
    eos = 9
    ids = torch.tensor([[1, 2, eos, 0], [1, 2, 3, 4], [5, eos, 0, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    ro = Rollout(prompt_ids=[[7, 7]] * 4, completion_ids=ids, completion_mask=mask, sampling_logps=torch.zeros(4, 4))
    per_func = torch.tensor([[1.0, math.nan], [1.0, 2.0], [0.0, 4.0], [2.0, 6.0]])
    rewards = torch.tensor([1.0, 3.0, 4.0, 8.0])
    m = rollout_metrics([2] * 4, ro, rewards, per_func, ["a", "b"], group_size=2, stop_ids=(eos,), max_new=4)
    assert m["num_tokens"] == 8 + 13
    assert (m["completions/mean_length"], m["completions/min_length"], m["completions/max_length"]) == (3.25, 2, 4)
    assert m["completions/clipped_ratio"] == 0.5  # rows 1 and 3 hit max_new without eos
    assert m["completions/mean_terminated_length"] == 2.5
    assert m["reward"] == 4.0 and m["reward_std"] == pytest.approx(rewards.std().item())
    assert m["frac_reward_zero_std"] == 0.0
    assert m["rewards/b/mean"] == 4.0 and m["rewards/b/std"] == pytest.approx(2.0)  # the None row skipped
    m = rollout_metrics([2] * 4, ro, torch.tensor([1.0, 1.0, 0.0, 2.0]), per_func, ["a", "b"], 2, (eos,), 4)
    assert m["frac_reward_zero_std"] == 0.5


def test_normalize_then_sum_matches_the_formula():
    f = torch.tensor([[1.0, 10.0], [3.0, math.nan], [2.0, 30.0], [2.0, 20.0], [0.0, 5.0], [4.0, 5.0]])
    w = torch.tensor([0.5, 2.0])
    got = normalize_then_sum(f, w, group_size=3)
    want = []
    for g in range(2):
        rows = f[3 * g : 3 * g + 3]
        for r in rows:
            total = 0.0
            for k in range(2):
                col = rows[:, k][~rows[:, k].isnan()]
                if not math.isnan(r[k]):
                    total += w[k].item() * (r[k].item() - col.mean().item()) / (col.std().item() + 1e-4)
            want.append(total)
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    cfg = GRPOConfig(max_steps=1, multi_objective_aggregation="normalize_then_sum").to_dash_config()
    assert cfg.scale_rewards == "batch"


def digit_reward(completions, **kw):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_training_rewards_are_the_aggregations(tmp_path, aggregation):
    """The rewards training takes advantages of (dash-fast's `reward_mean`) are the weighted sum, or with
    normalize_then_sum each reward normalised in its group first: a mean of 0 whatever the raw rewards
    (TRL's `reward` stays the raw weighted sum)."""
    tok = build_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                      max_steps=1, report_to="none", disable_tqdm=True, multi_objective_aggregation=aggregation,
                      reward_weights=[1.0, 0.5], use_cpu=True)
    data = Dataset.from_list([{"prompt": f"{i}+1="} for i in range(6)])
    trainer = GRPOTrainer(model=build_model(tok, TINY), reward_funcs=[completion_length, digit_reward], args=args,
                          train_dataset=data, processing_class=tok)
    trainer.train()
    record = trainer.step_records[0]
    assert record["reward"] > 0
    if aggregation == "normalize_then_sum":
        assert abs(record["reward_mean"]) < 1e-5
    else:
        assert record["reward_mean"] == pytest.approx(record["reward"])


def test_sync_ref_model_mixes_the_policy_into_the_reference(tmp_path):
    trainer = make_trainer(tmp_path, args=dict(beta=0.1, use_bias_correction_kl=False, sync_ref_model=True,
                                               ref_model_sync_steps=1, ref_model_mixup_alpha=0.25, max_steps=1))
    ref0 = [p.detach().clone() for p in trainer.ref_model.parameters()]
    trainer.train()
    assert trainer.learner.weights_version == 1
    for r0, r1, p in zip(ref0, trainer.ref_model.parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(r1, 0.75 * r0 + 0.25 * p.detach())
    assert any(not torch.equal(r0, r1) for r0, r1 in zip(ref0, trainer.ref_model.parameters()))


def test_log_history_is_trls_after_train(tmp_path):
    trainer = make_trainer(tmp_path, args=dict(max_steps=3, logging_steps=2))
    trainer.train()
    hist = trainer.state.log_history
    assert [h["step"] for h in hist] == [2, 3] and len(trainer.step_records) == 3
    for key in ("loss", "learning_rate", "grad_norm", "reward", "reward_std", "rewards/completion_length/mean",
                "rewards/completion_length/std", "frac_reward_zero_std", "num_tokens", "completions/mean_length",
                "completions/clipped_ratio", "epoch", "step_time", "kept_fraction"):
        assert key in hist[0], key
    assert hist[0]["loss"] == pytest.approx((trainer.step_records[0]["loss"] + trainer.step_records[1]["loss"]) / 2)
    assert hist[-1]["train_loss"] == pytest.approx(sum(r["loss"] for r in trainer.step_records) / 3)
    assert hist[-1]["reward"] == trainer.step_records[2]["reward"]  # the pending step's metrics


def test_lora_trains_adapters_only_on_the_models_own_forward(tmp_path):
    peft = pytest.importorskip("peft")
    tok = build_tokenizer()
    trainer = make_trainer(tmp_path, model=build_model(tok, TINY),
                           peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.engine.path() == "dynamic" and not trainer.shared_prompt
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for n, p in trainer.model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(before[n], p), n
        else:
            assert torch.equal(before[n], p), n
    trainer.save_model(str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "adapter_config.json"))["r"] == 4
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head"):
        make_trainer(tmp_path, model=build_model(tok, TINY),
                     peft_config=peft.LoraConfig(target_modules=["q_proj", "lm_head"]))


def test_named_eval_sets_are_prefixed(tmp_path):
    evals = {"a": Dataset.from_list([{"prompt": "1+1="}]), "b": Dataset.from_list([{"prompt": "2+2="}] * 2)}
    trainer = make_trainer(tmp_path, eval_dataset=evals)
    assert set(trainer.eval_dataset) == {"a", "b"}
    m = trainer.evaluate(eval_dataset=evals)  # TRL's keys: eval_<name>_loss, eval_<name>_reward, ...
    assert {"eval_a_loss", "eval_b_loss", "eval_a_reward", "eval_b_rewards/completion_length/mean"} <= set(m)
    inner = trainer.evaluate()  # the sets given at construction
    assert inner["eval_a_loss"] == m["eval_a_loss"] and inner["eval_b_reward"] == m["eval_b_reward"]


def test_truncated_rows():
    from dash_fast.trl.trainer import truncated_rows

    ids = torch.tensor([[1, 9, 0], [1, 2, 3], [1, 2, 9], [4, 0, 0]])
    mask = (torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])).float()
    ro = Rollout(prompt_ids=[[1]] * 4, completion_ids=ids, completion_mask=mask, sampling_logps=torch.zeros(4, 3))
    assert truncated_rows(ro, (9,), 3).tolist() == [False, True, False, False]  # row 2 stopped at the limit


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_mask_truncated_completions_when_every_completion_is_cut(tmp_path, mask_truncated):
    trainer = make_trainer(tmp_path, args=dict(mask_truncated_completions=mask_truncated, max_steps=2))
    trainer.stop_ids = ()  # nothing stops: every completion reaches max_completion_length
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert changed != mask_truncated
    if mask_truncated:
        assert trainer.state.log_history[-1]["train_loss"] == 0.0
        assert trainer.step_records[-1]["completions/clipped_ratio"] == 1.0


def test_step_records_are_plain_numbers_with_several_iterations(tmp_path):
    """num_iterations > 1 passes old log-probs to the fused loss, whose stats are 0-d tensors: the step
    record (written as JSON lines) must hold plain numbers."""
    trainer = make_trainer(tmp_path, args=dict(num_iterations=2, max_steps=2, learning_rate=0.5))
    trainer.train()
    for rec in trainer.step_records:
        json.dumps(rec)
        assert isinstance(rec["clip_fraction"], float)


def test_shuffle_dataset_false_draws_prompts_in_dataset_order(tmp_path):
    trainer = make_trainer(tmp_path, args=dict(shuffle_dataset=False, per_device_train_batch_size=8))
    drawn = [row["prompt"] for batch in trainer.get_train_dataloader() for row in batch[::4]]  # 4 generations
    assert drawn == [f"{i}+1=" for i in range(6)]  # TRL's train DataLoader: the same order
    assert trainer.sampler.next(8) == [0, 1, 2, 3, 4, 5, 0, 1]  # 6 prompts, then the next pass, in order
    assert trainer.collector.sampler is trainer.sampler
    shuffled = make_trainer(tmp_path, args=dict(per_device_train_batch_size=8))
    assert shuffled.sampler.next(6) != list(range(6))


def test_trl_checkpoint_layout_save_total_limit_and_exact_resume(tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    tok = build_tokenizer()
    straight = make_trainer(tmp_path / "a", model=build_model(tok, TINY), args=dict(max_steps=4))
    straight.train()
    cut = make_trainer(tmp_path / "b", model=build_model(tok, TINY), callbacks=[StopAt()],
                       args=dict(max_steps=4, save_steps=1, save_total_limit=1))
    cut.train()
    out = tmp_path / "b"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    ckpt = out / "checkpoint-2"
    assert (ckpt / "config.json").exists() and (ckpt / "tokenizer_config.json").exists()
    assert json.load(open(ckpt / "trainer_state.json"))["global_step"] == 2
    # another init: only the checkpoint's weights can make it match the straight run
    resumed = make_trainer(out, model=build_model(tok, TINY, seed=1), args=dict(max_steps=4, save_steps=1))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_callback_events_and_control_flags(tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.events = []

        def __getattribute__(self, name):
            if name.startswith("on_"):
                return lambda args, state, control, **kw: self._record(name, state, control)
            return super().__getattribute__(name)

        def _record(self, name, state, control):
            self.events.append((name, state.global_step))
            if name == "on_step_end" and state.global_step == 1:
                control.should_save = control.should_evaluate = control.should_log = True

    rec = Recorder()
    # 6 prompts, 1 per step: steps 1-6 are epoch 0, step 7 starts epoch 1
    trainer = make_trainer(tmp_path, callbacks=[rec], eval_dataset=Dataset.from_list([{"prompt": "1+1="}]),
                           args=dict(max_steps=7, logging_steps=100, save_steps=0))
    trainer.train()
    names = [e for e, _ in rec.events]
    assert names[0] == "on_init_end"
    for event in ("on_train_begin", "on_epoch_begin", "on_step_begin", "on_pre_optimizer_step",
                  "on_optimizer_step", "on_step_end", "on_log", "on_evaluate", "on_save", "on_epoch_end",
                  "on_train_end"):
        assert event in names, event
    assert names.count("on_epoch_begin") == 2 and names.count("on_epoch_end") == 2
    assert ("on_save", 1) in rec.events and ("on_evaluate", 1) in rec.events and ("on_log", 1) in rec.events
    assert names.count("on_optimizer_step") == trainer.learner.weights_version
    assert (tmp_path / "checkpoint-1").exists()
    pre = names.index("on_pre_optimizer_step")
    assert names[pre + 1] == "on_optimizer_step"


def test_image_columns_are_refused_by_name(tmp_path):
    tok = build_tokenizer()
    data = Dataset.from_list([{"prompt": "1+1=", "image": None}])
    with pytest.raises(ValueError, match="dash-fast does not support train_dataset column 'image'"):
        GRPOTrainer(model=build_model(tok, TINY), reward_funcs=completion_length, processing_class=tok,
                    args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, report_to="none"), train_dataset=data)
