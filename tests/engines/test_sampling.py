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
    assert sample_among_top_k(logits, logits, params, torch.rand(2000, dtype=torch.float64)) is None
    tokens, _ = sample_next(logits, params, torch.linspace(0, 1 - 1e-9, 2000, dtype=torch.float64))
    assert set(tokens.tolist()) == {0, 1, 2, 3}  # as transformers' TopKLogitsWarper: every token >= the k-th


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
