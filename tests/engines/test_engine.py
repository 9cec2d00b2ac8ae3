"""The embedded rollout engine: static-cache and dynamic-cache paths agree, log-probs are the sampler's,
stop tokens / max_new_tokens / top-k / top-p hold, and it samples from the live parameters (zero-copy)."""

import pytest
import torch
from helpers import PAD, other_architectures, prompts, tiny_model

from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer
from dash_fast.engines.base import SamplingParams
from dash_fast.engines.static_decode import StaticDecoder
from dash_fast.engines.torch_engine import TorchEngine, draw_uniforms, sample_next
from dash_fast.models.decoder import static_unsupported


def engines(model):
    return {"static": TorchEngine(model, PAD, kv_cache="static"),
            "static_shapes": TorchEngine(model, PAD, kv_cache="static", cuda_graphs=True),  # graph-mode step, eager
            "dynamic": TorchEngine(model, PAD, kv_cache="dynamic")}


def recomputed_logps(model, rollout, temperature):
    """log softmax(logits / T)[token] from one plain forward over each prompt + completion."""
    out = torch.zeros_like(rollout.sampling_logps, dtype=torch.float64)
    for i, (p, comp) in enumerate(zip(rollout.prompt_ids, rollout.completion_token_lists())):
        ids = torch.tensor([p + comp])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : len(p) - 1 + len(comp)].double()
        out[i, : len(comp)] = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(comp)[:, None])[:, 0]
    return out


def test_auto_picks_static_for_the_tiny_model():
    assert static_unsupported(tiny_model()) is None
    assert TorchEngine(tiny_model(), PAD).path() == "static"


@pytest.mark.parametrize("path", ["static", "static_shapes", "dynamic"])
def test_sampling_logprobs_match_a_recomputed_forward(path):
    model = tiny_model()
    engine = engines(model)[path]
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=10, stop_token_ids=(2,), seed=3)
    rollout = engine.generate(prompts(), params)
    with torch.no_grad():
        expected = recomputed_logps(model, rollout, params.temperature)
    torch.testing.assert_close(rollout.sampling_logps.double(), expected * rollout.completion_mask, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_static_and_dynamic_paths_give_identical_greedy_tokens(dtype):
    model = tiny_model(dtype)
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=(5, 9))
    out = {name: e.generate(prompts(16), params) for name, e in engines(model).items()}
    for name in ("static", "static_shapes"):
        assert torch.equal(out[name].completion_ids, out["dynamic"].completion_ids), name
        assert torch.equal(out[name].completion_mask, out["dynamic"].completion_mask), name
    lengths = out["dynamic"].completion_lengths
    assert lengths.min() < lengths.max()  # rows finished at different steps (finished rows rode along)


def test_static_and_dynamic_paths_sample_the_same_tokens_with_a_seed(monkeypatch):
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_k=0, max_new_tokens=20, stop_token_ids=(2, 7), seed=11)
    compactions = []
    compact = StaticDecoder.compact
    monkeypatch.setattr(StaticDecoder, "compact",
                        lambda self, keep, used: compactions.append(used) or compact(self, keep, used))
    out = {}
    for name, engine in engines(model).items():
        compactions.clear()
        out[name] = engine.generate(prompts(24), params)
        assert name == "dynamic" or compactions, f"{name}: finished rows were never dropped from the cache"
    for name in ("static", "static_shapes"):
        assert torch.equal(out[name].completion_ids, out["dynamic"].completion_ids), name
        torch.testing.assert_close(out[name].sampling_logps, out["dynamic"].sampling_logps, atol=1e-9, rtol=0)
    assert len(set(out["dynamic"].completion_lengths.tolist())) > 2


def test_when_finished_rows_are_dropped_does_not_change_seeded_samples(monkeypatch):
    """Eager decode drops finished rows in batches (DROP_FRACTION); uniforms are drawn per output row, so
    dropping after every finish, in batches, or never gives the same tokens and log-probs."""
    import dash_fast.engines.static_decode as static_decode

    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_k=0, max_new_tokens=16, stop_token_ids=(2, 7), seed=4)
    out = {}
    for fraction in (0.0, 0.25, 1.0):  # 0: every step a row finishes; 1.0: never (finished rows ride along)
        monkeypatch.setattr(static_decode, "DROP_FRACTION", fraction)
        out[fraction] = TorchEngine(model, PAD, kv_cache="static").generate(prompts(24), params)
    assert len(set(out[0.0].completion_lengths.tolist())) > 2
    for fraction in (0.25, 1.0):
        assert torch.equal(out[fraction].completion_ids, out[0.0].completion_ids), fraction
        torch.testing.assert_close(out[fraction].sampling_logps, out[0.0].sampling_logps, atol=1e-9, rtol=0)


@pytest.mark.parametrize("path", ["static", "static_shapes", "dynamic"])
def test_a_group_prefills_its_prompt_once_and_samples_as_if_each_row_had_its_own(path):
    """G rows per prompt (GRPO): one prefill per distinct prompt, its K/V copied to the rows. Tokens
    and log-probs must equal sampling with no sharing: each row generated alone (greedy, fp64) and the
    sampler's log-probs equal a recomputed forward (sampled)."""
    model = tiny_model()
    engine = engines(model)[path]
    distinct = prompts(3)
    grouped = [p for p in distinct for _ in range(4)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(5,))
    out = engine.generate(grouped, greedy)
    assert out.stats["prefill_prompts"] == 3
    for i, p in enumerate(grouped):
        alone = engine.generate([p], greedy)
        assert alone.stats["prefill_prompts"] == 1
        n = int(alone.completion_lengths[0])
        assert out.completion_token_lists()[i] == alone.completion_token_lists()[0], i
        torch.testing.assert_close(out.sampling_logps[i, :n], alone.sampling_logps[0, :n], atol=1e-9, rtol=0)
    sampled = SamplingParams(temperature=1.0, top_k=0, max_new_tokens=12, stop_token_ids=(2, 7), seed=5)
    out = engine.generate(grouped, sampled)
    assert len({tuple(t) for t in out.completion_token_lists()}) > 3  # rows of a group still differ
    with torch.no_grad():
        expected = recomputed_logps(model, out, sampled.temperature)
    torch.testing.assert_close(out.sampling_logps.double(), expected * out.completion_mask, atol=1e-6, rtol=0)


def test_greedy_matches_hugging_face_generate():
    model = tiny_model().eval()
    ps = prompts(8)
    width = max(map(len, ps))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in ps])
    attn = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in ps])[:, None]).long()
    hf = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                        pad_token_id=PAD)[:, width:]
    ours = TorchEngine(model, PAD).generate(ps, SamplingParams(temperature=0.0, max_new_tokens=12))
    assert torch.equal(ours.completion_ids, hf)


def test_stop_tokens_and_max_new_tokens_are_honoured():
    model = tiny_model()
    stops = (4, 6, 8)
    params = SamplingParams(temperature=1.0, top_k=0, max_new_tokens=9, stop_token_ids=stops, seed=0)
    for engine in engines(model).values():
        rollout = engine.generate(prompts(32), params)
        assert rollout.completion_ids.shape[1] <= 9
        for row, mask in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
            n = int(sum(mask))
            assert mask == [1.0] * n + [0.0] * (len(mask) - n)
            body = row[:n]
            assert not any(t in stops for t in body[:-1])  # nothing after the first stop token
            assert body[-1] in stops or n == 9  # ended by a stop token (kept, masked in) or by the limit
            assert all(t == PAD for t in row[n:])
        assert (rollout.sampling_logps[rollout.completion_mask == 0] == 0).all()


def test_top_k_and_top_p_restrict_draws_but_logprobs_stay_on_the_full_distribution():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)

    def uniforms(g):
        return draw_uniforms(len(logits), SamplingParams(temperature=1.0), g, logits.device)

    drawn, logp = sample_next(logits, SamplingParams(temperature=1.0, top_k=2, top_p=1.0), uniforms(g))
    assert set(drawn.tolist()) == {0, 1}
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(1, drawn[:, None])[:, 0])
    freq0 = (drawn == 0).float().mean().item()
    assert abs(freq0 - 0.4 / 0.7) < 0.03  # renormalised over the kept tokens
    drawn, _ = sample_next(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.75), uniforms(g))
    assert set(drawn.tolist()) == {0, 1, 2}  # 0.4 + 0.3 < 0.75: the token crossing p is kept
    drawn, _ = sample_next(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.35), uniforms(g))
    assert set(drawn.tolist()) == {0}
    drawn, _ = sample_next(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0), uniforms(g))
    assert set(drawn.tolist()) == {0, 1, 2, 3, 4}


def test_top_k_one_is_greedy_in_the_engine():
    model = tiny_model()
    greedy = TorchEngine(model, PAD).generate(prompts(), SamplingParams(temperature=0.0, max_new_tokens=8))
    top1 = TorchEngine(model, PAD).generate(prompts(), SamplingParams(temperature=0.8, top_k=1, max_new_tokens=8, seed=5))
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


def test_engine_reads_the_live_parameters_zero_copy():
    """An in-place update (what optimizer.step does) is seen by the next generate with no sync call, and
    the static path holds no copy of any parameter."""
    model = tiny_model()
    engine = TorchEngine(model, PAD)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = engine.generate(prompts(), params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = engine.generate(prompts(), params)
    fresh = TorchEngine(model, PAD, kv_cache="dynamic").generate(prompts(), params)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, fresh.completion_ids)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    dec = engine.static_decoder
    held = [*dec.k, *dec.v, dec.rope, dec.key_valid]
    assert not param_ptrs & {t.untyped_storage().data_ptr() for t in held}
    assert sum(t.numel() for t in held) < sum(p.numel() for p in model.parameters()) * 4  # cache-sized, no copy


@pytest.mark.parametrize("name", ["llama_gqa", "qwen3_qk_norm"])
def test_static_path_on_other_architectures(name):
    model = other_architectures()[name].double()
    assert static_unsupported(model) is None
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(3, 5))
    out = {k: e.generate(prompts(10, vocab=40), params) for k, e in engines(model).items()}
    assert torch.equal(out["static"].completion_ids, out["dynamic"].completion_ids)
    assert torch.equal(out["static_shapes"].completion_ids, out["dynamic"].completion_ids)
    sampled = TorchEngine(model, PAD).generate(prompts(10, vocab=40), SamplingParams(temperature=0.9, max_new_tokens=6, seed=1))
    with torch.no_grad():
        expected = recomputed_logps(model, sampled, 0.9)
    torch.testing.assert_close(sampled.sampling_logps.double(), expected * sampled.completion_mask, atol=1e-6, rtol=0)


def test_unsupported_architecture_falls_back_to_the_dynamic_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert "gpt2" in static_unsupported(model)
    assert TorchEngine(model, PAD).path() == "dynamic"
    out = TorchEngine(model, PAD).generate(prompts(4), SamplingParams(temperature=0.0, max_new_tokens=4))
    assert out.completion_ids.shape == (4, 4)
    with pytest.raises(ValueError, match="kv_cache='static' cannot run"):
        TorchEngine(model, PAD, kv_cache="static").generate(prompts(4), SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("device,dtype,installed,expected", [
    ("cuda", "bfloat16", True, "flash_attention_2"),
    ("cuda", "float16", True, "flash_attention_2"),
    ("cuda", "float32", True, "sdpa"),  # flash-attn has no fp32 kernels
    ("cuda", "bfloat16", False, "sdpa"),
    ("cpu", "bfloat16", True, "sdpa"),
    ("cpu", "float32", False, "sdpa"),
])
def test_attention_implementation_selection(monkeypatch, device, dtype, installed, expected):
    import importlib.util

    from dash_fast.models.loading import attn_implementation

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "flash_attn" else real(name, *a))
    assert attn_implementation(torch.device(device), dtype) == expected


def test_the_kv_cache_goes_by_the_keyword_the_decoder_takes():
    """transformers 5.24 renamed past_key_values= to cache=; a wrong keyword is swallowed by **kwargs
    (decode then attends only the current token), so it is read off the decoder's own forward."""
    import inspect

    from dash_fast.engines.torch_engine import cache_keyword

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids

    model = build_model(build_tokenizer(), TinyConfig())
    native = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert cache_keyword(model) == native and cache_keyword(Old()) == "past_key_values"
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_keyword(wrapped) == native  # a PeftModel's forward takes **kwargs: ask its base model
