"""bench/e2e.py and bench/paper.py run end to end in --smoke mode (tiny model, 2 steps) and write their
results with the expected columns and rows, so the scripts cannot silently rot."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from helpers import REPO_ROOT as ROOT

sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402


def _run(script: str, tmp_path: Path) -> str:
    cmd = [sys.executable, str(ROOT / "bench" / script), "--smoke", "--results-dir", str(tmp_path / "results"),
           "--workdir", str(tmp_path / "warm")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.COLUMNS
        return list(reader)


def test_e2e_and_paper_smoke(tmp_path):
    out = _run("e2e.py", tmp_path)
    rows = _rows(tmp_path / "results" / "e2e.csv")
    providers = ["dash", "grpo", "dash_overlap", "grpo_overlap"]
    if importlib.util.find_spec("trl") is not None:
        providers.append("trl")
    for prov in providers:
        metrics = {r["metric"] for r in rows if r["provider"] == prov}
        assert {"step_time", "time_per_1k_tokens", "time_generate", "time_backward", "time_optimizer", "time_sync",
                "heldout_accuracy"} <= metrics, (prov, metrics)
        step = next(r for r in rows if r["provider"] == prov and r["metric"] == "step_time")
        assert 0 < float(step["p20"]) <= float(step["p50"]) <= float(step["p80"])
        curve = [r for r in rows if r["provider"] == prov and r["metric"] == "heldout_accuracy"]
        assert len(curve) == 2 and all(0 <= float(r["p50"]) <= 1 for r in curve)  # step 0 and step 2
    assert any(r["metric"] == "step time speed-up" for r in rows)
    assert "dash_vs_grpo: step time speed-up" in out
    assert (tmp_path / "results" / "e2e.png").exists()

    _run("paper.py", tmp_path)  # reuses the warm start built above
    md = (tmp_path / "results" / "paper.md").read_text()
    for heading in ("## 1. GRPO vs No-GF vs DASH", "## 2. PG vs PPO Multi vs PPO Mini", "## 3. KL vs No-KL"):
        assert heading in md
    for label in ("| GRPO |", "| No-GF |", "| DASH |", "| DASH-all |", "DASH-all vs No-GF: ", "| PG (K = 1) = DASH |", "| PPO Multi (K = 3) |",
                  "| PPO Mini (M = 8) |", "| No-KL = DASH |", "| KL |"):
        assert label in md, label
    assert "seed 0" in md
    paper_rows = _rows(tmp_path / "results" / "paper.csv")
    assert {r["provider"] for r in paper_rows} == {"GRPO", "No-GF", "DASH", "DASH-all", "DASH-refill", "PPO Multi",
                                                   "PPO Mini", "KL"}
    assert (tmp_path / "results" / "paper.png").exists()


def test_contention_smoke(tmp_path):
    """bench/contention.py's children run the real start-up paths: dash_fast imported first gets the wait
    policy and a thread per CPU, torch imported first a thread per CPU too (cpu_threads=auto)."""
    import json
    import os

    cmd = [sys.executable, str(ROOT / "bench" / "contention.py"), "--smoke", "--policies", "default,torch_first",
           "--competitors", "none", "--workdir", str(tmp_path / "warm"), "--json", str(tmp_path / "rows.json")]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["policy"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert rows["default"]["openmp_wait"] == "set" and rows["torch_first"]["openmp_wait"] == "too_late"
    assert rows["default"]["threads"] == len(os.sched_getaffinity(0)) and rows["torch_first"]["threads"] == rows["default"]["threads"]
    assert all(r["n"] == 2 and r["finished"] and r["p50"] > 0 for r in rows.values())


def test_swap_smoke(tmp_path):
    """bench/swap.py on the tiny shape: both trainers run from a torch-first script in their own process, with
    every row kept and a row of each metric per trainer in the CSV."""
    cmd = [sys.executable, str(ROOT / "bench" / "swap.py"), "--shape", "tiny", "--steps", "2", "--warmup", "0",
           "--workdir", str(tmp_path / "wd"), "--results-dir", str(tmp_path / "res")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "did not keep every row" not in out.stdout and "dash vs trl at tiny" in out.stdout
    rows = _rows(tmp_path / "res" / "swap_tiny.csv")
    assert sorted((r["provider"], r["metric"]) for r in rows) == [("dash", "peak_rss"), ("dash", "s_per_step"),
                                                                  ("dash_vs_trl", "speedup"),
                                                                  ("trl", "peak_rss"), ("trl", "s_per_step")]


def test_roofline_smoke():
    """bench/train_roofline.py runs on the tiny shape; rollout.roofline's bound is the larger of the memory
    and compute times per step, and common's bandwidth / GEMM probes return positive rates."""
    cmd = [sys.executable, str(ROOT / "bench" / "train_roofline.py"), "--shape", "tiny", "--reps", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "of the measured GEMM throughput" in out.stdout and "AdamW fused" in out.stdout
    from rollout import roofline

    dims = {"body": 100, "head": 50, "layers": 1, "heads": 1, "kv_heads": 1, "head_dim": 1}
    memory = roofline(dims, batch=1, prompt_len=1, new_tokens=2, elt=4, bandwidth=1.0, gemm=1e9)
    assert memory["bound"] == "memory" and memory["weight_bytes"] == 600
    assert memory["seconds"] == (600 + 8) + (600 + 16)  # prefill + one decode step, weights + KV at context
    compute = roofline(dims, batch=1, prompt_len=1, new_tokens=2, elt=4, bandwidth=1e12, gemm=1.0)
    assert compute["bound"] == "compute" and compute["flops"] == 2 * 150 + 4 * 2
    assert common.measure_bandwidth(mib=8, reps=1) > 0 and common.measure_gemm(8, 8, 8, reps=1) > 0
    assert compute["ceiling"] == compute["seconds"]  # no decode GEMM rate given: the bound's
    slow = roofline(dims, batch=1, prompt_len=1, new_tokens=2, elt=4, bandwidth=1e12, gemm=1.0, decode_gemm=0.5)
    assert slow["seconds"] == compute["seconds"] and slow["ceiling"] == 2 * 150 + 4 + 2 * (2 * 150 + 8)
    assert common.measure_streamed_gemm(4, 16, 32, mib=1, reps=1) > 0
    assert common.measure_streamed_gemm(4, 16, 32, mib=1, reps=1, dtype=torch.bfloat16) > 0  # a bf16 run's GEMMs


def test_roofline_accumulation_smoke():
    """bench/train_roofline.py --micro-batches: both variants timed in the same run, and their ratio."""
    cmd = [sys.executable, str(ROOT / "bench" / "train_roofline.py"), "--shape", "tiny", "--reps", "1",
           "--micro-batches", "2", "--rows", "4", "--prompt", "3", "--completion", "5"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for line in ("in_place :", "autograd :", "autograd / in_place (median):"):
        assert line in out.stdout, out.stdout


def test_e2e_shape_smoke(tmp_path):
    """bench/e2e.py --shape (bench/swap.py's machinery) on the tiny shape with the long-prompt options: both
    trainers in their own process on GSM8K-few-shot-shaped prompts of exactly --prompt-tokens tokens, every
    row kept, a per-step time, a peak RSS and the ratio in the CSV; the vLLM pair is skipped with its reason
    when vllm is missing."""
    cmd = [sys.executable, str(ROOT / "bench" / "e2e.py"), "--shape", "tiny", "--prompt-tokens", "40",
           "--completions", "8", "--prompts", "2", "--tokens", "4", "--steps", "2", "--warmup", "1",
           "--workdir", str(tmp_path / "wd"), "--results-dir", str(tmp_path / "res")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if importlib.util.find_spec("vllm") is None:
        assert "skip ['dash_vllm', 'trl_vllm']: vllm is not installed" in out.stdout
    assert "warning" not in out.stdout, out.stdout  # every row kept, prompts of 40 tokens
    assert "prompt tokens [40]" in out.stdout and "kept [1.0, 1.0]" in out.stdout
    rows = _rows(tmp_path / "res" / "e2e_tiny_p40_g8.csv")
    got = {(r["provider"], r["metric"]): r for r in rows}
    assert {("dash", "s_per_step"), ("dash", "peak_rss"), ("trl", "s_per_step"), ("trl", "peak_rss"),
            ("dash_vs_trl", "speedup")} <= set(got)
    assert float(got[("dash", "peak_rss")]["p50"]) > 0.1 and float(got[("trl", "s_per_step")]["p50"]) > 0
    speed = float(got[("trl", "s_per_step")]["p50"]) / float(got[("dash", "s_per_step")]["p50"])
    assert abs(float(got[("dash_vs_trl", "speedup")]["p50"]) - speed) < 1e-3 * speed
    assert "dash vs trl at tiny (2 prompts x 8 completions of 4 tokens, prompts of 40 tokens)" in out.stdout


def test_train_prompts_shape():
    """Long prompts are GSM8K few-shot-shaped: exactly N characters (tokens of the char-level tokenizer),
    distinct, ending in the question; N below the question's length is refused."""
    import pytest
    from swap import train_prompts

    short = train_prompts()
    assert short[0] == "10+2*3=" and len(set(short)) == len(short)
    long = train_prompts(200)
    assert len(long) == len(short) and len(set(long)) == len(long)
    assert all(len(p) == 200 and p.endswith(f"Q:{q}A:") and " " not in p for p, q in zip(long, short))
    with pytest.raises(ValueError):
        train_prompts(5)


def test_rss_phases_smoke(tmp_path):
    """bench/rss_phases.py reports a peak for start-up and for each of dash-fast's phases of every step."""
    cmd = [sys.executable, str(ROOT / "bench" / "rss_phases.py"), "--shape", "tiny", "--steps", "2",
           "--workdir", str(tmp_path / "wd")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for phase in ("trainer set-up", "rollout/generate", "train/forward", "train/backward", "optim/step"):
        assert sum(line.startswith(phase) for line in lines) >= (1 if phase == "trainer set-up" else 2), phase
    assert "overall peak" in out.stdout and "optimizer state" in out.stdout
