"""Run untrusted, model-written Python for the code reward; decide the verdict outside it.

Threat model. The program is hostile and optimised against the reward: it may walk frames and the
garbage collector, patch builtins, raise SystemExit, os._exit at any point, print or write anything
to any file descriptor it holds, fork, setsid, loop, allocate, fill the disk, open sockets and read
every file and /proc entry it can reach. Everything in its own process is therefore the program's:
no secret, hook or reporter in that process can be trusted. What it cannot reach is another process
outside its namespaces. So:

Verdict: decided outside the program, from the tests' own comparisons and the values of their
program-dependent parts (:mod:`dash_fast.rewards.sandbox_verdict` says how and what it cannot judge).

Containment (Linux namespaces; works without root where the kernel allows unprivileged user
namespaces; see :func:`check_sandbox`). A fork server (:mod:`dash_fast.rewards.sandbox_runner`, run by
``python -I -S`` with only PATH and LANG in its environment, started once) forks a *keeper* per program, which enters fresh user (not as root),
mount, PID, network, IPC and UTS namespaces and forks the *runner*, PID 1 of the new PID namespace:

- file system: a new root (tmpfs) with read-only, nosuid binds of /usr, /bin, /lib*, the Python
  standard library (at its own path) and /dev/{null,zero,urandom}; a fresh /proc of the new PID
  namespace (the trainer's /proc/<pid>/environ is not in it); the working directory /tmp is a
  size-limited tmpfs (``disk_mb``, 4096 inodes), so many 16 MiB files cannot fill the disk; nothing
  else: no /home, /etc, /work, nothing of /root but the stdlib path, so the trainer's tokens and
  caches are not in the view. pivot_root drops the old root.
- network: a network namespace with no interface up (loopback included).
- identity: as root the runner drops to a fresh uid of a reserved range (so RLIMIT_NPROC counts
  only its processes); otherwise it runs as the user in the user namespace with every capability
  dropped. no_new_privs in both cases.
- environment: PATH, HOME=/tmp, TMPDIR=/tmp, LANG only.
- rlimits: CPU, AS, FSIZE, NOFILE, NPROC, CORE=0.
- lifetime: the keeper enforces the wall-clock limit and waits until the runner is reaped; when PID
  1 of a PID namespace dies the kernel kills every process in it, so nothing survives
  ``os.fork(); os.setsid()``. Runner and keeper die with their parent (PR_SET_PDEATHSIG), the fork
  server exits when the trainer's end of its socket closes.
The keeper's status pipe (exit status, timeout) is the only trusted output of the run: the runner
closes it before the program starts, and the keeper sits outside the runner's namespaces.

Not covered: no seccomp filter (the kernel's whole syscall surface is reachable) and no cgroup, so
memory is bounded per process (RLIMIT_AS) times RLIMIT_NPROC, not in total.

``sandbox="unsafe-local"`` keeps the verdict protocol but skips every namespace: for machines where
namespaces are unavailable and the code is trusted.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

if __package__:
    from dash_fast.rewards import sandbox_runner as _runner
    from dash_fast.rewards import sandbox_verdict as verdict
else:  # loaded by file path (tests/sandbox_hostile_cases.py, as an unprivileged user): the files next to it
    import importlib.util

    def _sibling(name: str):
        spec = importlib.util.spec_from_file_location(
            f"dash_{name}", os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # a dataclass looks its module up there
        spec.loader.exec_module(module)
        return module

    _runner, verdict = _sibling("sandbox_runner"), _sibling("sandbox_verdict")
_init_root, _encode, _ENV = _runner._init_root, _runner._encode, _runner._ENV

Status = Literal["ok", "timeout", "error", "killed"]
SandboxMode = Literal["namespaces", "unsafe-local"]
SANDBOX_MODES = ("namespaces", "unsafe-local")

# Fresh per-program uids are drawn from this range (as root). No passwd entry is needed.
UID_BASE = 1_500_000_000
UID_RANGE = 100_000_000

STDERR_TAIL_BYTES = 2000
RESULT_CAP_BYTES = 8 << 20  # a result stream larger than this is malformed (scores 0)


class SandboxUnavailable(RuntimeError):
    """The OS containment the code reward needs is not available here."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program. ``passed`` is True only if it ran cleanly and every test passed.
    ``failures``: one line per failed test, from the parent's side (why it failed)."""

    passed: bool
    n_passed: int
    n_total: int
    status: Status
    stderr_tail: str = ""
    wall_s: float = 0.0
    failures: tuple[str, ...] = ()


# ============================================================================ parent: run


class _Server:
    """The trainer's handle on one fork server (started lazily, restarted if it died)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None  # subprocess.Popen
        self.sock: socket.socket | None = None
        self.owner = os.getpid()  # a forked trainer process must not share the parent's server socket

    def _start(self) -> None:
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        python = os.path.realpath(sys.executable)  # the base interpreter: no venv site-packages
        self.proc = subprocess.Popen(
            [python, "-I", "-S", os.path.abspath(_runner.__file__), "--serve", str(theirs.fileno())],
            env={"PATH": _ENV["PATH"], "LANG": "C.UTF-8"},
            cwd="/",
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            start_new_session=True,
        )
        theirs.close()
        self.sock = ours

    def submit(self, hdr: dict, fds: list[int]) -> int:
        """Send one job; returns the keeper's pidfd."""
        with self.lock:
            if self.owner != os.getpid():
                self.proc, self.sock, self.owner = None, None, os.getpid()
            for _attempt in range(2):
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                try:
                    socket.send_fds(self.sock, [json.dumps(hdr).encode()], fds)
                    msg, got, _, _ = socket.recv_fds(self.sock, 64, 1)
                    if msg == b"ok" and len(got) == 1:
                        return got[0]
                except OSError:
                    pass
                self.proc.kill()
                self.proc.wait()
                self.proc = None
            raise SandboxUnavailable("the sandbox fork server does not answer")


_server = _Server()
_default_mode: SandboxMode = "namespaces"
_checked: dict[str, str | None] = {}
_check_lock = threading.Lock()

_HOW_TO_ALLOW = (
    "The code reward runs model-written programs in Linux user, mount, PID and network namespaces. "
    "Allow them: run as root, or allow unprivileged user namespaces (sysctl -w "
    "kernel.unprivileged_userns_clone=1; sysctl -w user.max_user_namespaces=10000; on Ubuntu 23.10+ "
    "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0; in Docker: --security-opt "
    "seccomp=unconfined, or --privileged). Or set sandbox='unsafe-local' to run programs without "
    "containment (trusted code only)."
)


def set_default_sandbox(mode: SandboxMode) -> None:
    """The mode :func:`run_python` uses when none is given (the trainer's ``sandbox`` config key);
    checked now, so a trainer whose code reward cannot run refuses to start."""
    global _default_mode
    check_sandbox(mode)
    _default_mode = mode


def check_sandbox(mode: SandboxMode | None = None) -> None:
    """Raise :class:`SandboxUnavailable` (saying what is missing and how to allow it) unless a trivial
    program runs and is scored correctly in ``mode``. Probed once per mode and process."""
    mode = mode or _default_mode
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}, got {mode!r}")
    with _check_lock:
        if mode not in _checked:
            try:
                r = _run(
                    "x = 41\n", ["assert x + 1 == 42"], mode=mode, timeout_s=30.0, memory_mb=512,
                    file_size_mb=1, max_procs=16, disk_mb=1,
                )
                ok = r.passed
                why = "; ".join((*r.failures, r.stderr_tail.strip()))
            except SandboxUnavailable as e:
                ok, why = False, str(e)
            _checked[mode] = None if ok else why
    if _checked[mode] is not None:
        raise SandboxUnavailable(f"sandbox {mode!r} unavailable ({_checked[mode][-300:]}). {_HOW_TO_ALLOW}")


def _read_all(fd: int, cap: int) -> bytes:
    chunks, total = [], 0
    while total <= cap:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def _tail(fd: int) -> str:
    size = os.fstat(fd).st_size
    return os.pread(fd, STDERR_TAIL_BYTES, max(0, size - STDERR_TAIL_BYTES)).decode("utf-8", "replace")


def _run(code, tests, *, mode, timeout_s, memory_mb, file_size_mb, max_procs, disk_mb) -> SandboxResult:
    start = time.monotonic()
    tests = [str(t) for t in tests]
    bound = verdict.program_names(code)
    plans = [verdict.plan_test(t, bound) for t in tests]
    root = _init_root()
    rlimits = {
        "RLIMIT_CPU": math.ceil(timeout_s) + 1,
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_FSIZE": file_size_mb << 20,
        "RLIMIT_NOFILE": 64,
        "RLIMIT_CORE": 0,
    }
    if mode == "namespaces":  # per fresh uid (root) or per user namespace: counts only this program
        rlimits["RLIMIT_NPROC"] = max_procs
    hdr = {
        "mode": mode,
        "timeout_s": timeout_s,
        "rlimits": rlimits,
        "disk_mb": disk_mb,
        "uid": UID_BASE + secrets.randbelow(UID_RANGE) if root and mode == "namespaces" else None,
    }
    job = json.dumps({"code": code, "tests": [p.steps for p in plans]}).encode()
    payload, result, out = (os.memfd_create(n, os.MFD_CLOEXEC) for n in ("job", "result", "out"))
    status_r, status_w = os.pipe()
    pidfd = None
    try:
        os.write(payload, job)
        os.lseek(payload, 0, os.SEEK_SET)
        pidfd = _server.submit(hdr, [payload, result, out, status_w])
        os.close(status_w)
        status_w = None
        if not select.select([status_r], [], [], timeout_s + 10.0)[0]:  # the keeper itself is stuck
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        status = _read_all(status_r, 4096).decode("utf-8", "replace").strip()
        stream = os.pread(result, RESULT_CAP_BYTES + 1, 0)
        stderr_tail = _tail(out)
    finally:
        for fd in (payload, result, out, status_r, status_w, pidfd):
            if fd is not None:
                os.close(fd)
    wall = time.monotonic() - start
    n_total = len(tests)

    def fail(state: Status, why: str) -> SandboxResult:
        return SandboxResult(False, 0, n_total, state, stderr_tail, wall, (why,))

    if status.startswith("setup-error"):
        if mode in _checked and _checked[mode] is None:  # worked before: this is a real failure
            raise SandboxUnavailable(f"sandbox setup failed: {status}")
        return fail("error", status)
    if status == "timeout":
        return fail("timeout", "timeout")
    if status.startswith("signal"):
        return fail("killed", f"program killed ({status})")
    if len(stream) > RESULT_CAP_BYTES:
        return fail("error", "result stream too large")
    try:
        state, values = verdict.parse_stream(stream, plans)
    except (verdict.Malformed, ValueError, TypeError, RecursionError, MemoryError) as e:
        return fail("error", f"malformed result stream ({e})")
    if state != "ok" or status != "exit 0":
        return fail("error", f"program did not complete ({status}, {state})")
    failures = []
    for i, plan in enumerate(plans):
        why = verdict.judge(plan, values.get(i))
        if why is not None:
            failures.append(f"test {i} failed: {why}")
    n_passed = n_total - len(failures)
    return SandboxResult(n_passed == n_total, n_passed, n_total, "ok", stderr_tail, wall, tuple(failures))


def run_python(
    code: str,
    tests: Sequence[str],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    file_size_mb: int = 16,
    max_procs: int = 16,
    disk_mb: int = 64,
    sandbox: SandboxMode | None = None,
) -> SandboxResult:
    """Run ``code``, then judge each ``assert`` string in ``tests`` (see the module docstring).

    A solution that raises at top level scores 0 tests (status 'error'), like exec(program + tests)
    in MBPP's evaluation. ``sandbox``: None for the default (:func:`set_default_sandbox`, else
    "namespaces"). Raises :class:`SandboxUnavailable` if that mode cannot run here."""
    sandbox = sandbox or _default_mode
    check_sandbox(sandbox)
    return _run(code, tests, mode=sandbox, timeout_s=timeout_s, memory_mb=memory_mb,
                file_size_mb=file_size_mb, max_procs=max_procs, disk_mb=disk_mb)


def run_many(
    jobs: Sequence[tuple[str, Sequence[str]]], *, max_workers: int = 2, **kwargs
) -> list[SandboxResult]:
    """Run (code, tests) jobs concurrently on a small thread pool (each thread waits on one program)."""
    from concurrent.futures import ThreadPoolExecutor

    if not jobs:
        return []
    check_sandbox(kwargs.get("sandbox"))
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool:
        return list(pool.map(lambda job: run_python(job[0], job[1], **kwargs), jobs))
