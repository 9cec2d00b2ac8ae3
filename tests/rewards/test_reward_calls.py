"""Reward functions are called as TRL 1.16's GRPOTrainer calls them (trl/trainer/grpo_trainer.py,
_calculate_rewards and the completion decoding before it), inside a real training step."""

import logging

import pytest
import torch
from helpers import TINY_MODEL as TINY

from dash_fast import DashConfig, DashTrainer, GRPOConfig, GRPOTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "completion": "given", "completion_ids": [1, 2]}
        for a in range(3) for b in range(3)]


def trainer_for(tmp_path, reward_funcs, rows=ROWS, cls=DashTrainer, **overrides):
    tok = build_tokenizer()
    model = build_model(tok, TINY)
    args = dict(output_dir=str(tmp_path), max_steps=1, prompts_per_step=2, group_size=2, max_completion_tokens=4,
                report_to=[], disable_tqdm=True, filter_tau=None)
    args.update(overrides)
    return cls(model, reward_funcs, args=DashConfig(**args), train_dataset=rows, processing_class=tok)


def test_kwargs_are_trls_and_reserved_columns_do_not_collide(tmp_path):
    seen = {}

    def reward(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **columns):
        seen.update(columns=sorted(columns), ids=completion_ids, state=trainer_state, completions=completions,
                    calls=seen.get("calls", 0) + 1)
        log_metric("calls", seen["calls"])
        log_metric("my_metric", 0.25)
        log_metric("my_metric", 0.75)
        log_extra("my_column", [float(len(c)) for c in completions])
        return [1.0] * len(completions)

    trainer = trainer_for(tmp_path, reward)
    record = trainer.train_step(1)
    assert seen["columns"] == ["answer"]  # the dataset's completion / completion_ids columns are not passed
    assert seen["state"] is trainer.state
    assert all(isinstance(c, str) for c in seen["completions"])  # string prompts: string completions
    assert seen["ids"] == [list(map(int, ids)) for ids in seen["ids"]] and len(seen["ids"]) == 4
    assert record["my_metric"] == 0.5
    assert record["extra/my_column"] == pytest.approx(sum(len(c) for c in seen["completions"]) / 4)
    assert record["calls"] == 1 and trainer.train_step(2)["calls"] == 2  # flushed per step


def test_chat_prompts_get_assistant_message_completions(tmp_path):
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.extend(completions)
        return [0.0] * len(completions)

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in ROWS]
    trainer = trainer_for(tmp_path, [reward, "exact_answer"], rows=rows)
    trainer.train_step(1)
    assert seen and all(isinstance(c, list) and len(c) == 1 and c[0]["role"] == "assistant"
                        and isinstance(c[0]["content"], str) for c in seen)


def test_async_reward_functions_are_awaited(tmp_path):
    import asyncio

    async def slow_len(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    class AsyncJudge:
        async def __call__(self, prompts, completions, **kwargs):
            return [2.0] * len(completions)

    trainer = trainer_for(tmp_path, [slow_len, AsyncJudge()])
    record = trainer.train_step(1)
    assert record["rewards/AsyncJudge"] == 2.0 and record["rewards/slow_len"] >= 0.0


def test_all_none_row_warns_naming_its_inputs_and_scores_zero(tmp_path, caplog):
    def none_for_zero(prompts, completions, answer, **kwargs):
        return [None if a == "0" else 1.0 for a in answer]

    trainer = trainer_for(tmp_path, [none_for_zero, none_for_zero], prompts_per_step=9, data_seed=0)
    indices = list(range(len(ROWS)))
    rollout = trainer.generate([trainer.train_data.prompt_ids[i] for i in indices], 1)
    with caplog.at_level(logging.WARNING, logger="dash_fast.rewards.calling"):
        rewards, per_func = trainer.rewards.score(trainer.train_data, indices, rollout, 1)
    assert rewards.tolist() == [0.0 if r["answer"] == "0" else 2.0 for r in ROWS]  # TRL: nansum, all None -> 0
    assert "All reward functions returned None" in caplog.text and "'prompt': '0+0='" in caplog.text


def test_reward_weights_are_checked_against_the_resolved_functions(tmp_path):
    def one(prompts, completions, **kw):
        return [1.0] * len(completions)

    def three(prompts, completions, **kw):
        return [3.0] * len(completions)

    trainer = trainer_for(tmp_path, [one, three], reward_weights=[2.0, 0.5])  # refused by the config before
    indices = [0, 1]
    rollout = trainer.generate([trainer.train_data.prompt_ids[i] for i in indices], 1)
    rewards, _ = trainer.rewards.score(trainer.train_data, indices, rollout, 1)
    assert rewards.tolist() == [3.5, 3.5]
    with pytest.raises(ValueError, match="1 weights for 3 reward functions"):
        trainer_for(tmp_path, [one, three, one], reward_weights=[1.0])
    tok = build_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      reward_weights=[1.0, 2.0], report_to="none")
    trainer = GRPOTrainer(build_model(tok, TINY), [one, three], args=args, train_dataset=ROWS, processing_class=tok)
    assert trainer.rewards.weights.tolist() == [1.0, 2.0]
    assert torch.is_tensor(trainer.rewards.weights)
