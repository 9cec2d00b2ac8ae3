"""From the repository root, nothing of ours shadows an installed package.

transformers imports Hugging Face's `kernels` package whenever a model class is imported; the repository's
top-level `kernels/` folder must stay a plain folder (no `__init__.py`) so `import kernels` run from the root
finds the installed package, and the project's own ops are importable only as `dash_kernels`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT as ROOT


def run_from_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` with the repository root first on sys.path, as `python -m pytest` / a bench script has."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_top_level_package_named_like_an_installed_one():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow HF's `kernels`"
    assert (ROOT / "kernels" / "dash_kernels" / "__init__.py").exists()


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face `kernels` not installed")
def test_import_kernels_from_root_is_the_installed_package():
    proc = run_from_root("import json, kernels; print(json.dumps(kernels.__file__))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    where = Path(json.loads(proc.stdout.strip().splitlines()[-1]) or "").resolve()
    assert ROOT / "kernels" not in [where, *where.parents], f"`import kernels` resolved to the repo: {where}"


def test_transformers_model_class_imports_from_root():
    proc = run_from_root("from transformers import Qwen2ForCausalLM, LlamaConfig; print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_dash_kernels_imports_from_root():
    proc = run_from_root("import dash_kernels; print(dash_kernels.fused_linear_pg_loss.__name__)")
    assert proc.returncode == 0 and "fused_linear_pg_loss" in proc.stdout, proc.stderr[-2000:]
