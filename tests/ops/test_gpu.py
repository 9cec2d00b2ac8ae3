"""GPU checks: skipped on machines without CUDA.

Whether they have run is in docs/status.md. They cover what the CPU suite cannot: the Triton kernels compiled and run for real (fp32 and bf16), CUDA-graph decode against
the eager step (also after in-place weight updates, which graphs must see), the overlap schedule with the
sampler on a side stream and thread against the same schedule run in order, and the trainer end to end in
bf16. `profiles/gpu_session.sh` runs them with the GPU benchmarks.
"""

from __future__ import annotations

import pytest
import torch
from helpers import length_reward, prompts

from dash_fast import DashConfig, DashTrainer
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task
from dash_fast.engines.base import SamplingParams
from dash_fast.engines.torch_engine import TorchEngine
from dash_fast.overlap import OverlapScheduler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
TINY = TinyConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, n_terms=2,
                  max_operand=19, n_train=40, n_test=8)


# ----------------------------------------------------------------------------- Triton kernels
KERNEL_CASES = {
    "on_policy_entropy": ({}, {"return_entropy": True}),
    "off_policy_clip_tau_beta": ({"off_policy": "outside"}, {"tau": 0.1, "beta": 0.05}),
    "temperature_many_tiles": ({"n": 300, "h": 256, "v": 4099, "temperature": 0.7}, {"temperature": 0.7}),
}


@pytest.mark.parametrize("bwd", ["dense", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_triton_kernels_match_the_reference_on_gpu(case, dtype, bwd):
    pytest.importorskip("triton")
    from kernel_cases import dk, make_inputs, run

    make_kw, op_kw = KERNEL_CASES[case]
    inp = make_inputs(dtype=torch.float32, **make_kw)  # as the trainer calls it: the model's dtype for the
    for k in ("hidden", "weight", "bias"):  # hidden states and lm_head, fp32 advantages / weights / log-probs
        if inp[k] is not None:
            inp[k] = inp[k].to(dtype)
    on_gpu = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    # reference in float64 on the CPU, from the very values the kernel sees
    ref_inp = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inp.items()}
    ref_loss, ref_st, ref_g = run(dk.pg_loss_ref, ref_inp, **op_kw)
    loss, st, g = run(lambda *a, **kw: dk.fused_linear_pg_loss(*a, backend="triton", bwd=bwd, **kw), on_gpu, **op_kw)
    tol = {"atol": 3e-5, "rtol": 2e-4} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 1e-2}
    grad_tol = tol if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    torch.testing.assert_close(loss.cpu().double(), ref_loss, **tol)
    assert g.keys() == ref_g.keys()
    for k in g:
        assert g[k].dtype == dtype
        torch.testing.assert_close(g[k].cpu().double(), ref_g[k], **grad_tol, msg=lambda m, k=k: f"grad {k}: {m}")
    keep = ref_inp["token_weights"] != 0
    if op_kw.get("tau") is not None:
        keep &= ref_inp["advantages"].abs() > op_kw["tau"]
    torch.testing.assert_close(st["logp"].cpu().double()[keep], ref_st["logp"][keep], **tol)
    assert st["kept_tokens"] == int(keep.sum())


# ----------------------------------------------------------------------------- CUDA-graph decode
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "seeded"])
def test_cuda_graph_decode_matches_the_eager_step(temperature):
    """float64 so that the graph's full-length masked step and the eager step agree exactly; stop tokens
    finish rows at different steps, so buckets shrink and the cache is compacted under graphs too."""
    model = build_model(build_tokenizer(), TINY, seed=0).double().to(CUDA)
    eager = TorchEngine(model, 0, kv_cache="static", cuda_graphs=False)
    graphs = TorchEngine(model, 0, kv_cache="static", cuda_graphs=True)
    params = SamplingParams(temperature=temperature, top_k=10, max_new_tokens=12, stop_token_ids=(3, 4, 9), seed=3)
    batch = [p for p in prompts(8) for _ in range(4)]  # GRPO's shape: 8 prompts x 4 rows
    a, b = eager.generate(batch, params), graphs.generate(batch, params)
    assert graphs.static_decoder.graphs, "no CUDA graph was captured"
    assert len(graphs.static_decoder.graphs) > 1, "the batch never shrank to a smaller bucket"
    assert a.completion_token_lists() == b.completion_token_lists()
    torch.testing.assert_close(b.sampling_logps, a.sampling_logps, atol=1e-10, rtol=1e-10)

    with torch.no_grad():  # an optimizer-like in-place update: the captured graphs must read the new values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a, b = eager.generate(batch, params), graphs.generate(batch, params)
    assert a.completion_token_lists() == b.completion_token_lists()
    torch.testing.assert_close(b.sampling_logps, a.sampling_logps, atol=1e-10, rtol=1e-10)


def test_graphs_captured_up_front_are_replayed_by_a_worker_thread_beside_allocations():
    """prepare() captures every bucket on the main thread; a worker then samples while this thread
    allocates and synchronises (what the training thread does under overlap=True): no capture error, no
    eager fallback, the eager path's tokens."""
    import threading

    model = build_model(build_tokenizer(), TINY, seed=0).double().to(CUDA)
    eager = TorchEngine(model, 0, kv_cache="static", cuda_graphs=False)
    graphs = TorchEngine(model, 0, kv_cache="static", cuda_graphs=True)
    params = SamplingParams(temperature=0.8, top_k=10, max_new_tokens=12, stop_token_ids=(3, 4, 9), seed=3)
    batch = [p for p in prompts(8) for _ in range(4)]
    assert graphs.prepare(len(batch), 64) == [32, 16, 8, 4, 2, 1]
    box = {}
    worker = threading.Thread(target=lambda: box.update(out=graphs.generate(batch, params)))
    worker.start()
    while worker.is_alive():  # the "training thread": allocations and syncs during the worker's replays
        torch.randn(256, 256, device=CUDA).sum().item()
    worker.join()
    out = box["out"]
    assert out.stats["graph_misses"] == 0
    assert {t for _, t in graphs.static_decoder.capture_log} == {"MainThread"}
    assert out.completion_token_lists() == eager.generate(batch, params).completion_token_lists()


# ----------------------------------------------------------------------------- trainer on GPU
def make_trainer(tmp_path, dtype: torch.dtype, **overrides) -> DashTrainer:
    tok = build_tokenizer()
    model = build_model(tok, TINY, seed=0).to(dtype)  # a loaded module keeps its dtype
    train, test = make_task(TINY, seed=0)
    args = dict(output_dir=str(tmp_path), device="cuda", prompts_per_step=4, group_size=4,
                max_completion_tokens=8, max_prompt_tokens=16, report_to=[], disable_tqdm=True,
                learning_rate=1e-2, filter_tau=None, max_steps=3, seed=1, eval_examples=4, eval_every=0)
    args.update(overrides)
    return DashTrainer(model, length_reward, args=DashConfig(**args), train_dataset=train, eval_dataset=test,
                       processing_class=tok)


def test_overlap_on_a_side_stream_gives_the_in_order_result(tmp_path):
    """The sampler of rollout r+1 runs in a thread on its own stream beside step r's backward; the result
    must be the one of the same schedule run in order (what the CPU tests check the bookkeeping of).
    float64, where CUDA's attention and GEMMs have no run-to-run rounding differences to amplify."""
    concurrent = make_trainer(tmp_path / "concurrent", torch.float64, overlap=True, loss_impl="naive")
    assert concurrent.overlap.concurrent, "the static engine should sample on a side stream"
    concurrent.train()
    in_order = make_trainer(tmp_path / "in_order", torch.float64, overlap=True, loss_impl="naive")
    in_order.overlap = OverlapScheduler(CUDA, concurrent=False)
    in_order.train()
    rec_c = [r for r in concurrent.state.log_history if "loss" in r]
    rec_o = [r for r in in_order.state.log_history if "loss" in r]
    assert [r["rollout_lag"] for r in rec_c] == [0, 1, 1]
    assert [r["reward_mean"] for r in rec_c] == [r["reward_mean"] for r in rec_o]
    for (name, a), b in zip(concurrent.model.named_parameters(), in_order.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_trainer_runs_in_bf16_with_the_triton_loss(tmp_path):
    pytest.importorskip("triton")
    trainer = make_trainer(tmp_path, torch.bfloat16, loss_impl="fused")
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(r["grad_norm"] > 0 for r in records)  # the Triton backward reached the parameters
    assert next(trainer.model.parameters()).dtype == torch.float32  # the masters (mixed_precision.py)
    assert next(trainer.engine.model.parameters()).dtype == torch.bfloat16  # the sampler's compute copy
