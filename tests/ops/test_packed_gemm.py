"""The static engine's oneDNN paths (over the parameters, or over weights reordered once per generate with
q|k|v and gate|up fused): chosen once and named, the same tokens and log-probs as the plain path and the
model's own forward (fp32, at the Qwen2.5-0.5B widths too); the packed copy lives for one generate and
follows in-place updates."""

import pytest
import torch

from dash_fast.engines.base import SamplingParams
from dash_fast.engines.packed_gemm import packed_gemm_unavailable
from dash_fast.engines.static_decode import StaticDecoder
from dash_fast.engines.torch_engine import TorchEngine

pytestmark = pytest.mark.skipif(packed_gemm_unavailable(torch.device("cpu"), torch.float32) is not None,
                                reason="no oneDNN packed linear in this torch build")
PROMPTS = [[1, 5, 9, 13, 7], [1, 4, 4], [1, 30, 31, 32, 33, 34, 35], [1, 4, 4], [8, 9, 10, 11, 12, 13, 14, 15, 16]]


def qwen2(hidden=64, heads=4, kv_heads=2, mlp=128, vocab=64, layers=2, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # non-zero q/k/v biases: the fused bias must line up with its projection
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.uniform_(-0.5, 0.5)
    return model


def recomputed(model, rollout, temperature):
    """log softmax(logits / T)[token] from the model's own forward over each prompt + completion."""
    out = torch.zeros_like(rollout.sampling_logps, dtype=torch.float64)
    for i, (p, comp) in enumerate(zip(rollout.prompt_ids, rollout.completion_token_lists())):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + comp])).logits[0, len(p) - 1 : len(p) - 1 + len(comp)]
        out[i, : len(comp)] = torch.log_softmax(logits.double() / temperature, -1).gather(
            1, torch.tensor(comp)[:, None])[:, 0]
    return out


def both_paths(model, params):
    runs = {}
    for gemm in ("plain", "packed", "onednn"):
        engine = TorchEngine(model, 0, kv_cache="static", gemm=gemm)
        runs[gemm] = engine.generate(PROMPTS, params)
    return runs


def check_paths_agree(model, new_tokens):
    greedy = both_paths(model, SamplingParams(temperature=0.0, max_new_tokens=new_tokens))
    assert torch.equal(greedy["packed"].completion_ids, greedy["plain"].completion_ids)
    assert torch.equal(greedy["onednn"].completion_ids, greedy["plain"].completion_ids)
    from dash_fast.data.prompts import pad_left

    ids, attn = pad_left(PROMPTS, 0)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=new_tokens,
                            eos_token_id=None, pad_token_id=0)
    assert greedy["packed"].completion_ids.tolist() == hf[:, ids.shape[1]:].tolist()

    T = 0.8
    sampled = both_paths(model, SamplingParams(temperature=T, top_k=0, max_new_tokens=new_tokens, seed=5))
    for gemm in ("packed", "onednn"):
        assert torch.equal(sampled[gemm].completion_ids, sampled["plain"].completion_ids), gemm
        got = sampled[gemm].sampling_logps.double()
        torch.testing.assert_close(got, sampled["plain"].sampling_logps.double(), rtol=0, atol=1e-5)
        mask = sampled[gemm].completion_mask
        torch.testing.assert_close(got, recomputed(model, sampled[gemm], T) * mask, rtol=0, atol=1e-5)


def test_packed_path_matches_the_plain_path_and_the_models_forward():
    check_paths_agree(qwen2(), new_tokens=10)


def test_packed_path_at_the_qwen05b_widths():
    """Hidden 896, 14 / 2 heads, MLP 4864, vocab 151936, tied head (two layers: the GEMM shapes are the
    real model's, the depth only multiplies the time)."""
    check_paths_agree(qwen2(hidden=896, heads=14, kv_heads=2, mlp=4864, vocab=151936, layers=2), new_tokens=4)


def test_the_gemm_path_is_chosen_once_and_named():
    assert TorchEngine(qwen2(), 0).describe() == "torch static fast path (plain GEMMs: hidden size 64 < 512)"
    assert TorchEngine(qwen2(), 0, gemm="onednn").describe() == "torch static fast path (oneDNN GEMMs)"
    wide = qwen2(hidden=512, heads=4, kv_heads=2, mlp=64, vocab=64, layers=1)
    assert TorchEngine(wide, 0).describe() == (  # auto, from 512 on
        "torch static fast path (oneDNN GEMMs, packed from 64 new tokens)")
    assert TorchEngine(wide, 0, gemm="onednn").describe() == "torch static fast path (oneDNN GEMMs)"
    assert TorchEngine(qwen2(), 0, gemm="packed").describe() == "torch static fast path (oneDNN packed GEMMs)"
    fp64 = qwen2(dtype=torch.float64)
    assert TorchEngine(fp64, 0).describe() == "torch static fast path (plain GEMMs: torch.float64 weights)"
    assert TorchEngine(qwen2(), 0, gemm="plain").describe() == "torch static fast path (plain GEMMs: gemm='plain')"
    for gemm in ("packed", "onednn"):
        with pytest.raises(ValueError, match="torch.float64 weights"):
            TorchEngine(fp64, 0, gemm=gemm).describe()
    with pytest.raises(ValueError, match="gemm='fast'"):
        TorchEngine(qwen2(), 0, gemm="fast")
    assert packed_gemm_unavailable(torch.device("meta"), torch.float32) == "meta device"


@pytest.mark.parametrize("gemm", ["packed", "onednn"])
def test_the_packed_copy_lives_for_one_generate_and_follows_in_place_updates(monkeypatch, gemm):
    model = qwen2()
    engine = TorchEngine(model, 0, gemm=gemm)
    layers_run = []
    packed_layer = StaticDecoder._packed_layer
    monkeypatch.setattr(StaticDecoder, "_packed_layer", lambda self, x, i, *a: layers_run.append(i) or
                        packed_layer(self, x, i, *a))
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = engine.generate(PROMPTS, params)
    assert layers_run and set(layers_run) == {0, 1}  # every layer ran on the packed GEMMs
    assert engine.static_decoder.packed == [] and engine.static_decoder.packed_head is None  # freed after the call
    with torch.no_grad():  # what optimizer.step does: in place, no sync call
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = engine.generate(PROMPTS, params)
    fresh = TorchEngine(model, 0, kv_cache="dynamic").generate(PROMPTS, params)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, fresh.completion_ids)


def test_auto_decodes_long_generates_on_a_packed_copy(monkeypatch):
    """gemm="auto" on a wide model: a generate of PACKED_MIN_NEW_TOKENS tokens or more runs on the reordered copy
    (q|k|v as one fused weight), a shorter one over the parameters (q, k, v apart); each copy is freed after
    its call. The tokens are the plain path's either way."""
    from dash_fast.engines.static_decode import PACKED_MIN_NEW_TOKENS

    wide = qwen2(hidden=512, heads=4, kv_heads=2, mlp=64, vocab=64, layers=1)
    qkv_weights = []
    unpack = StaticDecoder.unpack
    monkeypatch.setattr(StaticDecoder, "unpack", lambda self: qkv_weights.append(
        len(self.packed[0].qkv.weights) if self.packed else 0) or unpack(self))
    engine, plain = TorchEngine(wide, 0), TorchEngine(wide, 0, gemm="plain")
    for n, fused in ((PACKED_MIN_NEW_TOKENS - 1, 3), (PACKED_MIN_NEW_TOKENS, 1)):
        params = SamplingParams(temperature=0.0, max_new_tokens=n)
        got = engine.generate(PROMPTS[:2], params)
        assert qkv_weights.pop() == fused
        assert engine.static_decoder.packed == []
        assert torch.equal(got.completion_ids, plain.generate(PROMPTS[:2], params).completion_ids)
        assert qkv_weights.pop() == 0  # the plain path keeps no oneDNN linears


def test_the_packed_mlp_in_row_chunks_matches_the_plain_path(monkeypatch):
    """The prefill runs the packed MLP MLP_ROWS tokens at a time: with chunks of 3 (the prompts' 45 tokens in 15)
    the tokens and log-probs are still the plain path's and the model's own."""
    from dash_fast.engines import static_decode
    from dash_fast.engines.packed_gemm import PackedLayer

    chunks = []
    mlp = PackedLayer.mlp_residual
    monkeypatch.setattr(static_decode, "MLP_ROWS", 3)
    monkeypatch.setattr(PackedLayer, "mlp_residual", lambda self, x, *a: chunks.append(len(x)) or mlp(self, x, *a))
    check_paths_agree(qwen2(), new_tokens=6)
    assert max(chunks) == 3 and len(chunks) > 2 * 15  # every layer's prefill in chunks


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 GEMMs on this CPU")
@pytest.mark.parametrize("widths", [{}, dict(hidden=896, heads=14, kv_heads=2, mlp=4864, vocab=151936, layers=2)],
                         ids=["tiny", "qwen05b"])
def test_bf16_weights_decode_on_onednn_as_close_to_the_model_as_the_plain_path(widths):
    """bf16 weights (a bf16 run's sampler copy) take the oneDNN paths where the CPU has oneDNN bf16 GEMMs: greedy
    tokens as the plain path's, and sampling log-probs as close to the model's own bf16 forward as the plain
    path's are (a bf16 rounding may flip a sampled token, so the paths are each held to the model)."""
    model = qwen2(dtype=torch.bfloat16, **widths)
    wide = qwen2(hidden=512, heads=4, kv_heads=2, mlp=64, vocab=64, layers=1, dtype=torch.bfloat16)
    assert TorchEngine(wide, 0).describe() == "torch static fast path (oneDNN GEMMs, packed from 64 new tokens)"
    greedy = both_paths(model, SamplingParams(temperature=0.0, max_new_tokens=8))
    T = 0.8
    sampled = both_paths(model, SamplingParams(temperature=T, top_k=0, max_new_tokens=8, seed=5))
    error = {}
    for gemm, rollout in sampled.items():
        assert torch.equal(greedy[gemm].completion_ids, greedy["plain"].completion_ids), gemm
        diff = (rollout.sampling_logps.double() - recomputed(model, rollout, T) * rollout.completion_mask).abs()
        error[gemm] = (diff.max().item(), diff.sum().item() / rollout.completion_mask.sum().item())
    for gemm in ("packed", "onednn"):
        assert error[gemm][0] < 0.05 and error[gemm][1] < 2 * error["plain"][1] + 1e-3, error
