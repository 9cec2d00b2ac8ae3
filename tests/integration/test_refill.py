"""refill=True (DAPO-style dynamic sampling): more prompts are sampled until the gradient filter keeps
prompts_per_step * G rows, the batch is cut after the group holding the target-th kept row, and the
update trains on exactly those rows; also with overlap=True (the next rollout is drawn after the
refill rounds)."""

import pytest
import torch
from helpers import TINY_TASK as TINY

from dash_fast import DashConfig, DashTrainer
from dash_fast.config import ConfigError
from dash_fast.data.prompts import PromptSampler
from dash_fast.embedded.tiny import build_model, build_tokenizer, make_task


def half_constant_reward(prompts, completions, **columns):
    """Constant (a group the filter drops) for about half of the prompts; varies within the others."""
    return [0.0 if sum(map(ord, p)) % 2 else float(len(c) % 3) for p, c in zip(prompts, completions)]


def constant_reward(prompts, completions, **columns):
    return [1.0] * len(completions)


def make_trainer(tmp_path, reward, **overrides) -> DashTrainer:
    tok = build_tokenizer()
    model = build_model(tok, TINY, seed=0).double()
    train, test = make_task(TINY, seed=0)
    args = dict(output_dir=str(tmp_path), prompts_per_step=4, group_size=4, max_completion_tokens=8,
                max_prompt_tokens=16, loss_impl="naive", report_to=[], disable_tqdm=True, learning_rate=1e-2,
                filter_tau=0.1, refill=True, eval_examples=4, eval_every=0)
    args.update(overrides)
    return DashTrainer(model, reward, args=DashConfig(**args), train_dataset=train, eval_dataset=test,
                       processing_class=tok)


def record_updates(trainer: DashTrainer) -> list[dict]:
    """Wrap trainer.update to keep what each step trained on."""
    seen, update = [], trainer.update

    def spy(rollout, advantages, kept, **kwargs):
        seen.append({"rollout": rollout, "advantages": advantages.clone(), "kept": kept.clone()})
        return update(rollout, advantages, kept, **kwargs)

    trainer.update = spy
    return seen


@pytest.mark.parametrize("overlap", [False, True])
def test_refill_samples_until_the_filter_keeps_the_target_and_cuts_at_a_group(tmp_path, overlap):
    """With overlap the next rollout is drawn after the refill rounds: the prompt order is the same."""
    trainer = make_trainer(tmp_path, half_constant_reward, max_steps=3, overlap=overlap)
    seen = record_updates(trainer)
    trainer.train()
    G, target = 4, 16
    sampler = PromptSampler(len(trainer.train_data), seed=0)  # the trainer's prompt order, replayed
    records = [r for r in trainer.state.log_history if "refill_rounds" in r]
    assert len(records) == len(seen) == 3
    assert any(r["refill_rounds"] >= 1 for r in records)
    for rec, step in zip(records, seen):
        rollout, kept = step["rollout"], step["kept"].tolist()
        n_rows = len(rollout)
        assert n_rows % G == 0 and len(step["advantages"]) == n_rows
        # the filter's rows of the joined batch, and the cut right after the group of the target-th one
        assert len(kept) >= target
        assert len([r for r in kept if r < n_rows - G]) < target
        # the rows are the sampler's next prompts, G each, in order: first rollout then refill rounds
        prompts = sampler.next(n_rows // G + rec["refill_rows_unused"] // G)
        expected = [trainer.train_data.prompt_ids[i] for i in prompts[: n_rows // G] for _ in range(G)]
        assert rollout.prompt_ids == expected
        assert rec["refill_rows"] == n_rows + rec["refill_rows_unused"] - target
        assert rec["kept_fraction"] == pytest.approx(len(kept) / n_rows)
    assert trainer.sampler.state_dict() == sampler.state_dict()  # refill consumed exactly those prompts
    assert [r["rollout_lag"] for r in records] == ([0, 1, 1] if overlap else [0, 0, 0])


def test_refill_stops_after_max_refill_rounds_and_still_trains(tmp_path):
    """Every group constant: nothing survives the filter, so refill gives up after max_refill_rounds; the
    fallback row has A = 0, so the step makes no update at all (as without refill) and says so."""
    trainer = make_trainer(tmp_path, constant_reward, max_steps=1, max_refill_rounds=2)
    seen = record_updates(trainer)
    trainer.train()
    rec = next(r for r in trainer.state.log_history if "refill_rounds" in r)
    assert rec["refill_rounds"] == 2
    assert seen == [] and rec["optimizer_steps"] == 0 and rec["no_signal"] == 1


def test_refill_does_nothing_when_the_filter_is_off(tmp_path):
    trainer = make_trainer(tmp_path, lambda completions, **kw: [float(len(set(c))) for c in completions],
                           max_steps=1, filter_tau=None)
    seen = record_updates(trainer)
    trainer.train()
    assert len(seen[0]["rollout"]) == 16 and trainer.sampler.state_dict()["offset"] == 4


def test_a_refill_round_samples_like_its_own_generate_call(tmp_path):
    """A refill round is one generate call whose seeds continue the step's rows (row_offset = the rows
    sampled before it): regenerating that round's prompts from the same weights gives the same rows."""
    trainer = make_trainer(tmp_path, half_constant_reward, max_steps=1, max_refill_rounds=1)
    seen = record_updates(trainer)
    trainer.train()
    rollout, rec, first = seen[0]["rollout"], trainer.state.log_history[0], 16
    assert rec["refill_rounds"] == 1 and len(rollout) > first
    prompts = PromptSampler(len(trainer.train_data), seed=0).next(4 + rec["refill_rows"] // 4)[4:]
    untrained = make_trainer(tmp_path / "again", half_constant_reward)  # the same initial weights
    again = untrained.generate([untrained.train_data.prompt_ids[i] for i in prompts for _ in range(4)], step=1,
                               row_offset=first)
    assert again.completion_token_lists()[: len(rollout) - first] == rollout.completion_token_lists()[first:]


def test_max_refill_rounds_is_checked():
    with pytest.raises(ConfigError, match="max_refill_rounds"):
        DashConfig(refill=True, max_refill_rounds=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_run_with_refill_resumes_bit_for_bit(tmp_path, overlap):
    """Refill draws extra prompts mid-step; the checkpoint's sampler position includes them (and, with
    overlap, the rollout sampled ahead after them), so a run resumed from step 2 ends with the parameters
    of the uninterrupted run."""
    full = make_trainer(tmp_path / "full", half_constant_reward, max_steps=4, save_steps=1, keep_last_checkpoints=5,
                        overlap=overlap)
    full.train()
    assert any(r.get("refill_rounds", 0) >= 1 for r in full.state.log_history)
    resumed = make_trainer(tmp_path / "resumed", half_constant_reward, max_steps=4, overlap=overlap,
                           resume=str(tmp_path / "full" / "checkpoints" / "step-2"))
    resumed.train()
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
