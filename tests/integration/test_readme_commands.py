"""Every `dash-fast ...` line of README.md runs, shrunk onto local stand-ins (tests/readme_commands.py says how),
and exits 0 with plain-number metrics; a README command no rule covers fails here."""

from pathlib import Path

import pytest
from readme_commands import ROOT, needs_vllm, prepare, readme_commands, run_all


def test_every_readme_command_has_a_rule_or_a_marked_reason(tmp_path):
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 10  # the CLI block, the first setup line and the torchrun lines
    for i, command in enumerate(commands):
        if command.skip is None and command.words[:2] != ["dash-fast", "eval"]:  # eval needs its run: below
            prepare(command, tmp_path, i)  # raises when no rule covers it


def test_a_new_readme_command_without_a_rule_fails(tmp_path):
    readme = "```bash\ndash-fast sft --model m --dataset d.jsonl --output-dir o\n" \
             "dash-fast train --dataset unknown_data.jsonl --model m\n" \
             "dash-fast bench rollout   # [not run by tests: minutes]\n```\n"
    (tmp_path / "README.md").write_text(readme)
    commands = readme_commands(readme)
    assert [c.skip for c in commands] == [None, None, "minutes"]
    for command in commands[:2]:
        with pytest.raises(ValueError, match="no (shrink rule|stand-in)"):
            prepare(command, tmp_path, 0)
    failures = run_all(tmp_path / "work", readme=tmp_path / "README.md", log=lambda *a: None)
    assert len(failures) == 2


def test_a_two_node_torchrun_line_runs_as_two_local_agents(tmp_path):
    line = ("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id r1 "
            "-m dash_fast.cli train --output-dir runs/x parallel=fsdp2 ...")
    [command] = readme_commands(f"```bash\n{line}\n```\n")
    prep = prepare(command, tmp_path, 0)
    assert prep.kind == "torchrun" and prep.agents == 2
    launcher = prep.argv[: prep.argv.index("dash_fast.cli")]
    assert launcher[launcher.index("--nproc_per_node") + 1] == "1"
    assert launcher[launcher.index("--rdzv_endpoint") + 1].startswith("localhost:")
    assert not any(w.startswith("--master_port") for w in launcher)  # c10d's store is the endpoint


def test_readme_commands_run_and_write_plain_number_metrics(tmp_path: Path):
    log = []
    failures = run_all(tmp_path, log=log.append)
    assert not failures, "\n".join(log)
    assert sum(line.startswith("OK") for line in log) >= 10


@pytest.mark.vllm
def test_readme_vllm_commands_run_with_real_vllm(tmp_path: Path):
    pytest.importorskip("vllm")
    assert any(needs_vllm(c) for c in readme_commands((ROOT / "README.md").read_text()))
    log = []
    failures = run_all(tmp_path, log=log.append, vllm=True)
    assert not failures, "\n".join(log)
    assert sum(line.startswith("OK") for line in log) >= 1
