"""cpu_threads=auto and the OpenMP wait policy (runtime/device.py): every usable CPU whatever the import order,
the spin turned off (PASSIVE) or shortened (torch imported first), and a user's own setting wins. The speed
side is bench/contention.py (no timed tests; the spin test compares CPU time, not speed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import checkout_env, make_trainer

from dash_fast.config import ConfigError, DashConfig, make_config
from dash_fast.runtime import device as device_setup
from dash_fast.runtime.cpus import bind_process
from dash_fast.runtime.device import (
    SPINNING_NOTICE,
    apply_cpu_threads,
    cpu_thread_count,
    loaded_libgomp,
    set_openmp_wait_policy,
)


@pytest.fixture(autouse=True)
def keep_threads_and_affinity(monkeypatch):
    threads, cpus, wait = torch.get_num_threads(), os.sched_getaffinity(0), device_setup.openmp_wait
    yield
    torch.set_num_threads(threads)
    bind_process(cpus)  # every thread: apply_cpu_threads bound them all
    device_setup.openmp_wait = wait


def test_wait_policy_is_set_only_before_torch_is_loaded_and_never_over_the_users():
    env: dict[str, str] = {}
    assert set_openmp_wait_policy(env, modules={}) == "set" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert set_openmp_wait_policy(env, modules={"torch": torch}) == "too_late" and env == {}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(user)
        assert set_openmp_wait_policy(env, modules={}) == "user" and env == user
    assert device_setup.openmp_wait == "user"  # kept for cpu_threads=auto


def openmp_settings(code: str, **env: str) -> str:
    """What libgomp itself read (OMP_DISPLAY_ENV=VERBOSE prints its settings when torch loads it)."""
    clean = {k: v for k, v in os.environ.items() if k not in device_setup.WAIT_VARS + device_setup.THREAD_VARS}
    proc = subprocess.run([sys.executable, "-c", code], env=checkout_env(clean, OMP_DISPLAY_ENV="VERBOSE", **env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_importing_dash_fast_first_turns_libgomps_spin_off_and_torch_first_cannot():
    run = "import torch; torch.ones(4).sum()"
    assert "GOMP_SPINCOUNT = '0'" in openmp_settings(f"import dash_fast; {run}")
    assert "GOMP_SPINCOUNT = '300000'" in openmp_settings(f"{run}; import dash_fast")  # libgomp's default
    assert "GOMP_SPINCOUNT = '1234'" in openmp_settings(f"import dash_fast; {run}", GOMP_SPINCOUNT="1234")


def test_auto_thread_count():
    env: dict[str, str] = {}
    assert cpu_thread_count("auto", 4, env) == (4, "cpu_threads=auto: one per usable CPU (4)")
    assert cpu_thread_count("auto", 1, env)[0] == 1
    assert cpu_thread_count(3, 4, env)[0] == 3  # an explicit count wins
    assert cpu_thread_count(None, 4, env)[0] is None  # torch's own count
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        threads, why = cpu_thread_count("auto", 4, {var: "3"})
        assert threads is None and var in why  # left to torch, which read it


def test_torch_first_gets_every_cpu_and_libgomps_short_spin():
    """A TRL-style script (torch imported before dash_fast: libgomp spins 300000 times at each barrier) gets
    one thread per CPU, and its idle OpenMP workers stop burning CPU once apply_cpu_threads has run: the
    same parallel ops with sleeps between them, before and after, in one process."""
    code = """
import os, time, torch
import dash_fast
from dash_fast.runtime import device as device_setup
def cpu_over_idle_gaps():
    a = torch.randn(384, 384)
    c0 = time.process_time()
    for _ in range(120):
        a @ a
        time.sleep(0.004)  # the workers spin through the gap, or sleep
    return time.process_time() - c0
torch.set_num_threads(2)
before = cpu_over_idle_gaps()
threads, why = device_setup.apply_cpu_threads("auto", None)
print(device_setup.openmp_wait, threads, torch.get_num_threads(), before, cpu_over_idle_gaps(), why, sep="|")
"""
    clean = {k: v for k, v in os.environ.items() if k not in device_setup.WAIT_VARS + device_setup.THREAD_VARS}
    proc = subprocess.run([sys.executable, "-c", code], env=checkout_env(clean), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wait, threads, now, before, after, why = proc.stdout.strip().splitlines()[-1].split("|")
    cpus = len(os.sched_getaffinity(0))
    assert wait == "too_late" and int(threads) == int(now) == cpus
    if cpus > 1:
        assert "short spin" in why and SPINNING_NOTICE not in why
        assert float(after) < 0.5 * float(before), (before, after)  # spinning: 4-8x the CPU of the work here


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the sampler process needs two CPUs")
def test_the_sampler_process_does_not_spin_even_when_torch_came_first():
    """overlap's sampler process is the second busy process dash-fast itself runs beside the learner: its
    spawned interpreter imports dash_fast before torch, so its libgomp starts with the spin off whatever
    the training script imported first (the parent's libgomp, loaded first, prints its settings first)."""
    code = """
import torch
from dash_fast.engines.sampler_process import SamplerProcess
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer
tok = build_tokenizer()
model = build_model(tok, TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=0)
proc = SamplerProcess(model, tok.pad_token_id, threads=1)
assert proc.wait_ready(timeout=240)
proc.close()
"""
    spins = [line.split("=")[1].strip() for line in openmp_settings(code).splitlines()
             if line.strip().startswith("GOMP_SPINCOUNT")]
    assert spins == ["'300000'", "'0'"]  # the trainer (torch first), then its sampler process


def test_loaded_libgomp_prefers_torchs_own(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f0-7f1 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1\n"
                    "7f2-7f3 r-xp 0 08:01 2 /venv/site-packages/torch/lib/libgomp.so.1\n"
                    "7f4-7f5 r-xp 0 08:01 3 /usr/lib/libc.so.6\n")
    assert loaded_libgomp(str(maps)) == "/venv/site-packages/torch/lib/libgomp.so.1"
    maps.write_text("7f0-7f1 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1\n")
    assert loaded_libgomp(str(maps)) == "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    maps.write_text("7f4-7f5 r-xp 0 08:01 3 /usr/lib/libc.so.6\n")
    assert loaded_libgomp(str(maps)) is None
    assert loaded_libgomp(str(tmp_path / "absent")) is None
    if sys.platform == "linux" and torch._C.has_openmp:
        assert loaded_libgomp() is not None  # this process's torch


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_affinity_is_bound_before_auto_counts_the_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(device_setup, "openmp_wait", "set")
    first = min(os.sched_getaffinity(0))
    assert apply_cpu_threads("auto", str(first))[0] == 1
    assert os.sched_getaffinity(0) == {first} and torch.get_num_threads() == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_trainer_applies_auto_at_start_up_and_says_when_the_spin_stays(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    for n, wait in enumerate(("set", "too_late")):  # every CPU whatever the import order
        monkeypatch.setattr(device_setup, "openmp_wait", wait)
        torch.set_num_threads(1)
        make_trainer(tmp_path / str(n), max_steps=1)
        assert torch.get_num_threads() == cpus and SPINNING_NOTICE not in capsys.readouterr().out
    monkeypatch.setattr(device_setup, "shorten_openmp_spin", lambda cpus: False)  # torch not on libgomp
    make_trainer(tmp_path / "c", max_steps=1)
    assert torch.get_num_threads() == cpus and SPINNING_NOTICE in capsys.readouterr().out
    make_trainer(tmp_path / "d", max_steps=1, cpu_threads=1)
    assert torch.get_num_threads() == 1 and SPINNING_NOTICE not in capsys.readouterr().out  # 1 thread: no barrier
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    make_trainer(tmp_path / "e", max_steps=1)
    assert torch.get_num_threads() == 2  # the user's OMP_NUM_THREADS: untouched


def test_cpu_threads_config_values():
    assert DashConfig().cpu_threads == "auto"
    assert [make_config(overrides=[f"cpu_threads={v}"]).cpu_threads for v in ("auto", "2", "none")] == ["auto", 2, None]
    assert DashConfig(cpu_threads="3").cpu_threads == 3
    for bad in ("fast", 0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="config: cpu_threads="):
            DashConfig(cpu_threads=bad)


def test_grpo_config_takes_the_cpu_runtime_keys():
    from dash_fast import GRPOConfig

    base = dict(output_dir="x", per_device_train_batch_size=4, num_generations=2)
    cfg = GRPOConfig(**base).to_dash_config(n_train=8)
    assert (cfg.cpu_threads, cfg.cpu_affinity, cfg.sampler_cores, cfg.bind_cpus, cfg.cpu_sampler) == \
        ("auto", None, None, False, "process")
    keys = dict(cpu_threads=1, cpu_affinity="0", sampler_cores=1, bind_cpus=True, cpu_sampler="thread")
    cfg = GRPOConfig(**base, **keys).to_dash_config(n_train=8)
    assert {k: getattr(cfg, k) for k in keys} == keys
    assert GRPOConfig(**base, extra={"cpu_threads": 1}).to_dash_config(n_train=8).cpu_threads == 1
    with pytest.raises(ConfigError, match="cpu_threads="):
        GRPOConfig(**base, cpu_threads="fast").to_dash_config(n_train=8)
