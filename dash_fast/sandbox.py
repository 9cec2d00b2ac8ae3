"""Run untrusted, model-written Python for the code reward.

Each program runs in its own ``python -I`` subprocess. Containment is layered, because no single
layer holds on its own, least of all when the trainer runs as root (where RLIMIT_NPROC is not
enforced and file permissions do not apply):

1. Process: own session / process group, wall-clock timeout, the whole group SIGKILLed afterwards.
2. rlimits: CPU seconds, address space (memory), file size, open files, no core dumps, processes.
3. Privileges (when started as root): the child drops to a fresh uid, drawn at random from a
   reserved range for this run only.
   RLIMIT_NPROC then holds (it counts processes per uid), file permissions apply (the working
   directory is the only place it owns), and every stray process is found by uid and killed.
4. Network: a private network namespace (``unshare(CLONE_NEWNET)``; as non-root with a user
   namespace): no interface is up, loopback included.
5. Audit hook (PEP 578), installed before the program runs: refuses fork / exec / subprocess /
   signals, sockets, ctypes, and writes (or directory opens) outside the working directory.
6. A temporary working directory, removed afterwards.

Layers 3 and 4 are probed once per process (:func:`sandbox_capabilities`) and used when available.
The verdict comes back on an inherited, unlinked file as one line tagged with a random nonce that
is sent on stdin, so the program's own output cannot pose as a verdict. This guards the host, not
the score: a program that walks the interpreter's objects could find the nonce, and a test like
``assert f(x) == 5`` passes for an object whose ``__eq__`` always returns True.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "timeout", "error", "killed"]

# Fresh per-run uids are drawn from this range (as root). No passwd entry is needed.
UID_BASE = 1_500_000_000
UID_RANGE = 100_000_000

STDERR_TAIL_BYTES = 2000

# PATH_FDS note: when the interpreter's files are not readable by other users (e.g. a pyenv Python
# under /root, mode 0700), a child that dropped to a fresh uid could import nothing new. It opens each
# sys.path directory first and imports through /proc/self/fd/N: permissions are then checked only
# below those directories, which are world-readable themselves.


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program. ``passed`` is True only if it ran cleanly and every test passed."""

    passed: bool
    n_passed: int
    n_total: int
    status: Status
    stderr_tail: str = ""
    wall_s: float = 0.0


# The child. Runs as `python -I -c _HARNESS <config json>`; reads {"nonce","code","tests"} on stdin.
# Everything lives in _main()'s locals and is bound before the program runs, so the program cannot
# patch what the harness calls (builtins.exec, os.write, ...).
_HARNESS = r"""
def _main():
    import json, os, resource, signal, sys
    cfg = json.loads(sys.argv[1])
    job = json.loads(sys.stdin.read())
    nonce, code, tests = job["nonce"], job["code"], job["tests"]
    _exec, _compile, _write, _exit, _len, _str = exec, compile, os.write, os._exit, len, str
    _Base, res_fd = BaseException, cfg["result_fd"]

    pid, _getpid = os.getpid(), os.getpid

    def report(status, n_passed):
        if _getpid() != pid:  # a forked copy (only possible with the audit hook off) never reports
            _exit(1)
        for stream in (sys.stdout, sys.stderr):  # the program's prints, for stderr_tail
            try:
                stream.flush()
            except _Base:
                pass
        _write(res_fd, ("\n%s %s %d %d\n" % (nonce, status, n_passed, _len(tests))).encode())
        _exit(0)

    def setup_failed(what):
        _write(2, ("sandbox setup failed: %s\n" % what).encode())
        report("setup-error", 0)

    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if cfg["netns"]:
        flags = 0x40000000 if os.geteuid() == 0 else 0x40000000 | 0x10000000  # NEWNET (| NEWUSER)
        if libc.unshare(flags) != 0:
            setup_failed("unshare errno %d" % ctypes.get_errno())
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too-large writes fail with OSError instead
    uid = cfg["uid"]
    if uid is not None:
        path_fds = {}
        if cfg["path_fds"]:  # keep sys.path reachable through /proc/self/fd (see PATH_FDS note)
            for p in sys.path:
                try:
                    path_fds[p] = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    pass
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        except OSError as e:
            setup_failed("setuid: %s" % e)
        if path_fds:
            libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid made /proc/self root-owned
            dirs = sorted(path_fds, key=len, reverse=True)

            def remap(p):
                for d in dirs:
                    if p == d or p.startswith(d + "/"):
                        return "/proc/self/fd/%d%s" % (path_fds[d], p[len(d):])
                return p

            sys.path[:] = [remap(p) for p in sys.path]
            for m in list(sys.modules.values()):  # packages already imported (collections, ...)
                if isinstance(getattr(m, "__path__", None), list):
                    m.__path__[:] = [remap(p) for p in m.__path__]
            sys.path_importer_cache.clear()
    del libc, ctypes
    for m in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[m]

    if cfg["audit"]:
        root = os.path.realpath(os.getcwd())
        realpath, isdir, fsdecode = os.path.realpath, os.path.isdir, os.fsdecode
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        blocked = frozenset(cfg["blocked_events"])
        blocked_imports = frozenset(cfg["blocked_imports"])
        path_events = cfg["path_events"]

        def inside(path):
            p = realpath(fsdecode(path))
            return p == root or p.startswith(root + "/")

        def deny(event, detail=""):
            raise PermissionError("sandbox: %s blocked %s" % (event, detail))

        def hook(event, args):
            if event == "open":
                path, mode, flags = args
                if path is None or isinstance(path, int):
                    return
                writing = (mode is not None and any(c in mode for c in "wax+")) or (
                    flags is not None and flags & write_flags)
                if (writing or isdir(path)) and not inside(path):
                    deny(event, path)
            elif event in blocked:
                deny(event)
            elif event == "import" and args[0] in blocked_imports:
                raise ImportError("sandbox: import of %s blocked" % args[0])  # code that guards imports copes
            elif event in path_events:
                path_idx, dir_fd_idx = path_events[event]
                if any(args[i] not in (None, -1) for i in dir_fd_idx):
                    deny(event, "(dir_fd)")
                for i in path_idx:
                    if isinstance(args[i], (str, bytes)) and not inside(args[i]):
                        deny(event, args[i])

        sys.addaudithook(hook)

    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        _exec(_compile(code, "solution.py", "exec"), ns)
    except _Base as e:
        _write(2, ("solution raised %s: %s\n" % (type(e).__name__, e)).encode("utf-8", "replace"))
        report("error", 0)
    n_passed = 0
    for i, test in enumerate(tests):
        try:
            _exec(_compile(test, "<test %d>" % i, "exec"), ns)
            n_passed += 1
        except _Base as e:
            _write(2, ("test %d failed: %s: %s\n" % (i, type(e).__name__, _str(e)[:200])).encode("utf-8", "replace"))
    report("ok", n_passed)

_main()
"""

_BLOCKED_EVENTS = [
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "subprocess.Popen",
    "pty.spawn",
    "socket.__new__",
    "socket.connect",
    "socket.bind",
    "socket.sendto",
    "socket.sendmsg",
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyname_ex",
    "socket.gethostbyaddr",
    "ctypes.dlopen",
    "ctypes.dlsym",
    "ctypes.call_function",
    "ctypes.cdata",
    "ctypes.addressof",
    "resource.setrlimit",
    "resource.prlimit",
    "os.setxattr",
    "os.removexattr",
]
_BLOCKED_IMPORTS = ["_posixsubprocess", "_ctypes", "ctypes"]
# Events whose path arguments must lie inside the working directory: event -> (indices of path
# arguments, indices of dir_fd arguments, which must be unset: a relative path under a dir_fd cannot
# be checked; this also refuses shutil.rmtree, which uses dir_fd).
_PATH_EVENTS = {
    "os.remove": ([0], [1]),
    "os.rmdir": ([0], [1]),
    "os.rename": ([0, 1], [2, 3]),
    "os.link": ([0, 1], [2, 3]),
    "os.symlink": ([1], [2]),
    "os.mkdir": ([0], [2]),
    "os.chmod": ([0], [2]),
    "os.chown": ([0], [3]),
    "os.truncate": ([0], []),
    "os.utime": ([0], [3]),
    "shutil.rmtree": ([0], [1]),
}

_probe_lock = threading.Lock()
_probe_result: dict | None = None

_PROBE = r"""
import json, os, sys, ctypes
out = {"root": os.geteuid() == 0, "netns": False, "uid_switch": False, "stdlib_readable": True}
libc = ctypes.CDLL(None, use_errno=True)
flags = 0x40000000 if out["root"] else 0x40000000 | 0x10000000
out["netns"] = libc.unshare(flags) == 0
if out["root"]:
    try:
        os.setgroups([]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
        out["uid_switch"] = True
        out["stdlib_readable"] = os.access(os.path.dirname(os.__file__), os.R_OK | os.X_OK)
    except OSError:
        pass
print(json.dumps(out))
"""


def sandbox_capabilities() -> dict:
    """Which OS layers work here: {'root', 'netns', 'uid_switch', 'stdlib_readable'} (probed once)."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            uid = UID_BASE + secrets.randbelow(UID_RANGE)
            caps = {"root": os.geteuid() == 0, "netns": False, "uid_switch": False, "stdlib_readable": True}
            try:
                out = subprocess.run(
                    [sys.executable, "-I", "-c", _PROBE, str(uid)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    cwd="/",
                    start_new_session=True,
                )
                caps.update(json.loads(out.stdout.strip().splitlines()[-1]))
            except (subprocess.SubprocessError, ValueError, IndexError, OSError):
                pass
            _probe_result = caps
        return dict(_probe_result)


def _live_pids_of_uid(uid: int) -> list[int]:
    """Pids (not zombies) whose real uid is ``uid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        real_uid = int(fields.get("Uid", "-1").split()[0])
        if real_uid == uid and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(name))
    return pids


def _kill_all(pgid: int, uid: int | None) -> None:
    """SIGKILL the child's process group and, when it ran under its own uid, every process of that uid."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(200):  # a fork bomb refills while we kill; RLIMIT_NPROC bounds how much
        pids = _live_pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - STDERR_TAIL_BYTES))
    return f.read().decode("utf-8", "replace")


def _parse_verdict(f, nonce: str) -> tuple[str, int] | None:
    f.seek(0)
    verdict = None
    for line in f.read(4 << 20).decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == nonce:
            verdict = (parts[1], int(parts[2]))
    return verdict


def run_python(
    code: str,
    tests: Sequence[str],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    file_size_mb: int = 16,
    max_procs: int = 16,
    audit: bool = True,
) -> SandboxResult:
    """Run ``code`` then each ``assert`` string in ``tests`` in a sandboxed subprocess.

    A solution that raises at top level scores 0 tests (status 'error'), like exec(program + tests)
    in MBPP's evaluation. ``audit=False`` skips the audit hook: only for testing the OS layers.
    """
    caps = sandbox_capabilities()
    uid = UID_BASE + secrets.randbelow(UID_RANGE) if caps["uid_switch"] else None
    nonce = secrets.token_hex(16)
    rlimits = {
        "RLIMIT_CPU": math.ceil(timeout_s) + 1,
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_FSIZE": file_size_mb << 20,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }
    if uid is not None:  # for the trainer's own uid it would count all of the user's processes
        rlimits["RLIMIT_NPROC"] = max_procs
    workdir = tempfile.mkdtemp(prefix="dash_sandbox_")
    start = time.monotonic()
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as verdict_file:
            cfg = {
                "result_fd": verdict_file.fileno(),
                "netns": caps["netns"],
                "rlimits": rlimits,
                "uid": uid,
                "path_fds": uid is not None and not caps["stdlib_readable"],
                "audit": audit,
                "blocked_events": _BLOCKED_EVENTS,
                "blocked_imports": _BLOCKED_IMPORTS,
                "path_events": _PATH_EVENTS,
            }
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": workdir,
                "TMPDIR": workdir,
                "LANG": "C.UTF-8",
            }
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _HARNESS, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
                pass_fds=(verdict_file.fileno(),),
                start_new_session=True,
            )
            payload = json.dumps({"nonce": nonce, "code": code, "tests": list(tests)}).encode()
            timed_out = False
            try:
                proc.communicate(payload, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BrokenPipeError:  # died before reading its input
                pass
            finally:
                _kill_all(proc.pid, uid)
                proc.wait()
            wall = time.monotonic() - start
            stderr_tail = _tail(out)
            verdict = _parse_verdict(verdict_file, nonce)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    n_total = len(tests)
    if timed_out:
        return SandboxResult(False, 0, n_total, "timeout", stderr_tail, wall)
    if verdict is None:
        status: Status = "killed" if proc.returncode < 0 else "error"
        return SandboxResult(False, 0, n_total, status, stderr_tail, wall)
    state, n_passed = verdict
    if state != "ok":
        return SandboxResult(False, 0, n_total, "error", stderr_tail, wall)
    return SandboxResult(n_passed == n_total, n_passed, n_total, "ok", stderr_tail, wall)


def run_many(
    jobs: Sequence[tuple[str, Sequence[str]]], *, max_workers: int = 2, **kwargs
) -> list[SandboxResult]:
    """Run (code, tests) jobs concurrently on a small thread pool (each thread waits on a subprocess)."""
    if not jobs:
        return []
    sandbox_capabilities()  # probe once, not once per thread
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool:
        return list(pool.map(lambda job: run_python(job[0], job[1], **kwargs), jobs))
