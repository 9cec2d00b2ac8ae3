"""sample_next's two draws: over the top-k candidates and over the whole vocabulary, row chunks on CPU.

The candidates-only draw (`sample_among_top_k`) must pick what the whole-vocabulary draw picks for the same
uniform, and return the same log-prob; the row chunks must not change any row's result.
"""

import pytest
import torch

from dash_fast.engines import torch_engine
from dash_fast.engines.base import SamplingParams
from dash_fast.engines.torch_engine import (
    sample_among_top_k,
    sample_chunk_rows,
    sample_next,
    sample_over_vocabulary,
)

CASES = [
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=50, min_p=0.05),
    SamplingParams(temperature=0.9, top_k=8, repetition_penalty=1.3),
]


def rows_and_uniforms(vocab=3000, rows=7, draws=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).repeat_interleave(draws, 0)
    uniform = torch.rand(rows * draws, generator=g, dtype=torch.float64)
    seen = torch.rand(rows, vocab, generator=g).lt(0.3).repeat_interleave(draws, 0)
    return logits, uniform, seen


def penalised(logits, seen, params):
    if params.repetition_penalty == 1.0:
        return logits
    p = params.repetition_penalty
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"k{p.top_k}-p{p.top_p}-minp{p.min_p}-rep{p.repetition_penalty}")
def test_the_top_k_draw_picks_what_the_whole_vocabulary_draw_picks(params):
    logits, uniform, seen = rows_and_uniforms()
    drawn = penalised(logits, seen, params)
    fast = sample_among_top_k(logits, drawn, params, uniform)
    assert fast is not None
    full = sample_over_vocabulary(logits, drawn, params, uniform)
    assert torch.equal(fast[0], full[0])
    torch.testing.assert_close(fast[1], full[1], rtol=0, atol=1e-4)
    exact = torch.log_softmax(logits.double() / params.temperature, -1).gather(1, fast[0][:, None])[:, 0]
    torch.testing.assert_close(fast[1].double(), exact, rtol=0, atol=1e-5)  # the full, unpenalised distribution


def test_a_tie_at_the_kth_value_keeps_every_tied_token():
    logits = torch.log(torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.1]])).repeat(2000, 1)
    params = SamplingParams(temperature=1.0, top_k=2)
    uniform = torch.linspace(0, 1 - 1e-9, 2000, dtype=torch.float64)
    fast = sample_among_top_k(logits, logits, params, uniform)
    assert fast is not None and torch.equal(fast[0], sample_over_vocabulary(logits, logits, params, uniform)[0])
    tokens, _ = sample_next(logits, params, uniform)
    assert set(tokens.tolist()) == {0, 1, 2, 3}  # as transformers' TopKLogitsWarper: every token >= the k-th
    wide = torch.full((2000, 5000), -5.0)  # 4 tokens above a tie of 40 at the 5th value: candidates widen to hold it
    wide[:, :4], wide[:, 100:140] = 1.0, 0.0
    top5 = SamplingParams(temperature=1.0, top_k=5)
    fast = sample_among_top_k(wide, wide, top5, uniform)
    assert fast is not None and torch.equal(fast[0], sample_over_vocabulary(wide, wide, top5, uniform)[0])
    assert set(fast[0].tolist()) == set(range(4)) | set(range(100, 140))
    flat = torch.zeros(4, 5000)  # more ties than TOP_K_TIES_MAX: the whole-vocabulary draw
    assert sample_among_top_k(flat, flat, params, uniform[:4]) is None
    assert set(sample_next(flat, params, uniform[:4])[0].tolist()) <= set(range(5000))


@pytest.mark.parametrize("params", CASES[:3], ids=["k5", "k20-top_p", "k50-min_p"])
def test_bf16_logits_tie_often_and_take_the_top_k_draw(params):
    """bf16 logits (a bf16 sampler's) over Qwen's 151936 tokens often tie at the k-th value. The top-k draw
    widens to hold the ties and picks what the whole-vocabulary draw picks (with top-p, up to the order of
    tokens tied at its cut)."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 151936, generator=g) * 4).to(torch.bfloat16).float().repeat_interleave(8, 0)
    uniform = torch.rand(len(logits), generator=g, dtype=torch.float64)
    top = torch.topk(logits, params.top_k + 1, dim=-1).values
    assert bool((top[:, -2] == top[:, -1]).any())  # the case at hand: rows that tie at the k-th value
    fast = sample_among_top_k(logits, logits, params, uniform)
    assert fast is not None
    full = sample_over_vocabulary(logits, logits, params, uniform)
    differ = fast[0] != full[0]  # only where top-p's cut falls inside a tie, whose order neither draw fixes
    assert differ.float().mean() < 0.05 and (params.top_p < 1.0 or not differ.any())
    rows = torch.arange(len(logits))
    assert torch.equal(logits[rows, fast[0]][differ], logits[rows, full[0]][differ])
    torch.testing.assert_close(fast[1], full[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=0, top_p=0.9),
                                    SamplingParams(temperature=0.8, top_k=0), SamplingParams(temperature=0.0)],
                         ids=["top_p", "full", "greedy"])
def test_row_chunks_give_each_row_what_it_gets_alone(params):
    logits, uniform, _ = rows_and_uniforms(vocab=151936, rows=11, draws=1)
    assert 1 < sample_chunk_rows(logits) < 11  # several chunks, the last one shorter
    tokens, logps = sample_next(logits, params, uniform)
    for i in range(len(logits)):
        one = sample_next(logits[i : i + 1], params, uniform[i : i + 1])
        assert tokens[i] == one[0][0]
        torch.testing.assert_close(logps[i], one[1][0], rtol=0, atol=1e-5)  # fp32 reductions split otherwise


def test_a_small_vocabulary_is_sampled_in_one_chunk():
    assert sample_chunk_rows(torch.zeros(512, 40)) >= 512  # the embedded default: no per-chunk overhead
    assert sample_chunk_rows(torch.zeros(256, 151936)) == 4


def test_the_top_k_draw_is_the_one_sample_next_takes(monkeypatch):
    logits, uniform, _ = rows_and_uniforms(rows=2, draws=4)
    calls = []
    monkeypatch.setattr(torch_engine, "sample_over_vocabulary", lambda *a: calls.append(a) or (None, None))
    sample_next(logits, SamplingParams(temperature=0.9, top_k=50), uniform)
    assert calls == []
