"""GRPOTrainer's TRL evaluation (eval_loss and TRL's eval metrics), trainer.args as TRL's config, streamed
(IterableDataset) train sets, TRL's dataloaders, and the refusal of TRL internals. Tiny local models only."""

import logging

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import EditedEngine

from dash_fast import GRPOConfig, GRPOTrainer
from dash_fast.config import ConfigError
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer

TINY = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
PROMPTS = [{"prompt": f"{i}+{i}="} for i in range(6)]


def length_reward(completions, **kw):
    return [float(len(c)) for c in completions]


def make_trainer(tmp_path, train=None, seed_model=0, **kwargs):
    tok = build_tokenizer()
    torch.manual_seed(seed_model)
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                max_steps=2, learning_rate=1e-2, report_to="none", disable_tqdm=True, logging_steps=1)
    args.update(kwargs.pop("args", {}))
    return GRPOTrainer(model=build_model(tok, TINY), reward_funcs=kwargs.pop("reward_funcs", length_reward),
                       args=GRPOConfig(**args), train_dataset=Dataset.from_list(PROMPTS) if train is None else train,
                       processing_class=tok, **kwargs)


def recording_engine(seen: list):
    """A rollout engine (GRPOTrainer's `rollout_engine`) that records every rollout it returns in `seen`."""
    return EditedEngine.around(lambda out: (seen.append(out), out)[1])


def test_eval_loss_is_trls_objective_at_ratio_one(tmp_path):
    """TRL's eval: the loss at ratio 1 with no gradient is, per token, -A (dapo: token mean over the batch);
    eval_reward is the rewards' mean. Recomputed here from the rollout the engine returned."""
    evals = Dataset.from_list(PROMPTS[:2])
    rollouts = []
    trainer = make_trainer(tmp_path, args=dict(per_device_eval_batch_size=8, num_generations_eval=4,
                                               max_completion_length=8), rollout_engine=recording_engine(rollouts))
    trainer.stop_ids = tuple(range(3, len(trainer.tokenizer), 3))  # completions of varied lengths (else loss = 0)
    m = trainer.evaluate(eval_dataset=evals)
    (ro,) = rollouts  # 2 prompts x 4 generations: one eval batch of 8 rows
    lengths = ro.completion_lengths.float()
    assert lengths.min() < lengths.max()
    texts = trainer.tokenizer.batch_decode(ro.completion_token_lists(), skip_special_tokens=True)
    rewards = torch.tensor([float(len(t)) for t in texts])
    grouped = rewards.view(2, 4)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    expected = -(adv * lengths).sum() / lengths.sum()  # dapo: sum over tokens of -A / tokens in the batch
    assert m["eval_loss"] == pytest.approx(float(expected), abs=1e-5)
    assert m["eval_reward"] == pytest.approx(float(rewards.mean()), rel=1e-6)
    assert m["eval_rewards/length_reward/mean"] == pytest.approx(float(rewards.mean()), rel=1e-6)
    assert m["eval_completions/mean_length"] == pytest.approx(float(lengths.mean()))
    assert {"eval_reward_std", "eval_frac_reward_zero_std", "eval_entropy", "eval_runtime", "epoch"} <= set(m)
    assert trainer.state.log_history[-1]["eval_loss"] == m["eval_loss"]  # logged, as the HF Trainer does


def test_eval_batches_average_like_trl(tmp_path):
    """Two eval batches: eval_loss is the row-weighted mean of the batch losses, each batch normalised alone."""
    evals = Dataset.from_list(PROMPTS[:2])
    rollouts = []
    trainer = make_trainer(tmp_path, args=dict(per_device_eval_batch_size=4, num_generations_eval=4,
                                               max_completion_length=8), rollout_engine=recording_engine(rollouts))
    trainer.stop_ids = tuple(range(3, len(trainer.tokenizer), 3))
    m = trainer.evaluate(eval_dataset=evals)
    assert len(rollouts) == 2
    losses = []
    for ro in rollouts:
        lengths = ro.completion_lengths.float()
        texts = trainer.tokenizer.batch_decode(ro.completion_token_lists(), skip_special_tokens=True)
        r = torch.tensor([float(len(t)) for t in texts])
        adv = (r - r.mean()) / (r.std() + 1e-4)
        losses.append(float(-(adv * lengths).sum() / lengths.sum()))
    assert m["eval_loss"] == pytest.approx(sum(losses) / 2, abs=1e-5) and abs(m["eval_loss"]) > 1e-3


@pytest.mark.parametrize("kind", ["dict", "dataset_dict", "iterable"])
def test_evaluate_dict_and_iterable_eval_sets(tmp_path, kind):
    part = Dataset.from_list(PROMPTS[:2])
    trainer = make_trainer(tmp_path)
    if kind == "iterable":
        m = trainer.evaluate(eval_dataset=part.to_iterable_dataset())
        assert m["eval_loss"] == pytest.approx(trainer.evaluate(eval_dataset=part)["eval_loss"])  # same rows, seeds
        return
    sets = {"a": part, "b": Dataset.from_list(PROMPTS[2:3])}
    m = trainer.evaluate(eval_dataset=sets if kind == "dict" else DatasetDict(sets))
    assert {"eval_a_loss", "eval_b_loss", "eval_a_reward", "eval_b_rewards/length_reward/mean"} <= set(m)
    assert "eval_loss" not in m


def test_eval_schedule_and_log_order(tmp_path):
    """eval_strategy="steps": evaluated every eval_steps steps (and before training with eval_on_start), in
    log_history after that step's train log, with on_evaluate fired each time; eval_strategy="no" never."""
    from transformers import TrainerCallback

    events = []

    class Rec(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            events.append((state.global_step, "eval_loss" in metrics))

    evals = Dataset.from_list(PROMPTS[:1])
    trainer = make_trainer(tmp_path, eval_dataset=evals, callbacks=[Rec()],
                           args=dict(max_steps=4, eval_strategy="steps", eval_steps=2, eval_on_start=True))
    trainer.train()
    assert events == [(0, True), (2, True), (4, True)]
    steps = [(e["step"], "eval_loss" in e) for e in trainer.state.log_history]
    assert steps[:7] == [(0, True), (1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    assert "train_loss" in trainer.state.log_history[-1]
    events.clear()
    make_trainer(tmp_path / "no", eval_dataset=evals, callbacks=[Rec()], args=dict(max_steps=2)).train()
    assert events == []


def test_evaluating_does_not_change_training(tmp_path):
    a = make_trainer(tmp_path / "a", eval_dataset=Dataset.from_list(PROMPTS[:2]),
                     args=dict(max_steps=3, eval_strategy="steps", eval_steps=1))
    b = make_trainer(tmp_path / "b", args=dict(max_steps=3))
    a.evaluate()
    a.train()
    b.train()
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_args_is_a_trl_compatible_config(tmp_path):
    trainer = make_trainer(tmp_path, args=dict(gradient_accumulation_steps=2, per_device_train_batch_size=2))
    args = trainer.args
    assert args is trainer.grpo_args and isinstance(args, GRPOConfig)
    assert args.steps_per_generation == 2 and args.generation_batch_size == 4  # resolved as TRL's __post_init__
    assert args.accelerator_config.dispatch_batches is None  # an AcceleratorConfig
    assert args.dataloader_drop_last is False and args.eval_accumulation_steps is None  # TrainingArguments' defaults
    assert args.train_batch_size == 2 and args.to_dict()["learning_rate"] == 1e-2
    assert trainer.config.prompts_per_step == 1  # the DashConfig the loop runs: 4 completions / 4 per prompt
    with pytest.raises(AttributeError):
        args.not_an_argument  # noqa: B018
    with pytest.raises(ConfigError, match=r"dash-fast does not support accelerator_config.split_batches=True"):
        GRPOConfig(max_steps=1, accelerator_config={"split_batches": True})


def test_streamed_train_set_is_read_as_training_draws_and_resumes_exactly(tmp_path, caplog):
    pulled = []

    def rows():
        for i, r in enumerate(PROMPTS):
            pulled.append(i)
            yield r

    from datasets import IterableDataset

    stream = IterableDataset.from_generator(rows)
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tmp_path / "a", train=stream, args=dict(max_steps=4, dataloader_num_workers=2,
                                                                        shuffle_dataset=False, save_steps=2))
    assert trainer.args.dataloader_num_workers == 0 and "dataloader_num_workers=0" in caplog.text  # TRL's rule
    assert trainer.args.accelerator_config.dispatch_batches is False
    n_peeked = len(pulled)
    trainer.train()
    assert trainer.train_data.state_dict() == {"epoch": 0, "offset": 4, "read": 4}  # one prompt per step
    assert len(pulled) - n_peeked == 4  # read as drawn, not loaded whole
    whole = [p.clone() for p in trainer.model.parameters()]
    # stop after 2 steps, resume from the checkpoint: the same weights as the run straight through
    from transformers import TrainerCallback

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step == 2

    stopped = make_trainer(tmp_path / "b", train=IterableDataset.from_generator(rows), callbacks=[StopAtTwo()],
                           args=dict(max_steps=4, shuffle_dataset=False, save_steps=2))
    assert stopped.train().global_step == 2
    resumed = make_trainer(tmp_path / "b", train=IterableDataset.from_generator(rows),
                           args=dict(max_steps=4, shuffle_dataset=False, save_steps=2))
    resumed.train(resume_from_checkpoint=True)
    for p, q in zip(resumed.model.parameters(), whole, strict=True):
        assert torch.equal(p, q)


def test_streamed_train_set_wraps_to_a_new_pass_and_needs_max_steps(tmp_path):
    stream = Dataset.from_list(PROMPTS[:3]).to_iterable_dataset()
    trainer = make_trainer(tmp_path, train=stream, args=dict(max_steps=5, shuffle_dataset=False))
    trainer.train()
    assert trainer.train_data.state_dict()["epoch"] == 1 and trainer.state.epoch == 1.0
    with pytest.raises(ConfigError, match="max_steps"):
        make_trainer(tmp_path, train=Dataset.from_list(PROMPTS).to_iterable_dataset(), args=dict(max_steps=-1))
    with pytest.raises(ValueError, match="Iterable datasets require `dispatch_batches=False`"):
        make_trainer(tmp_path, train=Dataset.from_list(PROMPTS).to_iterable_dataset(),
                     args=dict(accelerator_config={"dispatch_batches": True}))


def test_train_dataloader_yields_what_training_draws(tmp_path):
    seen = []
    trainer = make_trainer(tmp_path, args=dict(max_steps=1, dataloader_num_workers=0),
                           rollout_engine=recording_engine(seen))
    first = next(iter(trainer.get_train_dataloader()))
    assert len(first) == 4 and all(row == first[0] for row in first)  # one prompt x num_generations
    trainer.train()
    assert seen[0].prompt_ids[0] == trainer.tokenizer(first[0]["prompt"])["input_ids"]
    evals = Dataset.from_list(PROMPTS[:2])
    batch = next(iter(trainer.get_eval_dataloader(evals)))
    assert [r["prompt"] for r in batch] == [PROMPTS[0]["prompt"]] * 4 + [PROMPTS[1]["prompt"]] * 4
    assert trainer.get_eval_dataloader(evals.to_iterable_dataset()).num_workers == 0


def test_trl_internals_are_refused_when_called_or_overridden(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(NotImplementedError, match=r"dash-fast does not support GRPOTrainer._generate=called"):
        trainer._generate(["prompt"])

    class Custom(GRPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 0.0

    tok = build_tokenizer()
    custom = Custom(build_model(tok, TINY), length_reward, args=GRPOConfig(output_dir=str(tmp_path / "c"),
                    per_device_train_batch_size=4, num_generations=4, max_steps=1, max_completion_length=4),
                    train_dataset=Dataset.from_list(PROMPTS), processing_class=tok)
    with pytest.raises(NotImplementedError, match=r"GRPOTrainer.compute_loss=overridden"):
        custom.train()
    trainer.training_step = lambda *a: None  # an instance patch is an override too
    with pytest.raises(NotImplementedError, match=r"GRPOTrainer.training_step=overridden"):
        trainer.train()


def test_per_token_logps_helper_matches_the_learners_logprobs(tmp_path):
    trainer = make_trainer(tmp_path, args=dict(temperature=0.7, entropy_coef=0.1))
    model = trainer.model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    mask = torch.ones_like(ids)
    logps, ent, aux = trainer._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep=3,
                                                                 compute_entropy=True)
    assert aux is None and logps.shape == (2, 3) and ent.requires_grad  # the bonus is on: entropies carry grad
    from dash_fast.engines.base import Rollout

    ro = Rollout(prompt_ids=[r[:3] for r in ids.tolist()], completion_ids=ids[:, 3:],
                 completion_mask=torch.ones(2, 3), sampling_logps=torch.zeros(2, 3))
    ref = trainer.learner.logprob_pass(model, ro, [0, 1], "test")  # the fused kernel at the same temperature
    assert torch.allclose(logps.detach(), ref, atol=1e-5)
    trainer._entropy_bonus_enabled = False
    trainer.entropy_coef = 0.0
    assert trainer.entropy_coef == 0.0
    _, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, 3, compute_entropy=True)
    assert not ent.requires_grad


def test_logging_strategy_no_and_log(tmp_path):
    trainer = make_trainer(tmp_path, args=dict(max_steps=3, logging_strategy="no"))
    trainer.log({"custom": 1.0})
    trainer.train()
    hist = trainer.state.log_history
    assert [e.get("custom") for e in hist[:-1]] == [1.0] and "train_loss" in hist[-1]
    assert "loss" in hist[-1]  # the steps' metrics averaged into the final entry, as TRL's log() merges them


def test_log_extra_reaches_trainer_logs(tmp_path):
    def reward(completions, log_extra=None, **kw):
        log_extra("head", [c[:2] for c in completions])
        return [float(len(c)) for c in completions]

    trainer = make_trainer(tmp_path, reward_funcs=reward, args=dict(log_completions=True))
    trainer.train()
    assert len(trainer._logs["extra"]["head"]) == 4 and len(trainer._logs["completion"]) == 4
    assert trainer._logs["rewards"]["reward"] == [float(len(c)) for c in trainer._logs["completion"]]
