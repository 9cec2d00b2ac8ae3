"""The model families users pick: for each, on a tiny random fp32 config with GQA, the rollout
engine takes the static fast path or announces its dynamic fallback with the reason, and either way

- its greedy tokens equal Hugging Face's `generate` (left-padded prompts of different lengths),
- its sampling log-probs equal a recomputation by the model's own forward (within 1e-5),
- the shared-prompt training forward (where it applies, else its reason is announced) gives those
  log-probs too.

Soft-capped final logits (Gemma-2) are refused from the config, before any weights load."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dash_fast.engines.base import SamplingParams
from dash_fast.engines.packed_gemm import packed_gemm_unavailable
from dash_fast.engines.torch_engine import TorchEngine
from dash_fast.models.decoder import logit_multiplier
from dash_fast.models.shared_prompt import shared_prompt_hidden, shared_prompt_unsupported

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# family -> (config class, its own settings, None = fast path / a part of the fallback reason)
FAMILIES = {
    "qwen2": ("Qwen2Config", {}, None),
    "qwen3": ("Qwen3Config", {"head_dim": 8}, None),
    "llama3": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE}, None),
    "mistral": ("MistralConfig", {}, None),  # its 4096-token window cannot bind at 128 positions
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 0]}, None),  # layer 2 is a NoPE layer
    "gemma": ("GemmaConfig", {"head_dim": 8}, None),
    "phi3": ("Phi3Config", {}, None),
    "olmo2": ("Olmo2Config", {}, None),
    "granite": ("GraniteConfig", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.3, "logits_scaling": 2.0}, None),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 4}, "sliding-window layers"),
}
PROMPTS = [[1, 5, 9, 13, 7], [1, 4, 4], [1, 30, 31, 32, 33, 34, 35], [1, 4, 4]]
NEW = 8


def tiny(family: str, vocab_size: int = 64) -> torch.nn.Module:
    import transformers

    name, own, _ = FAMILIES[family]
    config = getattr(transformers, name)(**{**COMMON, **own, "vocab_size": vocab_size})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # Gemma / OLMo2 initialise norms to 0 / 1: random ones exercise the norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = None  # no early stop: every row runs NEW tokens
    model.generation_config.pad_token_id = 0
    return model


def recomputed(model, prompts, completions, temperature: float) -> list[torch.Tensor]:
    """log softmax(logits / T)[token] of each completion token, one unpadded forward per row."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].double()
        out.append(torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(c)[:, None]).squeeze(1))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fast_path_or_announced_fallback_matches_the_models_own_forward(family):
    model = tiny(family)
    expected = FAMILIES[family][2]
    engine = TorchEngine(model, pad_token_id=0)
    path = engine.describe()
    if expected is None:
        assert path.startswith("torch static fast path"), path
        assert shared_prompt_unsupported(model) is None
    else:
        assert path.startswith(f"torch dynamic fallback (model_type '{model.config.model_type}': ") and expected in path

    check_engine_against_the_model(model, engine)

    # training: the shared-prompt forward's log-probs are the model's own
    if shared_prompt_unsupported(model) is None:
        T = 0.7
        rollout = engine.generate(PROMPTS, SamplingParams(temperature=T, top_k=0, max_new_tokens=NEW, seed=3))
        completions = rollout.completion_token_lists()
        want = recomputed(model, PROMPTS, completions, T)
        with torch.no_grad():
            hidden, targets = shared_prompt_hidden(model, PROMPTS, completions, 0)
            logits = (hidden * logit_multiplier(model)) @ model.get_output_embeddings().weight.t()
        logp = torch.log_softmax(logits.double() / T, -1).gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(logp, torch.cat(want), rtol=0, atol=1e-5)


@pytest.mark.skipif(packed_gemm_unavailable(torch.device("cpu"), torch.float32) is not None,
                    reason="no oneDNN packed linear in this torch build")
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("olmo2", "gemma3_text")])
def test_family_on_the_packed_gemms_matches_the_models_own_forward(family):
    """The oneDNN packed path (q|k|v fused; SiLU fused into the gate GEMM, Phi-3's gate_up_proj split for it;
    Gemma's GELU after one gate|up GEMM; Granite's residual scale; SmolLM3's NoPE layer; Qwen3's q/k norms):
    HF generate's tokens and the model's own log-probs. (OLMo2's post-norm layers refuse gemm='packed'.)"""
    model = tiny(family)
    engine = TorchEngine(model, pad_token_id=0, gemm="packed")
    assert engine.describe() == "torch static fast path (oneDNN packed GEMMs)"
    check_engine_against_the_model(model, engine)
    dec = engine.static_decoder
    dec.pack(len(PROMPTS), NEW)
    assert (dec.packed[0].gate_up is None) == (family != "gemma")  # SiLU's fused pair taken where it applies
    dec.unpack()


def check_engine_against_the_model(model: torch.nn.Module, engine: TorchEngine) -> None:
    """Greedy: the engine's tokens are Hugging Face generate's; sampling: the log-probs it returns are the model's
    own (tempered) log-probs of those tokens."""
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW)
    greedy = engine.generate(PROMPTS, params)
    assert greedy.completion_mask.sum() == len(PROMPTS) * NEW
    from dash_fast.data.prompts import pad_left

    ids, attn = pad_left(PROMPTS, 0)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=NEW)
    assert greedy.completion_ids.tolist() == hf[:, ids.shape[1]:].tolist()

    # sampling: the log-probs it returns are the model's own (tempered) log-probs of those tokens
    T = 0.7
    rollout = engine.generate(PROMPTS, SamplingParams(temperature=T, top_k=0, max_new_tokens=NEW, seed=3))
    completions = rollout.completion_token_lists()
    want = recomputed(model, PROMPTS, completions, T)
    got = [rollout.sampling_logps[r, : len(c)].double() for r, c in enumerate(completions)]
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=0, atol=1e-5)


def test_soft_capped_logits_are_refused_before_the_weights_load(tmp_path):
    """A Gemma-2 checkpoint directory with config.json only: refused from the config (its final logits are
    soft-capped, which the loss, log-prob and sampling ops do not apply)."""
    from transformers import Gemma2Config

    from dash_fast.models.loading import check_text_only

    Gemma2Config(**COMMON, head_dim=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        check_text_only(str(tmp_path))


def save_family(family: str, path: str) -> str:
    """A tiny random `family` model with dash-fast's char-level tokenizer (its ids 0 / 1 / 2 are pad / bos /
    eos, as in COMMON), saved as a checkpoint directory."""
    from dash_fast.embedded.tiny import build_tokenizer

    tok = build_tokenizer()
    tiny(family, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_through_cli(family: str, out: str, steps: int = 2) -> dict:
    """`dash-fast train --model DIR` (fp32, CPU) on the arithmetic task; returns the start-up line, the
    summary and the step records."""
    from dash_fast.embedded.tiny import TinyConfig, make_task, write_jsonl

    model = save_family(family, os.path.join(out, "model"))
    train, _ = make_task(TinyConfig(n_terms=2, max_operand=9, n_train=32, n_test=1), seed=0)
    write_jsonl(os.path.join(out, "train.jsonl"), train)
    run = subprocess.run(
        [sys.executable, "-m", "dash_fast.cli", "train", "--model", model, "--dataset", os.path.join(out, "train.jsonl"),
         "--output-dir", os.path.join(out, "run"), "--max-steps", str(steps), "--device", "cpu", "--tau", "none",
         "--beta", "0.001",  # a forward every step, even when the random model's rewards carry no signal
         "dtype=float32", "prompts_per_step=2", "group_size=4", "max_completion_tokens=8", "report_to=none",
         "disable_tqdm=true", "temperature=0.8"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("dash-fast: rollout engine:"))
    with open(os.path.join(out, "run", "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        records = [json.loads(r) for r in f if r.strip()]
    return {"line": line, "summary": summary, "records": records}


@pytest.mark.parametrize("family", ["gemma", "olmo2", "gemma3_text"])
def test_a_family_trains_through_the_cli_and_reports_agreement(tmp_path, family):
    """From outside: the CLI trains the saved model, names its engine path in the start-up line and
    summary.json, and every step reports a sampler-vs-trainer log-prob difference <= 1e-3 (fp32)."""
    res = train_through_cli(family, str(tmp_path))
    path = res["summary"]["engine_path"]
    assert res["line"].startswith(f"dash-fast: rollout engine: {path}; training forward: ")
    assert path.startswith("torch static fast path") == (FAMILIES[family][2] is None)
    assert len(res["records"]) == 2
    for r in res["records"]:
        assert r["sampling/sampling_logp_difference/max"] <= 1e-3, r


if __name__ == "__main__":  # python tests/engines/test_families.py OUT_DIR: every family through the CLI, a table
    import tempfile

    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    for family in FAMILIES:
        res = train_through_cli(family, os.path.join(out, family))
        diffs = [(r["sampling/sampling_logp_difference/mean"], r["sampling/sampling_logp_difference/max"])
                 for r in res["records"]]
        print(f"{family:12s} {res['summary']['engine_path']:70s} {res['summary']['train_forward_path']:14s} "
              + " ".join(f"{m:.1e}/{x:.1e}" for m, x in diffs), flush=True)


@pytest.mark.parametrize("family", ["qwen2", "olmo2"])
@pytest.mark.parametrize("hidden", [32, 512])
def test_the_memory_plan_counts_a_packed_copy_exactly_when_the_engine_makes_one(family, hidden):
    """The plan's `packed_weights` follows the default engine's own choice (static_decode.packs_by_default),
    whatever the width, the family (OLMo2's post-norm layers stay plain) and the generate's length."""
    from dash_fast import memory_plan as mp
    from dash_fast.engines.static_decode import PACKED_MIN_NEW_TOKENS, StaticDecoder

    name, own, _ = FAMILIES[family]
    import transformers

    config = getattr(transformers, name)(**{**COMMON, **own, "hidden_size": hidden, "num_hidden_layers": 1})
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    decoder, shape = StaticDecoder(model), mp.model_shape(model)
    for tokens in (PACKED_MIN_NEW_TOKENS - 1, PACKED_MIN_NEW_TOKENS):
        run = mp.RunShape(device="cpu", dtype="float32", rows=4, generation_rows=4, group_size=2, prompt_tokens=8,
                          completion_tokens=tokens, micro_batch_tokens=64)
        assert (mp.plan(shape, run).items["packed_weights"] > 0) == decoder.packs(tokens)
    packs_somewhere = decoder.packs(PACKED_MIN_NEW_TOKENS)
    oned_nn = packed_gemm_unavailable(torch.device("cpu"), torch.float32) is None
    assert packs_somewhere == (oned_nn and hidden >= 512 and family != "olmo2")
