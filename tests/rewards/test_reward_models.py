"""Reward models as reward_funcs (TRL semantics): class-0 logit of the chat-rendered / concatenated text."""

import pytest
import torch
from datasets import Dataset
from helpers import TINY_MODEL
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from dash_fast import GRPOConfig, GRPOTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer
from dash_fast.rewards.reward_models import RewardModelFunc, is_reward_model_id, resolve_reward_models


def tiny_reward_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    return Qwen2ForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    tok = build_tokenizer()
    path = str(tmp_path_factory.mktemp("rm") / "tiny-rm")
    tiny_reward_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def reference_scores(model, tok, texts):
    """One text at a time, no padding: the logit of class 0 at the last token."""
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def test_scores_standard_and_chat_match_unbatched_reference(reward_dir):
    rm = RewardModelFunc(reward_dir)
    assert rm.__name__ == "tiny-rm"
    prompts, completions = ["1+2=", "3+4+5="], ["3", "12+0=12"]  # different lengths: padding must not matter
    got = rm(prompts=prompts, completions=completions)
    want = reference_scores(rm.model, rm.tokenizer, [p + c for p, c in zip(prompts, completions)])
    assert got == pytest.approx(want, abs=1e-5)
    chat = [[{"role": "user", "content": p}] for p in prompts]
    texts = rm.texts(chat, completions)
    assert texts[0] == rm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}], tokenize=False)
    assert rm(prompts=chat, completions=completions) == pytest.approx(
        reference_scores(rm.model, rm.tokenizer, texts), abs=1e-5)


def test_resolve_mixed_list_and_processing_classes(reward_dir):
    def length(completions, **kw):
        return [float(len(c)) for c in completions]

    tok = build_tokenizer()
    funcs, classes = resolve_reward_models([length, reward_dir], [None, tok])
    assert funcs[0] is length and classes[0] is None
    assert isinstance(funcs[1], RewardModelFunc) and classes[1] is tok
    with pytest.raises(ValueError, match="must match"):
        resolve_reward_models([reward_dir, reward_dir], tok)
    assert not is_reward_model_id("exact_answer") and not is_reward_model_id("my.module:func")
    assert is_reward_model_id("org/some-reward-model")


def test_trainer_with_reward_model_and_function_weights(reward_dir, tmp_path):
    tok = build_tokenizer()
    model = build_model(tok, TINY_MODEL)
    loaded = Qwen2ForSequenceClassification.from_pretrained(reward_dir)

    def length(completions, **kw):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=2, learning_rate=1e-3, reward_weights=[0.5, 2.0],
                      report_to="none", disable_tqdm=True, logging_steps=1)
    data = Dataset.from_list([{"prompt": f"{i}+1="} for i in range(6)])
    trainer = GRPOTrainer(model=model, reward_funcs=[length, loaded], args=args, train_dataset=data,
                          processing_class=tok, reward_processing_classes=[None, tok])
    assert trainer.reward_processing_classes[1] is tok
    rm = trainer.reward_funcs[1]
    assert next(rm.model.parameters()).device == trainer.device
    trainer.train()
    rec = trainer.state.log_history[0]
    assert f"rewards/{rm.__name__}/mean" in rec
    assert rec["reward"] == pytest.approx(0.5 * rec["rewards/length/mean"] + 2.0 * rec[f"rewards/{rm.__name__}/mean"],
                                          abs=1e-4)
    assert all(not p.requires_grad for p in rm.model.parameters())
