"""Models dash-fast cannot train are refused at construction with one line naming them: vision-language models
(the engines and the training forward take token ids only). Tiny local configs / models only."""

import pytest
from datasets import Dataset
from helpers import TINY_MODEL

from dash_fast import DashConfig, DashTrainer, GRPOConfig, GRPOTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer
from dash_fast.models.loading import check_text_only


def tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=64)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=63))


def reward(completions, **kw):
    return [0.0] * len(completions)


DATA = Dataset.from_list([{"prompt": "1+1="}])


def test_a_vision_language_model_is_refused_by_grpo_trainer_as_id_path_or_module(tmp_path):
    model = tiny_llava()
    model.save_pretrained(tmp_path / "llava")
    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none")
    tok = build_tokenizer()
    for given, name in ((str(tmp_path / "llava"), str(tmp_path / "llava")), (model, "LlavaForConditionalGeneration")):
        with pytest.raises(ValueError) as e:
            GRPOTrainer(model=given, reward_funcs=reward, args=args, train_dataset=DATA, processing_class=tok)
        assert str(e.value).startswith(f"dash-fast does not support model={name!r}: its config (llava) is a "
                                       "vision-language config")
        assert "\n" not in str(e.value)


def test_a_vision_language_model_is_refused_by_dash_trainer_and_under_peft(tmp_path):
    peft = pytest.importorskip("peft")
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="dash-fast does not support model='LlavaForConditionalGeneration'"):
        DashTrainer(tiny_llava(), reward, DashConfig(max_steps=1, output_dir=str(tmp_path)), train_dataset=[
            {"prompt": "1+1="}], processing_class=tok)
    wrapped = peft.get_peft_model(tiny_llava(), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="model='LlavaForConditionalGeneration': its config"):
        check_text_only(wrapped)


@pytest.mark.parametrize("config_class", ["Qwen2VLConfig", "Qwen2_5_VLConfig", "Gemma3Config", "Idefics3Config"])
def test_vision_language_configs_are_refused_before_any_weights_load(tmp_path, config_class):
    """A checkpoint directory holding only config.json: refused from the config alone (no weights needed)."""
    import transformers

    getattr(transformers, config_class)().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a vision-language config"):
        check_text_only(str(tmp_path))


def test_text_only_models_pass(tmp_path):
    tok = build_tokenizer()
    model = build_model(tok, TINY_MODEL)
    check_text_only(model)
    model.save_pretrained(tmp_path)
    check_text_only(str(tmp_path))
    check_text_only(str(tmp_path / "missing"))  # no config: left to the model loading to report
