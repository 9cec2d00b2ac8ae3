"""cpu_threads=auto and the OpenMP wait policy (device_setup.py): what gets set, in which order, when it can
take effect, and that a user's own setting wins. The speed side is bench/contention.py (no timed tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_overlap import make_trainer

from dash_fast import device_setup
from dash_fast.config import ConfigError, DashConfig, make_config
from dash_fast.device_setup import (
    SPINNING_NOTICE,
    apply_cpu_threads,
    cpu_thread_count,
    set_openmp_wait_policy,
)
from dash_fast.overlap import bind_process

ROOT = Path(__file__).resolve().parents[1]


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
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, "OMP_DISPLAY_ENV": "VERBOSE",
                          "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_importing_dash_fast_first_turns_libgomps_spin_off_and_torch_first_cannot():
    run = "import torch; torch.ones(4).sum()"
    assert "GOMP_SPINCOUNT = '0'" in openmp_settings(f"import dash_fast; {run}")
    assert "GOMP_SPINCOUNT = '300000'" in openmp_settings(f"{run}; import dash_fast")  # libgomp's default
    assert "GOMP_SPINCOUNT = '1234'" in openmp_settings(f"import dash_fast; {run}", GOMP_SPINCOUNT="1234")


def test_auto_thread_count():
    env: dict[str, str] = {}
    assert cpu_thread_count("auto", 4, "set", env) == (4, "cpu_threads=auto: one per usable CPU (4)")
    assert cpu_thread_count("auto", 4, "user", env)[0] == 4  # the user's wait policy: their call
    assert cpu_thread_count("auto", 4, "too_late", env) == (1, SPINNING_NOTICE)
    assert cpu_thread_count("auto", 1, "too_late", env)[0] == 1 and cpu_thread_count("auto", 1, "too_late", env)[1] \
        != SPINNING_NOTICE  # one CPU: nothing was given up
    assert cpu_thread_count(3, 4, "too_late", env)[0] == 3  # an explicit count wins
    assert cpu_thread_count(None, 4, "set", env)[0] is None  # torch's own count
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        threads, why = cpu_thread_count("auto", 4, "too_late", {var: "3"})
        assert threads is None and var in why  # left to torch, which read it


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_affinity_is_bound_before_auto_counts_the_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(device_setup, "openmp_wait", "set")
    first = min(os.sched_getaffinity(0))
    assert apply_cpu_threads("auto", str(first))[0] == 1
    assert os.sched_getaffinity(0) == {first} and torch.get_num_threads() == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_trainer_applies_auto_at_start_up_and_says_why_when_it_gives_cores_up(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(device_setup, "openmp_wait", "too_late")
    torch.set_num_threads(2)
    make_trainer(tmp_path / "a", max_steps=1)
    assert torch.get_num_threads() == 1 and SPINNING_NOTICE in capsys.readouterr().out
    monkeypatch.setattr(device_setup, "openmp_wait", "set")
    make_trainer(tmp_path / "b", max_steps=1)
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    assert SPINNING_NOTICE not in capsys.readouterr().out
    make_trainer(tmp_path / "c", max_steps=1, cpu_threads=1)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    make_trainer(tmp_path / "d", max_steps=1)
    assert torch.get_num_threads() == 2  # the user's OMP_NUM_THREADS: untouched


def test_cpu_threads_config_values():
    assert DashConfig().cpu_threads == "auto"
    assert [make_config(overrides=[f"cpu_threads={v}"]).cpu_threads for v in ("auto", "2", "none")] == ["auto", 2, None]
    assert DashConfig(cpu_threads="3").cpu_threads == 3
    for bad in ("fast", 0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="config: cpu_threads="):
            DashConfig(cpu_threads=bad)


def test_grpo_config_passes_cpu_threads_through():
    from dash_fast import GRPOConfig

    args = GRPOConfig(output_dir="x", per_device_train_batch_size=4, num_generations=2, extra={"cpu_threads": 1})
    assert args.to_dash_config(n_train=8).cpu_threads == 1
    assert GRPOConfig(output_dir="x", per_device_train_batch_size=4, num_generations=2).to_dash_config(
        n_train=8).cpu_threads == "auto"
