"""resident_bytes: what of a model's parameters is in the resident set when the memory plan measures the
process. Weights memory-mapped from a checkpoint (transformers' loading) page in on first use, so the plan's
`runtime` item (the process without its weights) must not subtract them before then."""

import sys

import pytest
import torch

from dash_fast.runtime.memory_budget import process_rss, resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
MB = 1 << 20


def test_a_mapped_tensor_counts_what_was_touched_and_an_anonymous_one_counts_whole(tmp_path):
    path = tmp_path / "weights.bin"
    torch.arange(8 * MB, dtype=torch.float32).numpy().tofile(path)  # 32 MB, in the page cache now
    mapped = torch.from_file(str(path), shared=False, size=8 * MB, dtype=torch.float32)
    assert resident_bytes([mapped]) < 2 * MB  # mapped, not yet read: not in this process's resident set
    mapped[: 4 * MB].sum()  # the first half paged in
    assert 15 * MB < resident_bytes([mapped]) < 18 * MB
    assert resident_bytes([mapped, mapped[:10], mapped[4 * MB:]]) == resident_bytes([mapped])  # one storage once
    anonymous = torch.ones(3 * MB)
    assert resident_bytes([anonymous]) == 12 * MB
    assert resident_bytes([anonymous, mapped]) == 12 * MB + resident_bytes([mapped])


def test_the_plans_runtime_excludes_only_resident_weights(tmp_path):
    """A model loaded from safetensors (mapped) and one whose weights were touched: the start-up plan's runtime
    is the process without them in both cases, not 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dash_fast import memory_plan as mp
    from dash_fast.config import DashConfig

    config = Qwen2Config(vocab_size=50000, hidden_size=768, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)  # ~200 MB of fp32 weights
    model = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = DashConfig(model=str(tmp_path), memory_budget_gb=1000.0)
    before = mp.startup_plan(model, cfg, "cpu", "float32", verbose=False).items["runtime"]
    assert before >= process_rss() - resident_bytes(model.parameters()) - 32 * MB > 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0)  # every weight written: resident, anonymous
    assert resident_bytes(model.parameters()) >= weights * 0.99
    after = mp.startup_plan(model, cfg, "cpu", "float32", verbose=False).items["runtime"]
    assert abs(after - before) < 32 * MB  # the same process either way
