"""The sandbox's side of dash_fast.rewards.sandbox: the fork server, the keeper and the runner (see that
module's docstring for the design and the threat model).

Run as ``python -I -S sandbox_runner.py --serve FD``. Kept apart and lean on imports on purpose: every
program costs two forks of this process, and a fork costs in proportion to the memory it maps.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys


def _init_root() -> bool:
    """Root of the initial user namespace (can mount and switch to any uid); root in a container's user
    namespace is not (fresh uids are unmapped there): it takes the unprivileged path."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _encode(v, depth: int = 0):
    """Plain data -> tagged JSON (the parent's :func:`_decode` is the check; this is the honest side)."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    if v is None:
        return ["n"]
    if v is True or v is False:
        return ["b", v]
    if isinstance(v, int):
        return ["i", int.__repr__(v)]
    if isinstance(v, float):
        return ["f", float.__repr__(v)]
    if isinstance(v, complex):
        return ["c", float.__repr__(v.real), float.__repr__(v.imag)]
    if isinstance(v, str):
        return ["s", str.__str__(v)]
    if isinstance(v, (bytes, bytearray)):
        return ["y", bytes(v).hex()]
    for tag, base in (("l", list), ("t", tuple), ("F", frozenset), ("S", set)):
        if isinstance(v, base):
            return [tag, [_encode(e, depth + 1) for e in base.__iter__(v)]]
    if isinstance(v, dict):
        return ["d", [[_encode(k, depth + 1), _encode(x, depth + 1)] for k, x in dict.items(v)]]
    raise TypeError(f"a value of type {type(v).__name__} cannot leave the sandbox (plain data only)")


def _run_job(job: dict, result_fd: int) -> None:
    """Exec the program, then each test's steps; write result lines (see :func:`_parse_stream`)."""
    import builtins

    def emit(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(result_fd, data):]

    def describe(e):
        try:
            return f"{type(e).__name__}: {str(e)[:200]}"
        except BaseException:
            return type(e).__name__

    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(job["code"], "solution.py", "exec"), ns)
    except BaseException as e:
        os.write(2, f"solution raised {describe(e)}\n".encode("utf-8", "replace"))
        emit({"code": "error"})
        emit({"done": True})
        return
    emit({"code": "ok"})
    for i, steps in enumerate(job["tests"]):
        out = []
        for kind, src in steps:
            try:
                if kind == "x":
                    exec(compile(src, f"<test {i}>", "exec"), ns)
                    out.append(None)
                else:
                    out.append(["ok", _encode(eval(compile(src, f"<test {i}>", "eval"), ns))])
            except BaseException as e:
                out.append(["err", describe(e)])
                if kind == "x":
                    break
        emit({"t": i, "r": out})
    emit({"done": True})


# Linux constants (x86_64 / aarch64 share these).
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_KEEP = 1 | 2 | 4 | 8 | 16 | 64 | 1024 | 2048 | 4096  # statvfs f_flag bits that equal MS_* bits
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_DEVICES = ("null", "zero", "urandom")


class _Libc:
    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def call(self, what: str, ret: int) -> None:
        if ret != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, src, target, fstype, flags, data=None) -> None:
        enc = lambda s: None if s is None else str(s).encode()  # noqa: E731
        self.call(f"mount {target}", self.lib.mount(enc(src), enc(target), enc(fstype), flags, enc(data)))

    def prctl(self, option: int, arg: int) -> None:
        self.call("prctl", self.lib.prctl(option, arg, 0, 0, 0))


def _bind_ro(libc: _Libc, src: str, target: str) -> None:
    libc.mount(src, target, None, _MS_BIND)
    keep = os.statvfs(target).f_flag & _MS_KEEP  # a user namespace may not clear locked flags
    libc.mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | keep)


def _enter_new_root(libc: _Libc, python_dirs: list[str], disk_mb: int, uid: int, gid: int) -> None:
    """In fresh mount + PID namespaces (we are PID 1): build the read-only view and pivot into it."""
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    sources = {}
    for path in (*_SYSTEM_DIRS, *python_dirs):
        if os.path.islink(path):
            sources[path] = ("link", os.readlink(path))
        elif os.path.isdir(path):
            sources[path] = ("dir", os.open(path, os.O_PATH | os.O_DIRECTORY))
    for dev in _DEVICES:
        sources[f"/dev/{dev}"] = ("dev", os.open(f"/dev/{dev}", os.O_PATH))
    new = "/tmp"  # the mount point; the sources above stay reachable through their fds
    libc.mount("tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=1024,mode=755")
    covered = []  # a python dir below /usr is already in the /usr bind
    for path in sorted(sources, key=len):
        kind, src = sources[path]
        if any(path.startswith(c + "/") for c in covered):
            continue
        target = new + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if kind == "link":
            os.symlink(src, target)
            continue
        if kind == "dir":
            os.makedirs(target, exist_ok=True)
            covered.append(path)
            _bind_ro(libc, f"/proc/self/fd/{src}", target)
        else:  # a device node: writable like on the host (writes to /dev/null go nowhere)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
            libc.mount(f"/proc/self/fd/{src}", target, None, _MS_BIND)
        os.close(src)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(dest, f"{new}/dev/{name}")
    os.mkdir(f"{new}/proc")
    libc.mount("proc", f"{new}/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.mkdir(f"{new}/tmp")
    libc.mount("tmpfs", f"{new}/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={disk_mb}m,nr_inodes=4096,mode=700,uid={uid},gid={gid}")
    os.chdir(new)
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(f"pivot_root: unsupported machine {os.uname().machine}")
    libc.call("pivot_root", libc.lib.syscall(nr, b".", b"."))
    libc.call("umount old root", libc.lib.umount2(b".", _MNT_DETACH))
    os.chdir("/")
    libc.mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir("/tmp")


def _drop_capabilities(libc: _Libc) -> None:
    ct = libc.ctypes

    class Header(ct.Structure):
        _fields_ = [("version", ct.c_uint32), ("pid", ct.c_int)]

    data = (ct.c_uint32 * 6)()
    libc.call("capset", libc.lib.capset(ct.byref(Header(0x20080522, 0)), data))


def _set_rlimits(rlimits: dict) -> None:
    import resource

    for name, value in rlimits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too-large writes fail with OSError instead


def _runner(hdr: dict, server: dict, libc: _Libc | None, lifeline: int) -> None:
    """The runner: set up, close the trusted fds, run the job. fds: 3 payload, 4 result, 5 status."""
    try:
        libc and libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        uid, gid = (hdr["uid"], hdr["uid"]) if hdr["uid"] is not None else (os.getuid(), os.getgid())
        if hdr["mode"] == "namespaces":
            _enter_new_root(libc, server["python_dirs"], hdr["disk_mb"], uid, gid)
        else:
            os.setsid()
            os.chdir(hdr["workdir"])
        os.environ.clear()
        os.environ.update(_ENV)
        if hdr["mode"] != "namespaces":
            os.environ.update(HOME=os.getcwd(), TMPDIR=os.getcwd())
        with os.fdopen(3, "rb") as f:
            job = json.loads(f.read())
        _set_rlimits(hdr["rlimits"])
        if hdr["uid"] is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        elif libc is not None:
            _drop_capabilities(libc)
        libc and libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
        libc and libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # again: a uid change clears it
        if select.select([lifeline], [], [], 0)[0]:  # EOF: the keeper died before that
            os._exit(1)
        os.close(lifeline)
    except BaseException as e:
        os.write(5, f"setup-error {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        os._exit(70)
    os.close(5)  # from here on the program runs: nothing it holds is trusted
    try:
        _run_job(job, 4)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(0)


def _keeper(hdr: dict, server: dict, fds: list[int], libc: _Libc | None) -> None:
    """Forked by the server per job: enter the namespaces, fork the runner, enforce the wall clock,
    wait until the runner (and with it its PID namespace) is gone, report on the status fd."""
    payload, result, out, status = fds
    try:
        libc and libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server["pid"]:
            os._exit(1)
        import fcntl

        null = os.open("/dev/null", os.O_RDONLY)
        null, out, payload, result, status = (fcntl.fcntl(fd, fcntl.F_DUPFD, 100)  # clear of 0..5
                                              for fd in (null, out, payload, result, status))
        for src, dst in ((null, 0), (out, 1), (out, 2), (payload, 3), (result, 4), (status, 5)):
            os.dup2(src, dst, inheritable=True)
        os.closerange(6, 1 << 16)
        if hdr["mode"] == "namespaces":
            flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
            if not server["root"]:
                flags |= _CLONE_NEWUSER
            uid, gid = os.getuid(), os.getgid()
            libc.call("unshare", libc.lib.unshare(flags))
            if not server["root"]:  # the same ids inside: files keep their owners
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
        else:
            import tempfile

            hdr["workdir"] = tempfile.mkdtemp(prefix="dash_sandbox_")
        lifeline, keeper_alive = os.pipe()  # the runner sees EOF on it once the keeper is gone
        pid = os.fork()
    except BaseException as e:
        os.write(5, f"setup-error {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        os._exit(0)
    if pid == 0:
        os.close(keeper_alive)
        _runner(hdr, server, libc, lifeline)
        os._exit(0)
    for fd in (0, 1, 2, 3, 4, lifeline):
        os.close(fd)
    timed_out = False
    pidfd = os.pidfd_open(pid)
    if not select.select([pidfd], [], [], hdr["timeout_s"])[0]:
        timed_out = True
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if hdr["mode"] != "namespaces":  # no PID namespace: kill what the program left in its session
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    _, st = os.waitpid(pid, 0)  # for PID 1 of a namespace: returns once every process in it is gone
    if hdr["mode"] != "namespaces":
        import shutil

        shutil.rmtree(hdr["workdir"], ignore_errors=True)
    if timed_out:
        line = "timeout"
    elif os.WIFSIGNALED(st):
        line = f"signal {os.WTERMSIG(st)}"
    else:
        line = f"exit {os.WEXITSTATUS(st)}"
    os.write(5, (line + "\n").encode())
    os._exit(0)


def _serve(sock_fd: int) -> None:
    """The fork server: one request per job (header + 4 fds), answered with the keeper's pidfd."""
    sock = socket.socket(fileno=sock_fd)
    for name in ("collections", "heapq", "itertools", "functools", "string", "bisect", "resource", "fcntl"):
        __import__(name)  # imported once here instead of once per program (each fork copies what is here)
    libc = None
    try:
        libc = _Libc()
        for fn in ("unshare", "prctl", "mount", "umount2", "syscall", "capset"):
            getattr(libc.lib, fn)  # resolved once, not in every child
    except (OSError, AttributeError):
        libc = None
    python_dirs = sorted({os.path.realpath(p) for p in sys.path if os.path.isdir(p)})
    server = {"pid": os.getpid(), "root": _init_root(), "python_dirs": python_dirs}
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        except (ConnectionError, OSError):
            return
        if not msg:
            return
        while True:  # reap finished keepers
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        hdr = json.loads(msg)
        pid = os.fork()
        if pid == 0:
            sock.close()
            _keeper(hdr, server, fds, libc)
            os._exit(0)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(sock, [b"ok"], [pidfd])
        os.close(pidfd)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]))
