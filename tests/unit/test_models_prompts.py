"""Prompts and models as their authors intend: one BOS after a chat template that writes one, system_prompt on
string prompts, and models whose logits are transformed after the head refused at start-up."""

import pytest
import torch
from helpers import TINY_MODEL as TINY

from dash_fast import DashConfig, DashTrainer
from dash_fast.data.prompts import DataError, PromptDataset
from dash_fast.embedded.tiny import build_model, build_tokenizer
from dash_fast.models.loading import logit_transform


def bos_tokenizer():
    """The tiny tokenizer made to behave like Llama's: it adds BOS itself and its chat template writes one too."""
    from tokenizers import processors

    tok = build_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% endfor %}A:"
    assert tok("1+1=")["input_ids"][0] == tok.bos_token_id
    return tok


@pytest.mark.parametrize("use_chat_template", [None, True])
def test_a_rendered_chat_template_gets_no_second_bos(use_chat_template):
    tok = bos_tokenizer()
    prompt = [{"role": "user", "content": "1+1="}] if use_chat_template is None else "1+1="
    data = PromptDataset([{"prompt": prompt}], tok, use_chat_template=use_chat_template)
    ids = data.prompt_ids[0]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False, add_generation_prompt=True)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # as TRL tokenises a rendered prompt


def test_string_prompts_keep_the_tokenizers_own_special_tokens():
    tok = bos_tokenizer()
    assert PromptDataset([{"prompt": "1+1="}], tok).prompt_ids[0] == tok("1+1=")["input_ids"]


def test_system_prompt_applies_to_string_prompts_or_is_refused():
    tok = bos_tokenizer()
    data = PromptDataset([{"prompt": "1+1="}], tok, system_prompt="QA")
    assert data.texts[0] == "<bos>s:QAu:1+1=A:"
    with pytest.raises(DataError, match="use_chat_template=False"):
        PromptDataset([{"prompt": "1+1="}], tok, system_prompt="QA", use_chat_template=False)
    tok.chat_template = None
    with pytest.raises(DataError, match="system_prompt needs a tokenizer with a chat_template"):
        PromptDataset([{"prompt": "1+1="}], tok, system_prompt="QA")


def tiny(config_cls, **fields):
    from transformers import AutoModelForCausalLM

    config = config_cls(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, **fields)
    return AutoModelForCausalLM.from_config(config)


def test_soft_capped_logits_are_refused_naming_the_field(tmp_path):
    import transformers

    model = tiny(transformers.Gemma2Config)
    with pytest.raises(ValueError, match="dash-fast does not support config.final_logit_softcapping="):
        DashTrainer(model, "exact_answer", args=DashConfig(output_dir=str(tmp_path), report_to=[]),
                    train_dataset=[{"prompt": "1+1="}], processing_class=build_tokenizer())


@pytest.mark.parametrize("name, fields", [("CohereConfig", {"logit_scale": 0.25}),
                                          ("GraniteConfig", {"logits_scaling": 8.0})])
def test_scaled_logits_train_with_the_models_log_probs(tmp_path, name, fields):
    """Cohere multiplies the logits by logit_scale, Granite divides them by logits_scaling: the learner folds the
    factor into the hidden states, so its log-probs are the model's own forward's."""
    import transformers

    from dash_fast.engines.base import Rollout

    model = tiny(getattr(transformers, name), **fields).double()
    trainer = DashTrainer(model, "exact_answer", args=DashConfig(output_dir=str(tmp_path), report_to=[],
                          loss_impl="naive", temperature=0.7), train_dataset=[{"prompt": "1+1=", "answer": "2"}],
                          processing_class=build_tokenizer())
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    ro = Rollout(prompt_ids=[[3, 4, 5]], completion_ids=ids[:, 3:], completion_mask=torch.ones(1, 3),
                 sampling_logps=torch.zeros(1, 3))
    got = trainer.learner.logprob_pass(model, ro, [0], "test")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, 2:5].double()
    want = torch.log_softmax(logits / 0.7, -1).gather(1, ids[0, 3:, None])[:, 0]
    torch.testing.assert_close(got[0].double(), want, atol=1e-6, rtol=0)
    assert trainer.learner.logit_multiplier != 1.0


def test_models_with_plain_logits_pass():
    import transformers

    assert logit_transform(tiny(transformers.GraniteConfig)) is None  # logits_scaling=1.0: the identity
    assert logit_transform(tiny(transformers.Gemma3TextConfig)) is None  # Gemma-3 soft-caps nothing by default
    assert logit_transform(build_model(build_tokenizer(), TINY)) is None


def test_float16_is_refused_and_bfloat16_without_masters_says_so(tmp_path, capsys):
    from dash_fast.config import ConfigError

    with pytest.raises(ConfigError, match="float16 is refused: dash-fast has no loss scaler"):
        DashConfig(dtype="float16")
    tok = build_tokenizer()
    DashTrainer(build_model(tok, TINY).to(torch.bfloat16), "exact_answer",
                args=DashConfig(output_dir=str(tmp_path), report_to=[], dtype="bfloat16", master_weights=False),
                train_dataset=[{"prompt": "1+1=", "answer": "2"}], processing_class=tok)
    assert "no fp32 master copy" in capsys.readouterr().out
