"""Drop-in for TRL: a TRL-style GRPO script runs with only its import line changed to dash_fast."""

import os

import pytest
import torch

from dash_fast import GRPOConfig, GRPOTrainer
from dash_fast.config import ConfigError

# A TRL training script, as TRL's docs write them (no dash-fast names anywhere but the tiny model).
TRL_SCRIPT = '''
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task

tiny = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_terms=2, max_operand=9,
                  n_train=40, n_test=8)
tokenizer = build_tokenizer()
model = build_model(tokenizer, tiny)
rows, _ = make_task(tiny, seed=0)
dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])


def reward_len(completions, **kwargs):
    """Prefer completions of 5 characters."""
    return [-abs(5 - len(c)) for c in completions]


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append("begin")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.events.append(("step", state.global_step, model is not None))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", logs.get("reward")))  # the final entry (train_loss, ...) has none

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append("end")


training_args = GRPOConfig(
    output_dir=OUTPUT_DIR,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=1,
    num_generations=4,
    max_completion_length=8,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    warmup_steps=0,
    beta=0.0,
    loss_type="dr_grpo",
    temperature=1.0,
    max_steps=3,
    logging_steps=1,
    save_steps=2,
    seed=0,
    use_cpu=True,
    bf16=False,
    report_to="none",
    disable_tqdm=True,
    dataloader_num_workers=0,
)
recorder = Recorder()
trainer = GRPOTrainer(
    model=model,
    reward_funcs=reward_len,
    args=training_args,
    train_dataset=dataset,
    processing_class=tokenizer,
    callbacks=[recorder],
)
trainer.train()
'''


def test_trl_script_runs_with_only_the_import_changed(tmp_path):
    script = TRL_SCRIPT.replace("from trl import", "from dash_fast import")
    assert script.count("dash_fast import GRPOConfig") == 1
    scope = {"OUTPUT_DIR": str(tmp_path)}
    exec(compile(script, "trl_style_script.py", "exec"), scope)
    trainer, recorder = scope["trainer"], scope["recorder"]
    steps = [e for e in recorder.events if e[0] == "step"]
    assert recorder.events[0] == "begin" and recorder.events[-1] == "end"
    assert steps == [("step", 1, True), ("step", 2, True), ("step", 3, True)]
    assert [e for e in recorder.events if e[0] == "log"][-1] == ("log", None)  # the final entry, as transformers
    assert sum(e[0] == "log" for e in recorder.events) == 4
    assert trainer.state.global_step == 3
    assert [r["step"] for r in trainer.state.log_history[:3]] == [1, 2, 3]
    assert "reward" in trainer.state.log_history[0] and "train_loss" in trainer.state.log_history[-1]
    assert isinstance(trainer.model, torch.nn.Module)
    assert trainer.config.prompts_per_step == 2 and trainer.config.group_size == 4  # 8 completions / 4 per prompt
    assert trainer.args is trainer.grpo_args  # TRL's trainer.args: the GRPOConfig
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-2", "step-3"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL's own default gradient_checkpointing=True
def test_the_same_script_is_valid_trl():
    """The script's arguments are TRL's own: trl.GRPOConfig accepts them (when TRL is installed)."""
    trl = pytest.importorskip("trl")
    head = TRL_SCRIPT[TRL_SCRIPT.index("training_args = GRPOConfig(") : TRL_SCRIPT.index("recorder = Recorder()")]
    scope = {"GRPOConfig": trl.GRPOConfig, "OUTPUT_DIR": "unused"}
    exec(head, scope)
    assert scope["training_args"].num_generations == 4


def test_should_training_stop_and_resume_from_checkpoint(tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback

    from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task

    evaluated = []

    class StopAtTwo(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            evaluated.append((state.global_step, "eval_accuracy" in metrics))

        def on_step_end(self, args, state, control, **kwargs):
            assert isinstance(args, GRPOConfig)  # callbacks see the GRPOConfig, as in TRL
            if state.global_step == 2:
                control.should_training_stop = True

    tiny = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_train=16, n_test=4)
    tok = build_tokenizer()
    rows, _ = make_task(tiny, seed=0)
    data = Dataset.from_list(rows)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_steps=4, use_cpu=True, disable_tqdm=True, eval_examples=4)

    def make(callbacks):
        return GRPOTrainer(build_model(tok, tiny), "exact_answer", args=args, train_dataset=data,
                           eval_dataset=rows[:4], processing_class=tok, callbacks=callbacks)

    out = make([StopAtTwo]).train()  # a callback class is instantiated, as transformers does
    assert out.global_step == 2 and os.listdir(tmp_path / "checkpoints") == ["step-2"]
    assert evaluated == []  # TRL: eval_strategy="no" (the default) evaluates only when evaluate() is called
    trainer = make([])
    assert trainer.train(resume_from_checkpoint=True).global_step == 4


def test_batch_arguments_map_like_trl():
    cfg = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4,
                     max_steps=10, max_completion_length=16, max_prompt_length=32).to_dash_config()
    assert (cfg.prompts_per_step, cfg.group_size, cfg.minibatches, cfg.max_steps) == (4, 4, 1, 10)
    assert cfg.micro_batch_tokens == 8 * (32 + 16) and cfg.max_completion_tokens == 16
    # steps_per_generation = 2 x gradient_accumulation_steps: 2 optimizer steps per generation (PPO Mini)
    cfg = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, steps_per_generation=4,
                     num_generations=4, num_iterations=2, max_steps=8).to_dash_config()
    assert (cfg.prompts_per_step, cfg.minibatches, cfg.updates_per_rollout, cfg.max_steps) == (8, 2, 2, 2)
    # two ranks: the rollout is global
    assert GRPOConfig(num_generations=4, max_steps=1).to_dash_config(world_size=2).prompts_per_step == 4
    cfg = GRPOConfig(max_steps=1, loss_type="grpo", scale_rewards=False, use_liger_kernel=True, bf16=True,
                     report_to="all", lr_scheduler_type="cosine", warmup_steps=0.5, filter_tau=None).to_dash_config()
    assert (cfg.loss_agg, cfg.scale_rewards, cfg.loss_impl, cfg.dtype, cfg.report_to) == (
        "seq-mean-token-mean", "none", "liger", "bfloat16", ["tensorboard"])
    assert (cfg.lr_scheduler_type, cfg.warmup_steps, cfg.filter_tau) == ("cosine", 1, None)
    # bf16 left unset: bfloat16 on CUDA as TRL's default, float32 on CPU (DashConfig's "auto"); False: float32
    assert GRPOConfig(max_steps=1).to_dash_config().dtype == "auto"
    assert GRPOConfig(max_steps=1, bf16=False).to_dash_config().dtype == "float32"
    cfg = GRPOConfig(num_generations=4, num_train_epochs=2).to_dash_config(n_train=10)
    assert cfg.max_steps == 10  # 2 epochs x 10 prompts / 2 prompts per step
    cfg = GRPOConfig(max_steps=1, refill=True, max_refill_rounds=2).to_dash_config()
    assert (cfg.refill, cfg.max_refill_rounds) == (True, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"vllm_server_host": "1.2.3.4"}, "dash-fast does not support vllm_server_host='1.2.3.4': not implemented"),
    ({"num_generation": 4}, "unknown argument 'num_generation' (did you mean 'num_generations'?)"),
    ({"loss_type": "foo"}, "dash-fast does not support loss_type='foo': unknown"),
    ({"importance_sampling_level": "sequence_token"}, "dash-fast does not support importance_sampling_level="),
    ({"entropy_coef": 0.1, "top_entropy_quantile": 0.5}, "dash-fast does not support entropy_coef=0.1: "),
    ({"top_entropy_quantile": 1.5}, "dash-fast does not support top_entropy_quantile=1.5: "),
    ({"vllm_mode": "server"}, "dash-fast does not support vllm_mode='server': "),
    ({"delta": 2.0}, None),  # TRL's loss variants (trl_losses.py) are accepted
    ({"beta": 0.1}, None),
    ({"loss_type": "cispo", "importance_sampling_level": "sequence", "off_policy_mask_threshold": 0.5}, None),
    ({"bf16": True, "cast_lm_head_to_fp32": True}, "dash-fast does not support cast_lm_head_to_fp32=True: "),
    ({"dataloader_drop_last": False}, None),  # a TrainingArguments option at its default: accepted
    ({"save_only_model": True}, "dash-fast does not support save_only_model=True: not implemented"),
    ({"report_to": "mlflow"}, "report_to='mlflow' is not supported"),
])
def test_unsupported_and_unknown_arguments_are_named(kwargs, message):
    if message is None:
        GRPOConfig(**kwargs)
        return
    with pytest.raises(ConfigError, match=None) as e:
        GRPOConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unset_bf16_keeps_the_head_in_fp32_only_where_the_run_trains_fp32(monkeypatch):
    """bf16 left unset is TRL's bf16 run on a GPU (DashConfig's dtype="auto"), so cast_lm_head_to_fp32 is refused
    there as with bf16=True; on CPU (or use_cpu=True) the run is float32 and the head stays fp32."""
    GRPOConfig(max_steps=1, cast_lm_head_to_fp32=True)  # CPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    GRPOConfig(max_steps=1, cast_lm_head_to_fp32=True, use_cpu=True)
    GRPOConfig(max_steps=1, cast_lm_head_to_fp32=True, bf16=False)
    with pytest.raises(ConfigError, match="bf16 left unset trains bf16 on a GPU"):
        GRPOConfig(max_steps=1, cast_lm_head_to_fp32=True)


def test_batch_that_does_not_hold_whole_groups_is_an_error():
    with pytest.raises(ConfigError, match="divisible by num_generations=3"):
        GRPOConfig(per_device_train_batch_size=8, num_generations=3, max_steps=1).to_dash_config()
