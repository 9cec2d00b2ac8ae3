"""The sandbox contains hostile programs: each test would fail if its containment layer broke.

Tests named *_os_layer run with the audit hook off, to show the OS layer (fresh uid, rlimits,
network namespace) holds on its own; they are skipped where that layer is not available.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
import time

import pytest

from dash_fast.sandbox import UID_BASE, UID_RANGE, run_many, run_python, sandbox_capabilities

ADD = "def add(a, b):\n    return a + b\n"
CAPS = sandbox_capabilities()
needs_uid = pytest.mark.skipif(not CAPS["uid_switch"], reason="needs root to run programs under a fresh uid")
needs_netns = pytest.mark.skipif(not CAPS["netns"], reason="network namespaces unavailable")


def sandbox_pids() -> list[int]:
    """Live (non-zombie) processes running under a sandbox uid."""
    pids = []
    for status_path in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(status_path) as f:
                fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except OSError:
            continue
        uid = int(fields["Uid"].split()[0])
        if UID_BASE <= uid < UID_BASE + UID_RANGE and not fields["State"].strip().startswith("Z"):
            pids.append(int(status_path.split("/")[2]))
    return pids


def test_correct_program_passes():
    r = run_python(ADD + "print('noise')", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert (r.passed, r.n_passed, r.n_total, r.status) == (True, 2, 2, "ok")


def test_wrong_program_fails_and_counts_tests():
    r = run_python("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3", "assert add(1, 0) == 1"])
    assert (r.passed, r.n_passed, r.n_total, r.status) == (False, 1, 2, "ok")
    assert "test 0 failed: AssertionError" in r.stderr_tail


def test_syntax_error_and_top_level_exception_score_zero():
    for code in ("def add(a, b) return a", ADD + "raise SystemExit(0)"):
        r = run_python(code, ["assert add(1, 2) == 3"])
        assert (r.passed, r.n_passed, r.status) == (False, 0, "error")


def test_program_cannot_forge_a_verdict():
    # Prints what a verdict line looks like (without the secret nonce), then exits before the tests.
    code = ADD + "import os\nprint('x ok 1 1')\nos.write(3, b'\\nx ok 1 1\\n')\nos._exit(0)\n"
    r = run_python(code, ["assert add(1, 2) == 3"])
    assert not r.passed and r.status == "error"


def test_stdlib_imports_work():
    code = "import heapq, statistics, fractions\nfrom collections import Counter\ndef f(xs):\n    return heapq.nsmallest(1, xs)[0]\n"
    assert run_python(code, ["assert f([3, 1, 2]) == 1"]).passed


def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run_python("while True:\n    pass\n", ["assert True"], timeout_s=1.0)
    assert r.status == "timeout" and not r.passed and r.n_passed == 0
    assert time.monotonic() - start < 1.0 + 1.5


def test_sleep_times_out_on_wall_clock():
    r = run_python("import time\ntime.sleep(30)\n", ["assert True"], timeout_s=0.5)
    assert r.status == "timeout" and r.wall_s < 2.0


def test_memory_hog_is_contained():
    r = run_python("x = bytearray(2 * 1024**3)\n", ["assert True"], memory_mb=256)
    assert not r.passed and r.status in ("error", "killed")
    assert "MemoryError" in r.stderr_tail or r.status == "killed"


def test_output_flood_does_not_grow_parent_memory():
    r = run_python("while True:\n    print('x' * 10000)\n", ["assert True"], timeout_s=1.0, file_size_mb=1)
    assert not r.passed and len(r.stderr_tail) <= 4000


def test_fork_bomb_blocked_by_audit_hook():
    r = run_python("import os\nwhile True:\n    os.fork()\n", ["assert True"], timeout_s=2.0)
    assert not r.passed and r.status == "error" and "os.fork blocked" in r.stderr_tail
    r = run_python("import subprocess\nsubprocess.run(['true'])\n", ["assert True"])
    assert not r.passed and "blocked" in r.stderr_tail


@needs_uid
def test_fork_bomb_contained_by_os_layer_and_no_stray_processes():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    r = run_python(bomb, ["assert True"], timeout_s=1.0, max_procs=8, audit=False)
    assert not r.passed and r.status == "timeout"
    assert time.monotonic() - start < 4.0
    assert sandbox_pids() == []


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))  # loopback only
    srv.listen(1)
    srv.settimeout(0.2)
    yield srv, srv.getsockname()[1]
    srv.close()


def _accepted(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except (TimeoutError, OSError):
        return False
    conn.close()
    return True


def _connect_code(port: int) -> str:
    return f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n" + ADD


def test_network_blocked(listener):
    srv, port = listener
    r = run_python(_connect_code(port), ["assert add(1, 2) == 3"])
    assert not r.passed and r.status == "error" and not _accepted(srv)


@needs_netns
def test_network_blocked_by_os_layer(listener):
    srv, port = listener
    r = run_python(_connect_code(port), ["assert add(1, 2) == 3"], audit=False)
    assert not r.passed and r.status == "error" and not _accepted(srv)
    assert "unreachable" in r.stderr_tail.lower()


def _write_code(target: str) -> str:
    return f"with open({target!r}, 'w') as f:\n    f.write('pwned')\n" + ADD


@pytest.fixture
def world_writable_dir():
    """A directory anyone can reach and write (under /tmp), so only the audit hook stands in the way."""
    path = tempfile.mkdtemp(prefix="dash_sandbox_test_")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_write_outside_workdir_blocked(world_writable_dir):
    target = os.path.join(world_writable_dir, "escape.txt")
    r = run_python(_write_code(target), ["assert add(1, 2) == 3"])
    assert not r.passed and r.status == "error" and not os.path.exists(target)
    r = run_python(
        f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')\n", ["assert True"]
    )
    assert not r.passed and not os.path.exists(target)


@needs_uid
def test_write_outside_workdir_blocked_by_os_layer(tmp_path):
    target = tmp_path / "escape.txt"  # tmp_path belongs to root
    r = run_python(_write_code(str(target)), ["assert add(1, 2) == 3"], audit=False)
    assert not r.passed and r.status == "error" and not target.exists()


def test_writes_inside_workdir_allowed_and_workdir_removed():
    code = "import os\nopen('scratch.txt', 'w').write('ok')\nprint('WORKDIR=' + os.getcwd())\n"
    r = run_python(code, ["assert open('scratch.txt').read() == 'ok'"])
    assert r.passed, r.stderr_tail
    workdir = r.stderr_tail.split("WORKDIR=")[1].split()[0]
    assert os.path.basename(workdir).startswith("dash_sandbox_") and not os.path.exists(workdir)


def test_run_many_keeps_order_and_runs_concurrently():
    jobs = [(f"def f():\n    return {i}\n", [f"assert f() == {i}"]) for i in range(6)]
    jobs.append(("import time\ntime.sleep(1)\ndef f():\n    return 0\n", ["assert f() == 1"]))
    jobs.append(("import time\ntime.sleep(1)\ndef f():\n    return 0\n", ["assert f() == 0"]))
    start = time.monotonic()
    results = run_many(jobs, max_workers=2)
    assert [r.passed for r in results] == [True] * 6 + [False, True]
    assert time.monotonic() - start < 1.9  # the two sleepers overlap
    assert run_many([]) == []
