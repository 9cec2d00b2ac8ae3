"""Shared fixtures. This folder goes on sys.path so that test files in any sub-folder can import helpers.py.
Nothing heavy is imported here: which of torch and dash_fast a test process loads first is the tests' own
business (tests/test_cpu_threads.py)."""

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
