"""Device-dependent defaults (dtype=auto), deterministic mode, the engine prepared before overlap, and the
KV-cache release option: the CPU-checkable half. What needs CUDA (bf16 tensor-core runs, deterministic
cuBLAS, real graph capture beside a training thread) is in tests/ops/test_gpu.py / profiles/gpu_session.sh."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO_ROOT, checkout_env, fake_capture, make_trainer

from dash_fast.config import ConfigError, DashConfig
from dash_fast.runtime.device import make_deterministic, resolve_dtype


def test_dtype_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert DashConfig().dtype == "auto"
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("float32", torch.device("cuda")) == "float32"


@pytest.mark.parametrize("bad, key", [({"deterministic": True, "triton_bwd": "atomic"}, "triton_bwd"),
                                      ({"kv_cache_release": True, "overlap": True}, "kv_cache_release"),
                                      ({"triton_bwd": "fast"}, "triton_bwd")])
def test_conflicting_options_are_one_line_errors(bad, key):
    with pytest.raises(ConfigError, match=f"config: {key}="):
        DashConfig(**bad)


def test_deterministic_settings_are_cuda_only():
    assert make_deterministic(torch.device("cpu")) == []
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_fused_loss_gets_the_configured_backward(tmp_path, monkeypatch):
    import dash_kernels

    seen = []
    real = dash_kernels.fused_linear_pg_loss

    def spy(*a, **kw):
        seen.append(kw["bwd"])
        return real(*a, **kw)

    monkeypatch.setattr(dash_kernels, "fused_linear_pg_loss", spy)
    make_trainer(tmp_path, loss_impl="fused", max_steps=1, deterministic=True).train()
    assert seen and set(seen) == {"dense"}


def test_overlap_prepares_the_engine_on_the_main_thread_before_the_first_launch(tmp_path):
    # the CUDA design (a worker thread replaying graphs captured on the main thread), emulated on CPU
    trainer = make_trainer(tmp_path, overlap=True, max_steps=3, cpu_sampler="thread")
    eng = trainer.engine
    eng.cuda_graphs, eng.capture = True, fake_capture
    launches = []
    real_launch = trainer.overlap.launch

    def launch(job, sample, plan=None):
        launches.append(list(eng.static_decoder.capture_log) if eng.static_decoder else [])
        return real_launch(job, sample, plan)

    trainer.overlap.launch = launch
    trainer.train()
    rows = trainer.args.rows_per_step  # 16: buckets 16, 8, 4, 2, 1
    assert [b for b, _ in launches[0]] == [16, 8, 4, 2, 1]  # all captured once, before the first launch
    assert len(eng.static_decoder.capture_log) == 5  # and never again (no reallocation dropped them)
    assert {t for _, t in eng.static_decoder.capture_log} == {"MainThread"}
    assert eng.static_decoder.capacity == rows
    assert eng.static_decoder.k[0].shape[2] == trainer.args.max_prompt_tokens + trainer.args.max_completion_tokens


def test_kv_cache_release_frees_the_cache_after_each_rollout(tmp_path):
    trainer = make_trainer(tmp_path, kv_cache_release=True, max_steps=2)
    capacities = []
    # the learner's hook at the start of each optimizer step's accumulation: during the update, freed
    trainer.learner.hooks.step_begin.append(lambda batch: capacities.append(trainer.engine.static_decoder.capacity))
    trainer.train()
    assert capacities == [0, 0]


def test_overlap_with_the_default_fused_loss_logs_plain_numbers(tmp_path):
    """Off-policy (old log-probs from the sampler) the fused op's clip_fraction is a 0-dim tensor: the
    record must hold a float (the JSON log of a default run with overlap=True failed on it)."""
    trainer = make_trainer(tmp_path, overlap=True, loss_impl="fused", max_steps=2)
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 2 and all(type(r["clip_fraction"]) is float and type(r["kl"]) is float for r in records)


def test_gpu_session_dry_run_plumbing(tmp_path):
    """profiles/gpu_session.py --dry-run (CPU, the Triton interpreter, toy shapes) for two of its checks:
    the session's plumbing stays runnable without a GPU. The full dry run is `DRY_RUN=1 bash
    profiles/gpu_session.sh` (about two minutes here)."""
    import json
    import subprocess
    import sys
    root = REPO_ROOT
    env = checkout_env(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(root / "profiles" / "gpu_session.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", "kernels,decode"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert {r["verdict"] for r in rows} <= {"PASS", "n/a"} and sum(r["verdict"] == "PASS" for r in rows) == 3
    assert (tmp_path / "summary.md").read_text().count("\n| ") == len(rows) + 1


def test_gpu_session_real_scale_checks_dry_run(tmp_path):
    """The GPU session's real-scale checks (grouped-query attention on fused SDPA kernels, what fp32 masters
    cost, the memory plan vs the measured peak) run end to end on CPU at toy shapes; the attention equality
    row is a real check even here."""
    import json
    import os
    import subprocess
    import sys
    root = REPO_ROOT
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "profiles" / "gpu_session.py"), "--dry-run", "--out",
                           str(tmp_path), "--only", "attention,masters,plan"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    checks = [r["check"].split()[0].rstrip(":") for r in rows]
    assert checks.count("attention") == 2 and checks.count("masters") == 2 and checks.count("plan") == 1, rows
    assert [r["verdict"] for r in rows if r["bar"].startswith("runs without MATH")] == ["PASS"], rows
