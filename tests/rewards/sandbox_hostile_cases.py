"""Hostile programs for dash_fast.rewards.sandbox: each must score 0 and stay contained. Stdlib only.

Used by tests/rewards/test_sandbox_hostile.py in-process (as whoever runs pytest) and, run as a script, by a
throwaway unprivileged user: ``python3 sandbox_hostile_cases.py /path/to/sandbox.py`` prints one JSON
object {case: null | "why it failed"}.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time

ADD_WRONG = "def add(a, b):\n    return a - b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(5, -1) == 4"]


class Context:
    """What the hostile programs aim at: a listener, a writable host dir, planted secrets."""

    def __init__(self):
        self.tag = secrets.token_hex(4)
        self.secret = "hf_SECRET" + secrets.token_hex(12)
        self.dir = tempfile.mkdtemp(prefix="dash_hostile_")
        os.chmod(self.dir, 0o777)  # anyone may write here: only containment keeps the program out
        self.home = os.path.join(self.dir, "home")
        os.makedirs(os.path.join(self.home, ".cache", "huggingface"))
        self.token_file = os.path.join(self.home, ".cache", "huggingface", "token")
        with open(self.token_file, "w") as f:
            f.write(self.secret)
        for d in (self.home, os.path.dirname(self.token_file), os.path.dirname(os.path.dirname(self.token_file))):
            os.chmod(d, 0o755)
        os.chmod(self.token_file, 0o644)
        self.saved_env = {k: os.environ.get(k) for k in ("HF_TOKEN", "HOME")}
        os.environ["HF_TOKEN"] = self.secret
        os.environ["HOME"] = self.home
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.tcp.settimeout(0.2)
        self.port = self.tcp.getsockname()[1]
        self.unix_name = f"\0dash_hostile_{self.tag}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_name)
        self.unix.listen(8)
        self.unix.settimeout(0.2)

    def close(self):
        self.tcp.close()
        self.unix.close()
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.dir, ignore_errors=True)

    def accepted(self) -> bool:
        for srv in (self.tcp, self.unix):
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            conn.close()
            return True
        return False


def survivors(marker: str) -> list[int]:
    """Host processes whose name (comm) is ``marker``: a program that got out sets it."""
    found = []
    for path in glob.glob("/proc/[0-9]*/comm"):
        try:
            with open(path) as f:
                if f.read().strip() == marker:
                    found.append(int(path.split("/")[2]))
        except OSError:
            pass
    return found


def _mark(marker: str) -> str:
    """Code that names the current process ``marker`` (PR_SET_NAME; works under any uid)."""
    return f"__import__('ctypes').CDLL(None).prctl(15, {marker.encode()!r}, 0, 0, 0)\n"


# Each case: (code, tests, kwargs, extra check(ctx, result) -> None | why). Built from the context.
def cases(ctx: Context) -> dict:
    marker = f"dashesc{ctx.tag}"  # <= 15 chars: fits in comm
    trainer_pid = os.getpid()
    c = {}
    c["honest_control_passes"] = (  # the suite's own sanity: a correct program scores 1
        "def add(a, b):\n    return a + b\n", ADD_TESTS, {}, "pass")
    c["frame_walk_forgery"] = (
        ADD_WRONG + "import sys, json, os\n"
        "f = sys._getframe(1)\n"
        "while f is not None:\n"
        "    loc = f.f_locals\n"
        "    if 'report' in loc:\n"
        "        loc['report']('ok', 3)\n"
        "    if 'emit' in loc:  # a well-formed stream claiming every hole is True, then out\n"
        "        loc['emit']({'code': 'ok'})\n"
        "        for i in range(3):\n"
        "            loc['emit']({'t': i, 'r': [['ok', ['b', True]]]})\n"
        "        loc['emit']({'done': True})\n"
        "        os._exit(0)\n"
        "    if 'job' in loc:\n"
        "        loc['job']['tests'] = [[] for _ in loc['job']['tests']]\n"
        "    f = f.f_back\n",
        ADD_TESTS, {}, None)
    c["job_rewrite_to_constant_true"] = (  # rewrites every hole into `True`: parent compares True == 3
        ADD_WRONG + "import sys\n"
        "f = sys._getframe(1)\n"
        "while f is not None:\n"
        "    if 'job' in f.f_locals:\n"
        "        for steps in f.f_locals['job']['tests']:\n"
        "            steps[:] = [[k, 'True'] for k, _ in steps]\n"
        "    f = f.f_back\n",
        ADD_TESTS, {}, None)
    c["closure_cell_hook_bypass"] = (
        ADD_WRONG + "import gc, sys\n"
        "for o in gc.get_objects():\n"
        "    if callable(o) and getattr(o, '__closure__', None):\n"
        "        for cell in o.__closure__:\n"
        "            try:\n"
        "                cell.cell_contents = None\n"
        "            except Exception:\n"
        "                pass\n"
        "sys.audit_hooks = None\n"
        f"open({os.path.join(ctx.dir, 'closure_escape')!r}, 'w').write('x')\n",
        ADD_TESTS, {}, lambda ctx, r: "wrote outside" if os.path.exists(os.path.join(ctx.dir, "closure_escape"))
        else None)
    c["eq_always_true"] = (
        "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "class AnyInt(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "class AnyList(list):\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Any()\n"
        "def add2(a, b):\n    return AnyInt(0)\n"
        "def add3(a, b):\n    return AnyList()\n",
        ["assert add(1, 2) == 3", "assert add2(1, 2) == 3", "assert add3(1, 2) == [3]"], {}, None)
    c["class_spoofing"] = (  # isinstance-lies and a __class__ property: values are still encoded by base type
        "class Fake:\n    @property\n    def __class__(self):\n        return int\n"
        "    def __eq__(self, o):\n        return True\n"
        "def add(a, b):\n    return Fake()\n",
        ADD_TESTS, {}, None)
    c["early_exit_zero"] = (ADD_WRONG + "import os\nos._exit(0)\n", ADD_TESTS, {}, None)
    c["exit_zero_inside_test"] = ("def add(a, b):\n    import os\n    os._exit(0)\n", ADD_TESTS, {}, None)
    c["system_exit"] = (ADD_WRONG + "raise SystemExit(0)\n", ADD_TESTS, {}, None)
    c["system_exit_in_call"] = ("def add(a, b):\n    raise SystemExit(0)\n", ADD_TESTS, {}, None)
    forged = ("b'{\"code\": \"ok\"}\\n' + b''.join(b'{\"t\": %d, \"r\": [[\"ok\", [\"b\", true]]]}\\n' % i "
              "for i in range(3)) + b'{\"done\": true}\\n'")
    c["fake_verdict_output"] = (  # a well-formed stream on every fd but the result fd, old verdict lines too
        ADD_WRONG + "import os, sys\n"
        f"line = {forged}\n"
        "for fd in [0, 1, 2, 3, 5] + list(range(6, 64)):\n"
        "    try:\n"
        "        os.write(fd, line + b'x ok 3 3\\nPASSED 3/3\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "print('test 0 passed\\ntest 1 passed\\ntest 2 passed')\n"
        "sys.stdout.flush()\n"
        "os._exit(0)\n",
        ADD_TESTS, {}, None)
    c["forged_result_stream"] = (  # a well-formed stream on the result fd itself: values are still compared
        ADD_WRONG + "import os\n"
        f"os.write(4, {forged})\n"
        "os._exit(0)\n",
        ADD_TESTS, {}, None)
    c["garbage_result_stream"] = (
        ADD_WRONG + "import os\nos.write(4, b'\\x00\\xff not json\\n' * 1000)\n", ADD_TESTS, {}, None)
    c["patch_builtins"] = (
        "import builtins\n"
        "builtins.AssertionError = type('Never', (Exception,), {})\n"
        "builtins.isinstance = lambda *a: True\n"
        "builtins.bool = lambda *a: True\n"
        "builtins.len = lambda *a: 3\n"
        "import json\njson.dumps = lambda *a, **k: '{\"done\": true}'\n"
        + ADD_WRONG,
        ADD_TESTS, {}, None)
    leak = (
        "import os\n"  # os only: the server imported it, so this runs even where the stdlib is unreadable
        "def grab():\n"
        "    found = []\n"
        "    for k, v in os.environ.items():\n"
        "        found.append(k + '=' + v)\n"
        f"    paths = [{ctx.token_file!r}, os.path.expanduser('~/.cache/huggingface/token'),\n"
        "             '/root/.cache/huggingface/token',\n"
        f"             '/proc/{trainer_pid}/environ', '/proc/{os.getppid()}/environ']\n"
        "    for d in os.listdir('/proc'):\n"
        "        paths += ['/proc/' + d + '/environ', '/proc/' + d + '/cmdline']\n"
        "    try:\n"
        "        paths += ['/home/' + d + '/.cache/huggingface/token' for d in os.listdir('/home')]\n"
        "    except OSError:\n"
        "        pass\n"
        "    for p in paths:\n"
        "        try:\n"
        "            found.append(open(p, 'rb').read().decode('latin-1'))\n"
        "        except OSError:\n"
        "            pass\n"
        "    text = '\\n'.join(found)\n"
        "    print(text)\n"
        "    i = text.find('hf_SECRET')\n"
        "    return text[i:i + 33] if i >= 0 else ''\n"
    )
    c["read_secrets"] = (
        leak, [f"assert grab() == {ctx.secret!r}"], {},
        lambda ctx, r: "secret in output" if ctx.secret in r.stderr_tail else None)
    c["setsid_escape"] = (
        ADD_WRONG + "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        {_mark(marker)}"
        "        time.sleep(30)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n",
        ADD_TESTS, {"timeout_s": 3.0},
        lambda ctx, r: f"survivors {survivors(marker)}" if survivors(marker) else None)
    c["fork_bomb"] = (
        ADD_WRONG + "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        f"            {_mark(marker)}"
        "    except OSError:\n"
        "        pass\n",
        ADD_TESTS, {"timeout_s": 1.5, "max_procs": 16},
        lambda ctx, r: f"survivors {survivors(marker)}" if survivors(marker) else None)
    c["infinite_loop"] = ("while True:\n    pass\n" + ADD_WRONG, ADD_TESTS, {"timeout_s": 1.0},
                          lambda ctx, r: None if r.status == "timeout" else f"{r.status} {r.wall_s}")
    c["infinite_loop_in_test"] = ("def add(a, b):\n    while True:\n        pass\n", ADD_TESTS, {"timeout_s": 1.0},
                                  lambda ctx, r: None if r.status == "timeout" else r.status)
    c["memory_hog"] = (
        "x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n" + ADD_WRONG, ADD_TESTS, {"memory_mb": 256}, None)
    c["network_tcp_and_unix"] = (
        ADD_WRONG + "import socket\n"
        f"for fam, addr in ((socket.AF_INET, ('127.0.0.1', {ctx.port})), (socket.AF_UNIX, {ctx.unix_name!r})):\n"
        "    s = socket.socket(fam, socket.SOCK_STREAM)\n"
        "    s.settimeout(2)\n"
        "    try:\n"
        "        s.connect(addr)\n"
        "        print('CONNECTED', fam)\n"
        "    except OSError as e:\n"
        "        print('blocked', e)\n",
        ADD_TESTS, {}, lambda ctx, r: "connected" if ctx.accepted() or "CONNECTED" in r.stderr_tail else None)
    outside = os.path.join(ctx.dir, "escape.txt")
    c["write_outside_workdir"] = (
        ADD_WRONG + "import os\n"
        f"for p in ({outside!r}, '/usr/dash_escape_{ctx.tag}', '/dash_escape_{ctx.tag}', "
        f"'/dev/shm/dash_escape_{ctx.tag}', '/var/tmp/dash_escape_{ctx.tag}'):\n"
        "    try:\n"
        "        open(p, 'w').write('pwned')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('blocked', p, e)\n",
        ADD_TESTS, {},
        lambda ctx, r: "wrote outside" if os.path.exists(outside) or glob.glob(f"/**/dash_escape_{ctx.tag}")
        or os.path.exists(f"/dev/shm/dash_escape_{ctx.tag}") or os.path.exists(f"/var/tmp/dash_escape_{ctx.tag}")
        else None)
    c["disk_fill"] = (
        "import os\n"
        "def fill():\n"
        "    total = 0\n"
        "    for i in range(64):\n"
        "        try:\n"
        "            with open('f%d' % i, 'wb') as f:\n"
        "                for _ in range(16):\n"
        "                    total += f.write(b'x' * (1 << 20))\n"
        "        except OSError as e:\n"
        "            print('stopped', e)\n"
        "            break\n"
        "    return total\n",
        ["assert fill() >= 100 * 2**20"], {"disk_mb": 32, "timeout_s": 10.0},
        lambda ctx, r: None if "No space left" in r.stderr_tail or "too large" in r.stderr_tail else r.stderr_tail[-300:])
    return c


def check(sandbox, ctx: Context, name: str, case) -> str | None:
    """None if the case behaved (scored 0 and contained; the honest control scored 1), else why not."""
    code, tests, kwargs, extra = case
    start = time.monotonic()
    r = sandbox.run_python(code, tests, **kwargs)
    took = time.monotonic() - start
    if extra == "pass":
        return None if r.passed and r.n_passed == len(tests) else f"honest program failed: {r}"
    if r.passed or r.n_passed:
        return f"scored {r.n_passed}/{r.n_total}: {r.failures} {r.stderr_tail[-300:]!r}"
    if took > kwargs.get("timeout_s", 5.0) + 5.0:
        return f"took {took:.1f} s"
    return extra(ctx, r) if extra else None


def run_all(sandbox, names: list[str] | None = None) -> dict[str, str | None]:
    ctx = Context()
    try:
        all_cases = cases(ctx)
        return {n: check(sandbox, ctx, n, all_cases[n]) for n in (names or all_cases)}
    finally:
        ctx.close()


def load_sandbox(path: str):
    """dash_fast/rewards/sandbox.py as a module of its own (stdlib only: no torch needed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dash_sandbox_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):
        out = run_all(load_sandbox(sys.argv[1]), sys.argv[2:] or None)
    print(json.dumps({"uid": os.getuid(), "results": out}))
