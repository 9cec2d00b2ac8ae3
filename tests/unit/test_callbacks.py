"""transformers callbacks under the TRL-style trainer: the full event order of a run, against the installed TRL
GRPOTrainer (on transformers' Trainer) running the equivalent configuration."""

import pytest
from datasets import Dataset
from transformers import TrainerCallback

import dash_fast
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer

EVENTS = ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_substep_end",
          "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log", "on_evaluate", "on_save",
          "on_epoch_end", "on_train_end")


class Recorder(TrainerCallback):
    """Records (event, state.global_step) for every TrainerCallback event."""

    def __init__(self):
        self.events = []


for _name in EVENTS:
    setattr(Recorder, _name, (lambda name: lambda self, args, state, control, **kw:
                              self.events.append((name, state.global_step)))(_name))


def char_reward(completions, **kw):
    # differs between completions of equal length: no group is all-equal, so no step is dash-fast's no-signal
    # shortcut (TRL steps the optimizer on a zero gradient there; dash-fast skips the step)
    return [float(sum(map(ord, c)) % 5) for c in completions]


def events_of(module, tmp_path, accumulation: int, n_prompts: int) -> list:
    tok = build_tokenizer()
    model = build_model(tok, TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    data = Dataset.from_list([{"prompt": f"{i}+1="} for i in range(n_prompts)])  # prompts of one length
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                gradient_accumulation_steps=accumulation, max_completion_length=4, max_steps=3, logging_steps=1,
                save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True, gradient_checkpointing=False, seed=0)
    if module is dash_fast:
        args["filter_tau"] = None  # every row is trained, as in TRL
    recorder = Recorder()
    trainer = module.GRPOTrainer(model=model, reward_funcs=char_reward, args=module.GRPOConfig(**args),
                                 train_dataset=data, processing_class=tok, callbacks=[recorder])
    if module is dash_fast:
        # TRL's micro-step is per_device_train_batch_size rows; make each dash-fast micro-batch exactly that:
        # every completion runs to max_completion_length, and the token budget holds 4 such rows
        trainer.stop_ids = ()
        p = len(trainer.train_data.prompt_ids[0])
        assert {len(ids) for ids in trainer.train_data.prompt_ids} == {p}
        trainer.learner.micro_batch_tokens = p + 4 * 4 if trainer.shared_prompt else 4 * (p + 4)
    trainer.train()
    return recorder.events


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("accumulation,n_prompts", [(1, 9), (3, 6), (3, 9)])
def test_event_order_is_transformers_trainers(tmp_path, accumulation, n_prompts):
    """The same (event, global_step) sequence as TRL's GRPOTrainer: on_substep_end after each micro-step but the
    last of an optimizer step, epoch ends where the prompts run out (6 prompts, 3 per step: after step 2), the
    final on_log (train_loss) before on_train_end."""
    trl = pytest.importorskip("trl")
    want = events_of(trl, tmp_path / "trl", accumulation, n_prompts)
    got = events_of(dash_fast, tmp_path / "dash", accumulation, n_prompts)
    assert got == want
    assert sum(e == "on_substep_end" for e, _ in got) == (accumulation - 1) * 3
    assert got[-2:] == [("on_log", 3), ("on_train_end", 3)]
