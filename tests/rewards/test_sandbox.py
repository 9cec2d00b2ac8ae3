"""The sandbox judges tests outside the program and contains it (hostile programs:
tests/rewards/test_sandbox_hostile.py). Each test would fail if the part it names broke."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from sandbox_hostile_cases import survivors as hostile_survivors

from dash_fast.rewards import sandbox
from dash_fast.rewards.sandbox import UID_BASE, UID_RANGE, run_many, run_python

ADD = "def add(a, b):\n    return a + b\n"


def test_correct_program_passes():
    r = run_python(ADD + "print('noise')", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert (r.passed, r.n_passed, r.n_total, r.status) == (True, 2, 2, "ok")
    assert r.stderr_tail == "noise\n" and r.failures == ()


def test_wrong_program_fails_and_counts_tests():
    r = run_python("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3", "assert add(1, 0) == 1"])
    assert (r.passed, r.n_passed, r.n_total, r.status) == (False, 1, 2, "ok")
    assert r.failures == ("test 0 failed: assert failed: add(1, 2) == 3",)


def test_syntax_error_and_top_level_exception_score_zero():
    for code in ("def add(a, b) return a", ADD + "raise SystemExit(0)"):
        r = run_python(code, ["assert add(1, 2) == 3"])
        assert (r.passed, r.n_passed, r.status) == (False, 0, "error")


def test_program_cannot_forge_a_verdict():
    # Prints what verdict lines looked like, writes a well-formed result stream, exits before the tests.
    forged = b'{"code": "ok"}\n{"t": 0, "r": [["ok", ["b", true]]]}\n{"done": true}\n'
    code = ADD.replace("a + b", "a - b") + f"import os\nprint('x ok 1 1')\nos.write(4, {forged!r})\nos._exit(0)\n"
    r = run_python(code, ["assert add(1, 2) == 3"])
    assert not r.passed and r.n_passed == 0 and r.failures == ("test 0 failed: assert failed: add(1, 2) == 3",)


# (program, test, passes): each split form, once where it holds and once where it does not.
F = "import math\ndef f(x):\n    return x\n"
SPLIT_CASES = [
    (F, "assert f(3) == 3", True), (F, "assert f(3) == 4", False),
    (F, "assert f(3) != 4", True), (F, "assert f(3) != 3", False),
    (F, "assert f(True) is True", True), (F, "assert f(1) is True", False),
    (F, "assert f(False) is False", True), (F, "assert f(None) is None", True), (F, "assert f(0) is None", False),
    (F, "assert f(1)", True), (F, "assert f(0)", False), (F, "assert not f(0)", True), (F, "assert not f([1])", False),
    (F, "assert math.isclose(f(2.5), 2.5000000001)", True), (F, "assert math.isclose(f(2.5), 2.6)", False),
    (F, "assert math.isclose(f(2.5), 2.6, rel_tol=0.1)", True),
    ("from math import isclose\n" + F, "assert isclose(f(1.0), 1.0)", True),
    (F, "assert abs(f(2.5) - 2.5) < 1e-9", True), (F, "assert abs(f(2.5) - 2.6) < 1e-9", False),
    (F, "assert abs(f(2.5) - 2.5) <= 1e-9", True),
    (F, "assert set(f([2, 1, 2])) == {1, 2}", True), (F, "assert set(f([3])) == set([1])", False),
    (F, "assert sorted(f([3, 1])) == [1, 3]", True), (F, "assert sorted(f([3, 1]), reverse=True) == [1, 3]", False),
    (F, "assert 0 < f(5) < 10", True), (F, "assert 0 < f(50) < 10", False),
    (F, "assert 2 in f([1, 2])", True), (F, "assert 2 not in f([1, 2])", False),
    (F, "assert f([1, 2])[0] == 1", True), (F, "assert f((1, 2, 3))[1:] == (2, 3)", True),
    (F, "assert f((1, 2)) == (1, 2)", True), (F, "assert f([1, 2]) == (1, 2)", False),  # list != tuple, as in Python
    (F, "assert f(float('inf')) == float('inf')", True), (F, "assert f(math.inf) > 1e308", True),
    (F, "assert f(float('nan')) != f(float('nan'))", True),  # nan crosses as nan
    (F, "assert f({(1, 2): frozenset({3})}) == {(1, 2): frozenset({3})}", True),
    (F, "assert f(b'ab') == b'ab'", True), (F, "assert f(1 + 2j) == 1 + 2j", True),
    (F, "assert f(10**30) == 1000000000000000000000000000000", True),
    (F, "x = f(3)\nassert x == 3\nassert x * 2 == 6", True), (F, "x = f(3)\nassert x == 3\nassert x == 4", False),
    (F, "assert f(3) == 3, 'message'", True), (F, "assert f(3) == 3 and f(4) == 4", True),
    (F, "assert f(0) == 1 or f(2) == 2", True), (F, "assert len(f('abc')) == 3", True),
    (F, "assert [f(i) for i in range(3)] == [0, 1, 2]", True), (F, "assert f(lambda y: y > 1)(2)", True),
    ("from collections import Counter\ndef f(s):\n    return Counter(s)\n", "assert f('aab') == {'a': 2, 'b': 1}", True),
    ("from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef f():\n    return P(1, 2)\n",
     "assert f() == (1, 2)", True),
    ("def max(a, b):\n    return a\n", "assert max(3, 4) == 4", False),  # the program's own `max`
    ("def max(a, b):\n    return b\n", "assert max(3, 4) == 4", True),
]  # fmt: skip


@pytest.mark.parametrize("code,test,passes", SPLIT_CASES, ids=[c[1] for c in SPLIT_CASES])
def test_assert_forms_are_judged_in_the_parent(code, test, passes):
    r = run_python(code, [test])
    assert r.status == "ok" and r.passed is passes, (r.failures, r.stderr_tail)


def test_expected_values_never_enter_the_sandbox():
    spy = (ADD + "import sys\nf = sys._getframe(1)\nwhile f is not None:\n    if 'job' in f.f_locals:\n"
           "        print(f.f_locals['job'])\n    f = f.f_back\n")
    r = run_python(spy, ["assert add(1, 2) == 987654321", "assert math.isclose(add(2, 2), 123456.789)"])
    assert "add(1, 2)" in r.stderr_tail and "add(2, 2)" in r.stderr_tail
    assert "987654321" not in r.stderr_tail and "123456" not in r.stderr_tail


def test_unsplittable_tests_fail_with_a_reason_and_do_not_run():
    code = "def f(x):\n    return x\n"
    tests = [
        "for i in range(3):\n    assert f(i) == i",  # passes in plain exec, but judged inside the program
        "assert all(f(i) == i for i in range(3))",
        "if f(1) != 1:\n    raise AssertionError",
        "print('RAN')",  # no assert
        "assert f(1) == 1",
    ]
    r = run_python(code, tests)
    assert (r.n_passed, r.status) == (1, "ok")
    assert [why.split(": ", 1)[1] for why in r.failures] == [
        "not judged: an assert or raise inside a block is judged inside the program",
        "not judged: compares inside the program: all((f(i) == i for i in range(3)))",
        "not judged: an assert or raise inside a block is judged inside the program",
        "not judged: no top-level assert",
    ]
    assert "RAN" not in r.stderr_tail


def test_values_that_are_not_plain_data_fail():
    code = "import fractions\ndef f():\n    return fractions.Fraction(1, 2)\ndef g():\n    return range(3)\n"
    r = run_python(code, ["assert f() == 0.5", "assert g() == range(3)"])
    assert r.n_passed == 0 and all("cannot leave the sandbox" in why for why in r.failures)


@pytest.mark.parametrize("bad", [
    ["i", "1e5"], ["i", 5], ["f", "1.0; x"], ["f", 1.5], ["b", 1], ["x"], [], "s", ["s", 3], ["S", [["l", []]]],
    ["d", [[["i", "1"]]]], ["l", "abc"], ["n", None],
])  # fmt: skip
def test_decoder_rejects_anything_but_tagged_plain_data(bad):
    with pytest.raises((sandbox.verdict.Malformed, TypeError)):
        sandbox.verdict.decode(bad)


def test_decoder_round_trips_plain_data():
    value = {"a": [1, 2.5, (True, None)], (1, "x"): frozenset({b"z"}), "s": {3}, "c": 1j}
    assert sandbox.verdict.decode(sandbox._encode(value)) == value
    assert math.isnan(sandbox.verdict.decode(sandbox._encode(float("nan"))))
    assert type(sandbox.verdict.decode(sandbox._encode(True))) is bool and type(sandbox.verdict.decode(["i", "1"])) is int


def test_stdlib_imports_work():
    code = "import heapq, statistics, fractions, re\nfrom collections import Counter\ndef f(xs):\n    return heapq.nsmallest(1, xs)[0]\n"
    assert run_python(code, ["assert f([3, 1, 2]) == 1"]).passed


def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run_python("while True:\n    pass\n", ["assert True"], timeout_s=1.0)
    assert r.status == "timeout" and not r.passed and r.n_passed == 0
    assert time.monotonic() - start < 1.0 + 10  # killed at the limit, not left running (margin: a loaded machine)


def test_sleep_times_out_on_wall_clock():
    r = run_python("import time\ntime.sleep(30)\n", ["assert True"], timeout_s=0.5)
    assert r.status == "timeout" and r.wall_s < 10  # no CPU used: only the wall clock stops it before 30 s


def test_memory_hog_is_contained():
    r = run_python("x = bytearray(2 * 1024**3)\n", ["assert True"], memory_mb=256)
    assert not r.passed and r.status in ("error", "killed")
    assert "MemoryError" in r.stderr_tail or r.status == "killed"


def test_output_flood_does_not_grow_parent_memory():
    r = run_python("while True:\n    print('x' * 10000)\n", ["assert True"], timeout_s=1.0, file_size_mb=1)
    assert not r.passed and len(r.stderr_tail) <= 4000


def test_runs_under_a_fresh_uid_when_root_else_as_the_user_without_capabilities():
    code = "import os\ndef uid():\n    return os.getuid()\ndef caps():\n    return open('/proc/self/status').read().split('CapEff:')[1].split()[0]\n"
    if sandbox._init_root():
        assert run_python(code, [f"assert {UID_BASE} <= uid() < {UID_BASE + UID_RANGE}"]).passed
    else:
        assert run_python(code, [f"assert uid() == {os.getuid()}"]).passed
    assert run_python(code, ["assert caps() == '0000000000000000'"]).passed


def test_network_blocked():
    r = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\n" + ADD, ["assert add(1, 2) == 3"])
    assert not r.passed and r.status == "error" and "unreachable" in r.stderr_tail.lower()


def test_write_outside_workdir_blocked():
    target_dir = tempfile.mkdtemp(prefix="dash_sandbox_test_")
    os.chmod(target_dir, 0o777)  # anyone may write here: only the mount namespace keeps the program out
    target = os.path.join(target_dir, "escape.txt")
    try:
        r = run_python(f"open({target!r}, 'w').write('pwned')\n" + ADD, ["assert add(1, 2) == 3"])
        assert not r.passed and r.status == "error" and not os.path.exists(target)
        r = run_python(f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')\n", ["assert True"])
        assert not r.passed and not os.path.exists(target)
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)


def test_workdir_is_private_writable_and_fresh_per_program():
    code = "import os\nopen('scratch.txt', 'w').write('ok')\nopen(os.environ['HOME'] + '/h', 'w').write('h')\n"
    r = run_python(code, ["assert open('scratch.txt').read() == 'ok'", "assert os.getcwd() == '/tmp'"])
    assert r.passed, (r.failures, r.stderr_tail)
    r = run_python("import os\ndef ls():\n    return os.listdir('.')\n", ["assert ls() == []"])
    assert r.passed, r.failures  # the previous program's files are gone


def test_run_many_keeps_order_and_runs_concurrently():
    jobs = [(f"def f():\n    return {i}\n", [f"assert f() == {i}"]) for i in range(6)]
    sleeper = "import time\nt0 = time.monotonic()\ntime.sleep(1.5)\nprint(t0, time.monotonic())\ndef f():\n    return 0\n"
    jobs += [(sleeper, ["assert f() == 1"]), (sleeper, ["assert f() == 0"])]
    results = run_many(jobs, max_workers=2)
    assert [r.passed for r in results] == [True] * 6 + [False, True]
    (start_a, end_a), (start_b, end_b) = ([float(x) for x in r.stderr_tail.split()] for r in results[6:])
    assert max(start_a, start_b) < min(end_a, end_b)  # the two sleepers overlap (CLOCK_MONOTONIC is host-wide)
    assert run_many([]) == []


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="sandbox must be one of namespaces, unsafe-local, got 'docker'"):
        run_python(ADD, ["assert add(1, 2) == 3"], sandbox="docker")


FAIL_CLOSED = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sbx", sys.argv[1])
sbx = importlib.util.module_from_spec(spec); sys.modules["sbx"] = sbx; spec.loader.exec_module(sbx)
try:
    sbx.run_python("x = 1", ["assert x == 1"])
    print("RAN CONTAINED")
except sbx.SandboxUnavailable as e:
    print("REFUSED:", e)
print("UNSAFE", sbx.run_python("x = 1", ["assert x == 1", "assert x == 2"], sandbox="unsafe-local").n_passed)
"""


def test_fails_closed_where_namespaces_are_unavailable():
    # Inside a user namespace whose limit on nested user namespaces is 0 (root there is not the
    # initial namespace's root, so the sandbox must create one), namespaces cannot be made.
    probe = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -U -r unavailable here: {probe.stderr.decode()[-200:]}")
    script = "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" -I -c \"$1\" \"$2\""
    out = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", script, os.path.realpath(sys.executable), FAIL_CLOSED, sandbox.__file__],
        capture_output=True, text=True, timeout=120,
    )
    assert "REFUSED: sandbox 'namespaces' unavailable" in out.stdout, out.stdout + out.stderr
    assert "unsafe-local" in out.stdout and "user namespaces" in out.stdout
    assert "UNSAFE 1" in out.stdout  # the explicit opt-out still judges in the parent



def test_trainer_with_the_code_reward_refuses_to_start_without_containment(tmp_path, monkeypatch):
    from dash_fast import DashConfig, DashTrainer
    from dash_fast.config import ConfigError
    from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task

    tiny = TinyConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, n_train=8, n_test=4)
    tok = build_tokenizer()
    train, _ = make_task(tiny, seed=0)

    def trainer(**kw):
        args = DashConfig(output_dir=str(tmp_path), prompts_per_step=2, group_size=2, report_to=[],
                          disable_tqdm=True, reward_funcs=["code"], **kw)
        return DashTrainer(build_model(tok, tiny, seed=0), args=args, train_dataset=train, processing_class=tok)

    with pytest.raises(ConfigError, match="sandbox='docker'"):
        trainer(sandbox="docker")
    monkeypatch.setattr(sandbox, "_default_mode", "namespaces")  # restored after the test
    monkeypatch.setitem(sandbox._checked, "namespaces", "simulated: unshare EPERM")  # as where unavailable
    with pytest.raises(sandbox.SandboxUnavailable, match="simulated: unshare EPERM.*unsafe-local"):
        trainer()
    assert trainer(sandbox="unsafe-local").reward_names == ["code_reward"]
    assert sandbox._default_mode == "unsafe-local"


def test_parent_side_operations_are_bounded():
    code = "def f():\n    return 'x' * 1000\ndef g():\n    return 2 ** 4000\n"
    r = run_python(code, ["assert len(f() * 10**6) > 0", "assert g() ** 10**6 > 0", "assert len(f() * 3) == 3000"])
    assert r.n_passed == 1 and "too large" in r.failures[0] and "too large" in r.failures[1]


def test_a_forked_trainer_process_gets_its_own_fork_server():
    run_python(ADD, ["assert add(1, 2) == 3"])
    pid = os.fork()
    if pid == 0:  # the child must not talk over its parent's socket
        ok = run_python(ADD, ["assert add(1, 2) == 3"]).passed and sandbox._server.owner == os.getpid()
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert run_python(ADD, ["assert add(2, 2) == 4"]).passed


DIES_WITH_PARENT = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sbx", sys.argv[1])
sbx = importlib.util.module_from_spec(spec); sys.modules["sbx"] = sbx; spec.loader.exec_module(sbx)
code = "import ctypes, os, time\nos.fork()\nctypes.CDLL(None).prctl(15, %r, 0, 0, 0)\ntime.sleep(60)\n" % sys.argv[2].encode()
sbx.run_python(code, ["assert True"], timeout_s=60)
"""


def test_nothing_survives_a_killed_trainer():
    marker = "dashdie" + os.urandom(4).hex()
    trainer = subprocess.Popen([sys.executable, "-c", DIES_WITH_PARENT, sandbox.__file__, marker])
    try:
        deadline = time.monotonic() + 30
        while len(hostile_survivors(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(hostile_survivors(marker)) == 2, "the program never started"
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 5
    while hostile_survivors(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hostile_survivors(marker) == []
