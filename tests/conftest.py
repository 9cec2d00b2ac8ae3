"""Shared fixtures. The test files sit in area folders (unit, ops, engines, rewards, trl_adapter, integration);
this folder holds what several of them share (helpers.py, kernel_cases.py, cli_runs.py, plain_json.py,
readme_commands.py, data/), the scripts run by hand, and goes on sys.path here so `from helpers import ...`
works from any folder and from child processes (helpers.checkout_env).

Imports are rootdir-relative: no `__init__.py` anywhere under tests/, so pytest imports each test file by
its basename with its own folder on sys.path; basenames must stay unique across folders (pytest refuses
duplicates loudly), and no folder may be named like an importable package (`kernels`, `trl`), which this
folder on sys.path would let it shadow as a namespace package.

Nothing heavy is imported here: which of torch and dash_fast a test process loads first is the tests' own
business (tests/unit/test_cpu_threads.py)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def restore_affinity():
    """Give the process back every CPU and its thread count after a test that binds or widens."""
    import torch

    from dash_fast.runtime.cpus import INITIAL_CPUS, bind_process

    yield
    bind_process(set(INITIAL_CPUS))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(INITIAL_CPUS))))
