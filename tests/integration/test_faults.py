"""Faults and bad input: each is a clear error naming what is wrong, or a logged, bounded recovery."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import EditedEngine, keep_grads

from dash_fast import DashConfig, DashTrainer
from dash_fast.checkpoint import load_trainer_state
from dash_fast.config import ConfigError, make_config
from dash_fast.data.prompts import DataError
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task
from dash_fast.losses import LOSSES, get_loss
from dash_fast.rewards import RewardError
from dash_fast.trainer import Extensions, TrainingAborted

TINY = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_terms=2, max_operand=9,
                  n_train=24, n_test=4)


def length_reward(completions, **columns):
    return [float(len(c) % 3) for c in completions]


def make_trainer(tmp_path, reward=length_reward, rows=None, model=None, loss=None, rollout_engine=None,
                 **overrides) -> DashTrainer:
    """`loss`: a name in losses.py's registry (the extension point the TRL layer picks its loss by)."""
    tok = build_tokenizer()
    train, _ = make_task(TINY, seed=0)
    args = dict(output_dir=str(tmp_path), max_steps=3, prompts_per_step=2, group_size=4, max_completion_tokens=6,
                max_prompt_tokens=16, report_to=[], disable_tqdm=True, learning_rate=1e-2, filter_tau=None)
    args.update(overrides)
    return DashTrainer(model or build_model(tok, TINY, seed=0), reward, args=DashConfig(**args),
                       train_dataset=train if rows is None else rows, processing_class=tok,
                       extensions=Extensions(loss=loss), rollout_engine=rollout_engine)


def params(trainer: DashTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- config and data


@pytest.mark.parametrize("override, message", [
    ("filter_ta=0.2", "unknown key 'filter_ta' (did you mean 'filter_tau'?)"),
    ("sft.step=3", "unknown key 'sft.step' (did you mean 'sft.steps'?)"),
    ("max_steps=many", "max_steps='many' is not a int"),
])
def test_bad_config_keys_and_values_are_one_line_errors_naming_them(override, message):
    with pytest.raises(ConfigError) as e:
        make_config(overrides=[override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("prompts_per_step: 8\ngroup_sise: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'group_sise' \(did you mean 'group_size'\?\)"):
        make_config(str(path))


def test_row_missing_the_prompt_column_is_named(tmp_path):
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}, {"question": "x", "answer": "1"}]
    with pytest.raises(DataError, match=r"train_dataset: row 2 has no column 'prompt'"):
        make_trainer(tmp_path, rows=rows)


def test_row_missing_a_column_the_others_have_is_named(tmp_path):
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2="}, {"prompt": "3+3=", "answer": "6"}]
    with pytest.raises(DataError, match=r"train_dataset: row 1 has no column 'answer'"):
        make_trainer(tmp_path, rows=rows)


def test_prompt_longer_than_the_limit_is_named_before_any_work(tmp_path):
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "1+" * 20 + "1=", "answer": "21"}]
    with pytest.raises(DataError, match=r"row 1: prompt has 42 tokens > max_prompt_tokens=16"):
        make_trainer(tmp_path, rows=rows)


# ----------------------------------------------------------------------------- rewards


def flaky(fail_at_call: int, value=None):
    """A reward that raises (or returns `value`) on its `fail_at_call`-th call."""
    calls = {"n": 0}

    def my_reward(completions, **columns):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            if value is None:
                raise KeyError("solution")
            return [value] * len(completions)
        return length_reward(completions)

    return my_reward


@pytest.mark.parametrize("value, message", [
    (None, "reward function 'my_reward' raised KeyError: 'solution'"),
    (float("nan"), "reward function 'my_reward' returned a non-finite value at row 0: nan"),
])
def test_reward_error_stops_the_run_naming_the_function_and_keeps_the_last_checkpoint(tmp_path, value, message):
    trainer = make_trainer(tmp_path, reward=flaky(2, value), save_steps=1)
    with pytest.raises(RewardError) as e:
        trainer.train()
    assert message in str(e.value)
    assert os.listdir(tmp_path / "checkpoints") == ["step-1"]
    resumed = make_trainer(tmp_path, resume="auto")  # the checkpoint is whole: training continues from it
    assert resumed.train()["steps"] == 3


def test_reward_error_skips_the_batch_with_on_reward_error_skip(tmp_path, capsys):
    trainer = make_trainer(tmp_path, reward=flaky(2), on_reward_error="skip")
    before = {}

    class Snapshot:
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            before[state.global_step + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}

    trainer.callbacks.append(Snapshot())
    summary = trainer.train()
    assert summary["steps"] == 3
    records = trainer.state.log_history
    assert records[1].get("reward_error") and records[1]["skipped_steps"] == 1
    assert same(before[2], before[3])  # the skipped step did not touch the weights
    assert not same(before[1], before[2])
    assert "reward function 'my_reward' raised KeyError" in capsys.readouterr().out


# ----------------------------------------------------------------------------- completions


def test_empty_completions_reach_the_reward_and_training_goes_on(tmp_path):
    """Rows that stop at once decode to "", and rows with no tokens at all (an engine may return them)
    train as zero-weight rows."""
    eos = build_tokenizer().eos_token_id
    seen = []

    def truncate(rollout):
        rollout.completion_ids[::2, 0] = eos  # every other row: only <eos>
        rollout.completion_mask[::2, 1:] = 0
        rollout.completion_mask[1::4] = 0  # and some rows with no tokens at all
        return rollout

    def recording_reward(completions, **columns):
        seen.extend(completions)
        return length_reward(completions)

    trainer = make_trainer(tmp_path, reward=recording_reward, loss_agg="token-mean",
                           rollout_engine=EditedEngine.around(truncate))
    before = params(trainer)
    assert trainer.train()["steps"] == 3
    assert "" in seen and not same(before, params(trainer))
    assert seen.count("") >= len(seen) // 2  # the engine's edit: every other row stops at once
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ----------------------------------------------------------------------------- non-finite loss, OOM


def test_non_finite_loss_skips_the_step_then_aborts_after_the_limit(tmp_path, monkeypatch):
    loss_fn = get_loss("fused")
    bad_steps = {2, 3}

    def poisoned(*args):
        loss, stats = loss_fn(*args)
        return (loss * float("nan") if trainer.state.global_step + 1 in bad_steps else loss), stats

    monkeypatch.setitem(LOSSES, "test_poisoned", poisoned)
    trainer = make_trainer(tmp_path, max_nonfinite_steps=2, max_steps=5, save_steps=1, loss="test_poisoned")
    trainer.train_step(1)
    trainer.state.global_step = 1
    after_one = params(trainer)
    record = trainer.train_step(2)  # one non-finite step: skipped, weights kept
    assert record["skipped_steps"] == 1 and same(after_one, params(trainer))
    trainer.state.global_step = 2
    with pytest.raises(TrainingAborted, match=r"2 non-finite steps in a row \(max_nonfinite_steps=2\)"):
        trainer.train_step(3)
    assert same(after_one, params(trainer))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the sampler's copy, freed in the update, is back
def test_non_finite_counter_resets_after_a_good_step(tmp_path, monkeypatch, dtype):
    loss_fn = get_loss("fused")

    def every_other(*args):
        loss, stats = loss_fn(*args)
        return (loss * float("nan") if trainer.state.global_step % 2 else loss), stats

    monkeypatch.setitem(LOSSES, "test_every_other", every_other)
    trainer = make_trainer(tmp_path, max_nonfinite_steps=2, max_steps=4, loss="test_every_other", dtype=dtype)
    summary = trainer.train()  # steps 2 and 4 are non-finite, never two in a row
    assert summary["steps"] == 4
    assert [r["skipped_steps"] for r in trainer.state.log_history] == [0, 1, 0, 1]


def test_out_of_memory_in_backward_halves_the_micro_batch_and_retries(tmp_path, monkeypatch):
    """The retried step gives the gradient of the step that fit in memory."""
    budget = 40  # tokens a micro-batch may hold before the (simulated) device runs out

    def run(oom: bool):
        loss_fn = get_loss("naive")

        def limited(*args):
            if oom and trainer.learner.micro_batch_tokens > budget:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return loss_fn(*args)

        monkeypatch.setitem(LOSSES, "test_limited", limited)
        trainer = make_trainer(tmp_path / str(oom), model=build_model(build_tokenizer(), TINY).double(),
                               loss_impl="naive", micro_batch_tokens=256, max_grad_norm=None, max_steps=1,
                               loss="test_limited")
        grads = keep_grads(trainer)  # the step's (the learner frees them after it)
        trainer.train()
        return trainer, dict(grads)

    trainer, grads = run(oom=True)
    assert trainer.learner.micro_batch_tokens == 32  # 256 -> 128 -> 64 -> 32
    _, reference = run(oom=False)
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-6, atol=1e-9, msg=name)
    state = load_trainer_state(str(tmp_path / "True" / "checkpoints" / "step-1"))
    assert state["micro_batch_tokens"] == 32  # a resumed run starts from the budget that fit


def test_out_of_memory_even_at_one_token_aborts(tmp_path, monkeypatch):
    def always_oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(LOSSES, "test_always_oom", always_oom)
    trainer = make_trainer(tmp_path, micro_batch_tokens=4, max_steps=1, loss="test_always_oom")
    with pytest.raises(TrainingAborted, match="out of memory"):
        trainer.train()
