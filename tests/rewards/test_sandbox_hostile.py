"""Hostile programs (tests/rewards/sandbox_hostile_cases.py) score 0 and stay contained, as whoever runs the
tests and, when that is root, again as a throwaway unprivileged user."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest
import sandbox_hostile_cases as hostile  # this folder is on sys.path (rootdir-relative imports)

import dash_fast.rewards.sandbox as sandbox


def _case_names() -> list[str]:
    ctx = hostile.Context()
    try:
        return list(hostile.cases(ctx))
    finally:
        ctx.close()


CASE_NAMES = _case_names()


@pytest.fixture(scope="module")
def ctx():
    c = hostile.Context()
    yield c
    c.close()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_program_scores_zero_and_is_contained(ctx, name):
    assert hostile.check(sandbox, ctx, name, hostile.cases(ctx)[name]) is None


def _runnable_python(user: str) -> str | None:
    """An interpreter the user can start (the trainer's may live under /root, mode 0700)."""
    for exe in (os.path.realpath(sys.executable), shutil.which("python3"), "/usr/bin/python3"):
        if exe and subprocess.run(["runuser", "-u", user, "--", exe, "-c", "import json, ctypes"],
                                  capture_output=True, timeout=30).returncode == 0:
            return exe
    return None


@pytest.fixture
def throwaway_user():
    if os.geteuid() != 0:
        pytest.skip("not root: the parametrized cases above already ran as this unprivileged user")
    if not (shutil.which("useradd") and shutil.which("runuser")):
        pytest.skip("useradd / runuser not installed: cannot create an unprivileged user")
    name = "dashsbx" + secrets.token_hex(3)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_hostile_programs_as_unprivileged_user(throwaway_user):
    python = _runnable_python(throwaway_user)
    if python is None:
        pytest.skip("no Python interpreter the unprivileged user may run")
    work = tempfile.mkdtemp(prefix="dash_hostile_user_")
    try:  # copies the user can read (the checkout may sit under /root)
        for src in (sandbox.__file__, sandbox._runner.__file__, sandbox.verdict.__file__, hostile.__file__):
            shutil.copy(src, work)
        os.chmod(work, 0o755)
        for f in os.listdir(work):
            os.chmod(os.path.join(work, f), 0o644)
        proc = subprocess.run(
            ["runuser", "-u", throwaway_user, "--", python, os.path.join(work, "sandbox_hostile_cases.py"),
             os.path.join(work, "sandbox.py")],
            capture_output=True, text=True, timeout=600, cwd=work,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] == pwd.getpwnam(throwaway_user).pw_uid != 0
    assert set(out["results"]) == set(CASE_NAMES)
    assert {k: v for k, v in out["results"].items() if v is not None} == {}
