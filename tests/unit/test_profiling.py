"""Profiling hooks: the cudaProfilerStart/Stop window (faked CUDA) and `--trace`, which writes a
torch.profiler Chrome trace carrying the trainer's range names, on CPU."""

import json

import pytest
import torch

from dash_fast.cli import main
from dash_fast.runtime import profiling
from dash_fast.runtime.profiling import ProfileWindow, parse_steps

TINY_RUN = ["--seed", "1", "sft.steps=0", "tiny.hidden_size=32", "tiny.num_layers=1", "tiny.num_heads=2",
            "tiny.intermediate_size=64", "tiny.n_train=64", "tiny.n_test=8", "eval_examples=8", "prompts_per_step=4",
            "max_completion_tokens=6", "report_to=[]", "disable_tqdm=true", "updates_per_rollout=2",
            "reward_funcs=[test_profiling:distinct_chars]"]  # an untrained model scores 0 on exact_answer: no signal


def distinct_chars(completions, **columns):
    """Varies within a group for an untrained model, so each step has signal and trains (a step whose rows
    all have A = 0 makes no forward / optimizer step)."""
    return [float(len(set(c))) for c in completions]


def test_profile_window_starts_and_stops_the_cuda_profiler(monkeypatch):
    calls = []

    class CudaRt:
        def cudaProfilerStart(self):
            calls.append("start")

        def cudaProfilerStop(self):
            calls.append("stop")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: CudaRt())
    window = ProfileWindow("2:3")
    for step in range(1, 6):
        window.before_step(step)
        calls.append(step)
        window.after_step(step)
    assert calls == [1, "start", 2, 3, "stop", 4, 5]
    assert parse_steps(None) is None and parse_steps("4:9") == (4, 9)


def test_nvtx_range_pushes_with_cuda_and_labels_only_while_a_profiler_records(monkeypatch):
    """One helper for the trainer's ranges and the kernels': NVTX pushed when CUDA is present (faked here) or
    the caller says so, a torch.profiler label only inside a trace."""
    pushed, labels = [], []
    real = torch.profiler.record_function
    monkeypatch.setattr(torch.profiler, "record_function", lambda name: labels.append(name) or real(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: pushed.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: pushed.append("pop"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with profiling.nvtx_range("plain"):
        pass
    with profiling.nvtx_range("kernel", True):
        pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with profiling.nvtx_range("traced"):
            pass
    assert pushed == ["kernel", "pop", "traced", "pop"]
    assert labels == ["traced"]
    assert "traced" in [e.name for e in prof.events()]


def annotations(path) -> list[str]:
    with open(path) as f:
        trace = json.load(f)  # valid JSON
    return [e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]


@pytest.mark.slow
def test_trace_writes_a_chrome_trace_with_the_range_names(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--max-steps", "2", "--trace", *TINY_RUN]) == 0
    names = annotations(out / "trace.json")
    for name in ("rollout/generate", "rollout/reward", "train/logprob_old", "train/forward", "train/backward",
                 "optim/step", "sync/weights"):
        assert name in names, name
    assert names.count("rollout/generate") == 2 and names.count("optim/step") == 4  # 2 steps x K = 2
    assert not torch._C._autograd._profiler_enabled()  # the trace was closed: the ranges are plain again


@pytest.mark.slow
def test_trace_window_records_only_those_steps(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--max-steps", "3", "--trace", "--profile-steps", "2:2",
                 *TINY_RUN]) == 0
    names = annotations(out / "trace.json")
    assert names.count("rollout/generate") == 1 and names.count("optim/step") == 2
