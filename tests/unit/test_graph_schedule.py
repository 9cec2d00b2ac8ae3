"""The CUDA-graph capture schedule of the embedded engine, on CPU with the capture injected.

A real capture needs CUDA; what these tests hold is the schedule around it: which buckets get captured,
on which thread, that a sampler in a worker thread never captures (it replays, or runs the step
eagerly), that `prepare` reserves the cache once so no later call reallocates it (which would drop every
graph), and that the graph path gives the eager path's tokens. The stand-in "graph" runs the captured step
again on replay and copies into the captured output, which is what a replay of static inputs does.
Whether real graphs capture and replay correctly is tests/ops/test_gpu.py's job (GPU only).
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import fake_capture, prompts, tiny_model

from dash_fast.engines.base import SamplingParams
from dash_fast.engines.torch_engine import TorchEngine, graph_buckets

PARAMS = SamplingParams(temperature=0.8, top_k=10, max_new_tokens=10, stop_token_ids=(3, 4, 9), seed=3)


def graph_engine(model) -> TorchEngine:
    eng = TorchEngine(model, 0, kv_cache="static", cuda_graphs=True)
    eng.capture = fake_capture
    return eng


def in_thread(fn):
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            box["err"] = e

    t = threading.Thread(target=run, name="sampler-worker")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


def test_buckets_are_powers_of_two_capped_at_the_capacity():
    assert graph_buckets(16) == [16, 8, 4, 2, 1]
    assert graph_buckets(12) == [12, 8, 4, 2, 1]
    assert graph_buckets(1) == [1]


def test_prepare_captures_every_bucket_on_the_main_thread_and_the_worker_only_replays():
    model = tiny_model()
    eager = TorchEngine(model, 0, kv_cache="static", cuda_graphs=False)
    eng = graph_engine(model)
    batch = [p for p in prompts(6) for _ in range(2)]  # 12 rows; a later call of 6 rows reuses the cache
    assert eng.prepare(12, 16 + PARAMS.max_new_tokens) == [12, 8, 4, 2, 1]
    dec = eng.static_decoder
    k_before = dec.k[0]
    assert [t for _, t in dec.capture_log] == ["MainThread"] * 5
    no_stop = SamplingParams(temperature=0.8, top_k=10, max_new_tokens=10, seed=5)
    for rows, params in ((batch, PARAMS), (batch[:6], no_stop)):  # 6 rows: the bucket of 8 (the cache's)
        out = in_thread(lambda rows=rows, params=params: eng.generate(rows, params))
        assert out.stats["graph_misses"] == 0  # every bucket met had a graph
        assert out.completion_token_lists() == eager.generate(rows, params).completion_token_lists()
    assert len(dec.capture_log) == 5, "the worker captured"
    assert dec.k[0] is k_before, "the cache was reallocated (that drops every graph)"


def test_without_prepare_a_worker_runs_eagerly_instead_of_capturing():
    model = tiny_model()
    eager = TorchEngine(model, 0, kv_cache="static", cuda_graphs=False)
    eng = graph_engine(model)
    batch = [p for p in prompts(4) for _ in range(2)]
    out = in_thread(lambda: eng.generate(batch, PARAMS))
    assert eng.static_decoder.capture_log == []
    assert out.stats["graph_misses"] == out.stats["decode_steps"] - 1  # every decode step (prefill aside)
    assert out.completion_token_lists() == eager.generate(batch, PARAMS).completion_token_lists()
    # on the main thread, with no worker running, a missing bucket is captured where it is met
    again = eng.generate(batch, PARAMS)
    assert again.stats["graph_misses"] == 0 and eng.static_decoder.capture_log
    assert {t for _, t in eng.static_decoder.capture_log} == {"MainThread"}
    assert again.completion_token_lists() == out.completion_token_lists()


def test_no_capture_on_the_main_thread_while_a_worker_samples():
    eng = graph_engine(tiny_model())
    eng.prepare(4, 32)
    dec = eng.static_decoder
    dec.workers = 1  # what generate() counts while it runs in a worker thread
    with pytest.raises(RuntimeError, match="main thread"):
        eng.prepare(8, 32)
    dec.graphs.clear()
    dec.decode_graph(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 0)
    assert dec.graph_misses == 1 and not dec.graphs


def test_prepare_refuses_a_worker_thread():
    eng = graph_engine(tiny_model())
    with pytest.raises(RuntimeError, match="main thread"):
        in_thread(lambda: eng.prepare(4, 32))


def test_release_frees_the_cache_and_graphs_and_the_next_call_rebuilds_them():
    model = tiny_model()
    eng = graph_engine(model)
    batch = [p for p in prompts(4) for _ in range(2)]
    eng.prepare(8, 32)
    first = eng.generate(batch, PARAMS)
    eng.release()
    dec = eng.static_decoder
    assert dec.capacity == 0 and not dec.graphs and dec.key_valid.numel() == 0
    second = eng.generate(batch, PARAMS)
    assert dec.capacity == 8 and dec.graphs
    assert second.completion_token_lists() == first.completion_token_lists()


def test_prepare_is_a_plain_reserve_without_graphs():
    eng = TorchEngine(tiny_model(), 0, kv_cache="static")  # CPU, no capture injected: no graphs
    assert eng.prepare(8, 40) == []
    assert eng.static_decoder.capacity == 8 and eng.static_decoder.k[0].shape[2] == 40
    dyn = TorchEngine(tiny_model(), 0, kv_cache="dynamic")
    assert dyn.prepare(8, 40) == []
