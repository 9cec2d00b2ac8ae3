"""The TRL adapter's shape: no private attribute of another object read or called, no private name imported,
and the core never importing the adapter (sizes and import cycles: tests/unit/test_layout.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO_ROOT

ROOT = REPO_ROOT
TRL = ROOT / "dash_fast" / "trl"


def trl_modules() -> list[Path]:
    return sorted(TRL.glob("*.py"))


def test_trl_touches_no_private_attribute_of_another_object():
    """`x._name` only on self / cls (a TRL internal named with an underscore is defined on GRPOTrainer itself)."""
    found = []
    for path in trl_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and any(a.name.startswith("_") for a in node.names):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import a private name")
    assert not found, found


def test_core_does_not_import_the_trl_adapter():
    """Only the package root re-exports GRPOConfig / GRPOTrainer; no core module depends on dash_fast.trl."""
    importers = []
    for path in sorted((ROOT / "dash_fast").rglob("*.py")):
        if TRL in path.parents or path == ROOT / "dash_fast" / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "dash_fast.trl" or n.startswith("dash_fast.trl.") for n in names):
                importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not importers, importers
