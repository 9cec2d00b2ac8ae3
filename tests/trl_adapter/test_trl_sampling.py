"""TRL's sampling arguments on the embedded engine: min_p and repetition_penalty against transformers' own
logits processors, the static and dynamic paths agreeing with them on, generation_kwargs mapped or refused,
chat_template_kwargs reaching the template."""

import pytest
import torch
from datasets import Dataset

from dash_fast import GRPOConfig, GRPOTrainer
from dash_fast.config import ConfigError, DashConfig
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer
from dash_fast.engines.base import SamplingParams
from dash_fast.engines.torch_engine import TorchEngine, sample_next

TINY = TinyConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def drawable(logits, params, seen=None, draws=4000):
    """The tokens sample_next can draw: every token some uniform in a fine grid picks."""
    u = torch.linspace(0, 1 - 1e-9, draws, dtype=torch.float64)
    rows = logits.expand(draws, -1)
    tokens, _ = sample_next(rows, params, u, None if seen is None else seen.expand(draws, -1))
    return set(tokens.tolist())


def test_min_p_keeps_the_tokens_transformers_keeps():
    from transformers.generation.logits_process import MinPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=g) * 3
    for min_p in (0.05, 0.3):
        params = SamplingParams(temperature=0.8, top_k=0, min_p=min_p)
        hf = MinPLogitsWarper(min_p)(None, logits / 0.8)
        kept = set(torch.isfinite(hf[0]).nonzero().view(-1).tolist())
        assert drawable(logits, params) == kept and 1 < len(kept) < 40


def test_repetition_penalty_is_transformers_penalty_on_seen_tokens():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 30, generator=g, dtype=torch.float64) * 2
    history = torch.tensor([[1, 4, 4, 7], [2, 3, 9, 11], [0, 5, 6, 8]])
    seen = torch.zeros(3, 30, dtype=torch.bool).scatter_(1, history, True)
    for penalty in (1.3, 3.0, 0.7):
        hf = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        params = SamplingParams(temperature=0.0, repetition_penalty=penalty)
        tokens, logps = sample_next(logits, params, None, seen)
        assert torch.equal(tokens, hf.argmax(-1))  # greedy with the penalty, as generate()
        # the log-prob is the unpenalised one (what the trainer recomputes), as for top-k / top-p
        torch.testing.assert_close(logps, torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0])
        sampled = SamplingParams(temperature=1.0, top_k=3, repetition_penalty=penalty)
        top3 = set(torch.topk(hf[0], 3).indices.tolist())
        assert drawable(logits[:1], sampled, seen[:1]) == top3  # top-k taken after the penalty


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=0, min_p=0.1, max_new_tokens=14, stop_token_ids=(2, 7), seed=5),
    SamplingParams(temperature=1.0, top_k=0, repetition_penalty=2.5, max_new_tokens=14, stop_token_ids=(2, 7), seed=5),
    SamplingParams(temperature=0.0, repetition_penalty=50.0, max_new_tokens=14, stop_token_ids=(2,)),
])
def test_static_and_dynamic_paths_agree_with_min_p_and_penalty(params):
    model = build_model(build_tokenizer(), TINY, seed=0).to(torch.float64)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 12], [3, 4, 5]]
    out = {kv: TorchEngine(model, 0, kv_cache=kv).generate(prompts, params) for kv in ("static", "dynamic")}
    assert torch.equal(out["static"].completion_ids, out["dynamic"].completion_ids)
    torch.testing.assert_close(out["static"].sampling_logps, out["dynamic"].sampling_logps, atol=1e-9, rtol=0)
    if params.repetition_penalty == 50.0:  # a penalty that large: greedy never repeats a token of its row
        for p, comp in zip(prompts, out["dynamic"].completion_token_lists()):
            assert len(set(comp)) == len(comp) and not set(comp) & set(p)


def test_penalty_changes_greedy_samples():
    model = build_model(build_tokenizer(), TINY, seed=0)
    engine = TorchEngine(model, 0)
    base = SamplingParams(temperature=0.0, max_new_tokens=16)
    plain = engine.generate([[3, 4, 5]], base).completion_token_lists()[0]
    assert len(set(plain)) < len(plain)  # the random tiny model repeats itself
    rp = SamplingParams(temperature=0.0, max_new_tokens=16, repetition_penalty=50.0)
    assert engine.generate([[3, 4, 5]], rp).completion_token_lists()[0] != plain


def test_grpo_config_sampling_arguments_and_generation_kwargs():
    cfg = GRPOConfig(max_steps=1, min_p=0.05, repetition_penalty=1.2, top_k=0,
                     generation_kwargs={"top_k": 7, "do_sample": True, "num_beams": 1})
    dash = cfg.to_dash_config()
    assert (dash.min_p, dash.repetition_penalty, dash.top_k) == (0.05, 1.2, 7)  # generation_kwargs override
    assert cfg.top_k == 0  # trainer.args keeps what was given, as TRL's
    with pytest.raises(ConfigError, match=r"dash-fast does not support generation_kwargs\['num_beams'\]=2"):
        GRPOConfig(max_steps=1, generation_kwargs={"do_sample": True, "num_beams": 2, "length_penalty": -0.1})
    with pytest.raises(ConfigError, match=r"dash-fast does not support generation_kwargs\['length_penalty'\]"):
        GRPOConfig(max_steps=1, generation_kwargs={"length_penalty": -0.1})
    with pytest.raises(ConfigError, match=r"generation_kwargs\['temperature'\]=0.5: differs from temperature=1.0"):
        GRPOConfig(max_steps=1, generation_kwargs={"temperature": 0.5})
    with pytest.raises(ConfigError, match=r"dash-fast does not support min_p=0.1 with engine='vllm'"):
        DashConfig(engine="vllm", min_p=0.1).validate()


def test_chat_template_kwargs_reach_the_template(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}{% if flag %}A:{% else %}B:{% endif %}{% endif %}")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+1="}]} for i in range(4)])
    seen = []

    def reward(prompts, completions, **kw):
        seen.append(prompts)
        return [0.0] * len(completions)

    for flag, tail in ((True, "A:"), (False, "B:")):
        args = GRPOConfig(output_dir=str(tmp_path / str(flag)), per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=3, max_steps=1, report_to="none", disable_tqdm=True,
                          chat_template_kwargs={"flag": flag})
        trainer = GRPOTrainer(build_model(tok, TINY), reward, args=args, train_dataset=data, processing_class=tok)
        assert all(t.endswith(tail) for t in trainer.train_data.texts)
        trainer.train()
