"""Run untrusted, model-written Python for the code reward; decide the verdict outside it.

Threat model. The program is hostile and optimised against the reward: it may walk frames and the
garbage collector, patch builtins, raise SystemExit, os._exit at any point, print or write anything
to any file descriptor it holds, fork, setsid, loop, allocate, fill the disk, open sockets and read
every file and /proc entry it can reach. Everything in its own process is therefore the program's:
no secret, hook or reporter in that process can be trusted. What it cannot reach is another process
outside its namespaces. So:

Verdict. The parent (the trainer) parses each test with ``ast`` and keeps every comparison the
test writes (``==``, ``!=``, ``<``, ``in``, ``is``, ``not``, ``and``/``or``, ``math.isclose``,
``abs(a - b) < eps``, ``set(..)``, ``sorted(..)``, literals) as a *skeleton* it evaluates itself
(:func:`_evaluate`, a small interpreter over plain data, never ``eval``). Only the program-dependent
sub-expressions (*holes*, e.g. ``add(1, 2)``) go into the sandbox, which returns each hole's value as
tagged plain data (int, float incl. nan/inf, complex, str, bytes, bool, None, list, tuple, set,
frozenset, dict): an object with a custom ``__eq__`` cannot cross, subclasses cross as their base
value, and the expected values never enter the sandbox. The program may forge that stream (nothing
stops it writing to the result fd), but a forged record only claims a value for an expression whose
value the program already controls; the parent still compares it with an expected value the
program never saw. So a forgery can do no more than a program returning values from its functions
honestly. A malformed stream scores 0. Tests whose verdict would be computed inside the program
cannot be split this way: an ``assert``/``raise`` inside a block or function, or a comparison inside
a hole (``all(f(i) == i for i in r)``). They count as failed, with a reason, and are not run. A
separate process per test does not help: the solution runs in that process too, so anything the
trusted wrapper there can signal (exit status, bytes on a pipe, a secret in its memory) the
solution can signal as well. Limits of the split: a hole's value is the program's, whatever it
contains (a helper from MBPP's ``test_setup_code`` runs in the sandbox too, so ``assert check(f(x))``
is only as strong as a bare ``assert f(x)``, which any program passes by returning True); holes are
evaluated eagerly, left to right (one that ``and``/``or`` would skip still runs; its error is ignored
unless read).

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

import ast
import json
import math
import os
import re
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
else:  # loaded by file path (tests/sandbox_hostile_cases.py, as an unprivileged user): the file next to it
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "dash_sandbox_runner", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_runner.py"))
    _runner = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_runner)
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


# ============================================================================ parent: split tests
#
# A test is a module of statements. Top-level ``assert`` statements are split into a skeleton
# (evaluated here) and holes (evaluated in the sandbox); other top-level statements (``x = f(3)``,
# ``import math``) run in the sandbox in order. Steps sent to the sandbox: ("x", src) to exec,
# ("e", src) to evaluate and return.

_SAFE_FUNCS = {
    "abs": abs, "round": round, "len": len, "set": set, "frozenset": frozenset, "sorted": sorted,
    "tuple": tuple, "list": list, "dict": dict, "float": float, "int": int, "str": str, "bool": bool,
    "min": min, "max": max, "sum": sum, "isclose": math.isclose,
}  # fmt: skip
_SAFE_MATH = {
    "isclose": math.isclose, "fabs": math.fabs, "sqrt": math.sqrt, "floor": math.floor,
    "ceil": math.ceil, "pi": math.pi, "e": math.e, "inf": math.inf, "nan": math.nan,
}  # fmt: skip
_BINOPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}  # fmt: skip
_UNARY = {ast.Not: lambda a: not a, ast.USub: lambda a: -a, ast.UAdd: lambda a: +a, ast.Invert: lambda a: ~a}
_CMPOPS = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}  # fmt: skip
_MAX_ITEMS = 1_000_000  # bound on what the parent builds from program values (str * n, ...)


class _Unsplittable(Exception):
    """The test's verdict would be computed inside the program."""


class _Hole(ast.expr):
    """A program-dependent sub-expression: its value comes from the sandbox, step ``index``."""

    _fields = ("index",)


def program_names(code: str) -> frozenset[str]:
    """Names the program binds anywhere (def, class, assignment, import as); a test's use of such a
    name is the program's (a hole), even where it shadows a safe builtin like ``max``."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            from_math = isinstance(node, ast.ImportFrom) and node.module == "math"
            for alias in node.names:
                if alias.asname in (None, alias.name) and (from_math or alias.name == "math"):
                    continue  # `import math`, `from math import isclose`: the real functions
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return frozenset(names)


def _compares_inside(node: ast.AST) -> bool:
    """Whether a hole computes a comparison whose result flows out (not one inside a lambda body or a
    comprehension filter, which only builds the program's input)."""
    if isinstance(node, ast.Lambda):
        return False
    if isinstance(node, ast.Compare):
        return True
    if isinstance(node, ast.Call) and _dotted(node.func) in ("isclose", "math.isclose"):
        return True
    if isinstance(node, ast.comprehension):
        return _compares_inside(node.target) or _compares_inside(node.iter)
    return any(_compares_inside(child) for child in ast.iter_child_nodes(node))


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def _safe_name(node: ast.AST, bound: frozenset[str]) -> bool:
    name = _dotted(node)
    if name is None:
        return False
    head, _, attr = name.partition(".")
    if head in bound:
        return False
    return (name in _SAFE_FUNCS) if not attr else (head == "math" and attr in _SAFE_MATH)


class _Splitter:
    """Turns an assert's expression into a skeleton with :class:`_Hole` nodes, appending holes to ``steps``."""

    def __init__(self, bound: frozenset[str], steps: list[tuple[str, str]]):
        self.bound, self.steps = bound, steps

    def hole(self, node: ast.expr) -> _Hole:
        if _compares_inside(node):
            raise _Unsplittable(f"compares inside the program: {ast.unparse(node)[:80]}")
        self.steps.append(("e", ast.unparse(node)))
        return _Hole(index=len(self.steps) - 1)

    def __call__(self, node: ast.expr) -> ast.expr:
        c = self
        if isinstance(node, ast.Constant):
            return node
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            if any(isinstance(e, ast.Starred) for e in node.elts):
                return self.hole(node)
            return type(node)(elts=[c(e) for e in node.elts], ctx=ast.Load())
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                return self.hole(node)
            return ast.Dict(keys=[c(k) for k in node.keys], values=[c(v) for v in node.values])
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return ast.UnaryOp(op=node.op, operand=c(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return ast.BinOp(left=c(node.left), op=node.op, right=c(node.right))
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[c(v) for v in node.values])
        if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
            return ast.Compare(left=c(node.left), ops=node.ops, comparators=[c(x) for x in node.comparators])
        if isinstance(node, ast.Subscript):
            return ast.Subscript(value=c(node.value), slice=c(node.slice), ctx=ast.Load())
        if isinstance(node, ast.Slice):
            return ast.Slice(*(None if x is None else c(x) for x in (node.lower, node.upper, node.step)))
        if isinstance(node, (ast.Name, ast.Attribute)) and _safe_name(node, self.bound):
            return node
        if (
            isinstance(node, ast.Call)
            and _safe_name(node.func, self.bound)
            and not any(isinstance(a, (ast.Starred, ast.Lambda)) for a in node.args)
            and all(k.arg is not None and not isinstance(k.value, ast.Lambda) for k in node.keywords)
        ):
            return ast.Call(func=node.func, args=[c(a) for a in node.args],
                            keywords=[ast.keyword(arg=k.arg, value=c(k.value)) for k in node.keywords])
        return self.hole(node)


@dataclass
class _Plan:
    steps: list[tuple[str, str]]  # sent to the sandbox
    checks: list[tuple[ast.expr, str]]  # (skeleton, its source), in order; holes index into steps
    unsplittable: str | None = None  # why this test cannot be judged outside the program


def plan_test(test: str, bound: frozenset[str]) -> _Plan:
    """Split one test string (see the module docstring)."""
    steps: list[tuple[str, str]] = []
    checks: list[tuple[ast.expr, str]] = []
    try:
        tree = ast.parse(test)
        for stmt in tree.body:
            if isinstance(stmt, ast.Assert):
                checks.append((_Splitter(bound, steps)(stmt.test), ast.unparse(stmt.test)))
            elif any(isinstance(n, (ast.Assert, ast.Raise)) for n in ast.walk(stmt)):
                raise _Unsplittable("an assert or raise inside a block is judged inside the program")
            else:
                steps.append(("x", ast.unparse(stmt)))
        if not checks:
            raise _Unsplittable("no top-level assert")
    except (SyntaxError, ValueError, RecursionError) as e:
        return _Plan([], [], f"test does not parse: {type(e).__name__}")
    except _Unsplittable as e:
        return _Plan([], [], str(e))
    return _Plan(steps, checks)


class _HoleError(Exception):
    pass


def _bounded(value):
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > _MAX_ITEMS:
        raise ValueError("value too large")
    if isinstance(value, int) and value.bit_length() > 100_000:
        raise ValueError("int too large")
    return value


def _binop(op: ast.operator, a, b):
    if isinstance(op, ast.Mult):
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_ITEMS:
                raise ValueError("repetition too large")
    if isinstance(op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and max(a.bit_length(), 1) * abs(b) > 1 << 20:
        raise ValueError("power too large")
    return _bounded(_BINOPS[type(op)](a, b))


def _evaluate(node: ast.expr, holes: list):
    """The parent's interpreter for skeletons: plain data only, with Python's semantics
    (short-circuit ``and``/``or``/chained comparisons; a hole's error is raised only where read)."""
    ev = lambda n: _evaluate(n, holes)  # noqa: E731
    if isinstance(node, _Hole):
        value = holes[node.index]
        if isinstance(value, _HoleError):
            raise value
        return value
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(ev(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [ev(e) for e in node.elts]
    if isinstance(node, ast.Set):
        return {ev(e) for e in node.elts}
    if isinstance(node, ast.Dict):
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        return _bounded(_UNARY[type(node.op)](ev(node.operand)))
    if isinstance(node, ast.BinOp):
        return _binop(node.op, ev(node.left), ev(node.right))
    if isinstance(node, ast.BoolOp):
        value = None
        for v in node.values:
            value = ev(v)
            if bool(value) == isinstance(node.op, ast.Or):
                return value
        return value
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, comp in zip(node.ops, node.comparators):
            right = ev(comp)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Subscript):
        return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
        return slice(*(None if x is None else ev(x) for x in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Name):
        return _SAFE_FUNCS[node.id]
    if isinstance(node, ast.Attribute):
        return _SAFE_MATH[node.attr]
    if isinstance(node, ast.Call):
        fn = ev(node.func)
        return _bounded(fn(*[ev(a) for a in node.args], **{k.arg: ev(k.value) for k in node.keywords}))
    raise TypeError(f"unexpected node {type(node).__name__}")  # _Splitter never builds one


# ============================================================================ parent: decode values

_INT_RE = re.compile(r"-?\d{1,5000}")
_FLOAT_RE = re.compile(r"-?(?:inf|nan|\d+(?:\.\d+)?(?:e[+-]\d+)?)")
_SEQ = {"l": list, "t": tuple, "S": set, "F": frozenset}


class _Malformed(Exception):
    pass


def _float(s) -> float:
    if type(s) is not str or not _FLOAT_RE.fullmatch(s):
        raise _Malformed("float")
    return float(s)


def _decode(x, depth: int = 0):
    """Tagged plain data from the sandbox -> builtin objects. Anything else is malformed."""
    if depth > 200 or type(x) is not list or not x or type(x[0]) is not str:
        raise _Malformed("value")
    tag, n = x[0], len(x)
    if tag == "n" and n == 1:
        return None
    if tag == "b" and n == 2 and type(x[1]) is bool:
        return x[1]
    if tag == "i" and n == 2 and type(x[1]) is str and _INT_RE.fullmatch(x[1]):
        return int(x[1])
    if tag == "f" and n == 2:
        return _float(x[1])
    if tag == "c" and n == 3:
        return complex(_float(x[1]), _float(x[2]))
    if tag == "s" and n == 2 and type(x[1]) is str:
        return x[1]
    if tag == "y" and n == 2 and type(x[1]) is str:
        return bytes.fromhex(x[1])
    if tag in _SEQ and n == 2 and type(x[1]) is list:
        return _SEQ[tag](_decode(e, depth + 1) for e in x[1])
    if tag == "d" and n == 2 and type(x[1]) is list:
        out = {}
        for pair in x[1]:
            if type(pair) is not list or len(pair) != 2:
                raise _Malformed("dict")
            out[_decode(pair[0], depth + 1)] = _decode(pair[1], depth + 1)
        return out
    raise _Malformed(f"tag {tag!r}")


def _no_numbers(_s):
    raise _Malformed("bare number")


def _parse_stream(data: bytes, plans: list[_Plan]) -> tuple[str, dict[int, list]]:
    """The runner's result lines -> (program state: 'ok' | 'error' | 'incomplete', {test: hole values}).

    Lines: {"code": "ok"|"error"}, then {"t": i, "r": [...]} per test, then {"done": true}. Any
    deviation (bad JSON, unknown keys, a duplicate, out-of-order, a value that does not decode) is
    malformed: the whole program scores 0."""
    state, results, done = None, {}, False
    for line in data.split(b"\n"):
        if not line:
            continue
        if done:
            raise _Malformed("data after done")
        try:
            obj = json.loads(line, parse_float=_no_numbers, parse_constant=_no_numbers)
        except (ValueError, RecursionError) as e:
            raise _Malformed(f"json: {type(e).__name__}") from None
        if type(obj) is not dict:
            raise _Malformed("line")
        if state is None:
            if set(obj) != {"code"} or obj["code"] not in ("ok", "error"):
                raise _Malformed("first line")
            state = obj["code"]
            continue
        if set(obj) == {"done"} and obj["done"] is True:
            done = True
            continue
        i = obj.get("t")
        if set(obj) != {"t", "r"} or type(i) is not int or i in results or not 0 <= i < len(plans):
            raise _Malformed("test line")
        if state != "ok" or (results and i <= max(results)) or type(obj["r"]) is not list:
            raise _Malformed("test order")
        steps, values = plans[i].steps, []
        if len(obj["r"]) > len(steps):
            raise _Malformed("too many results")
        for (kind, _), r in zip(steps, obj["r"]):
            if kind == "x" and r is None:
                values.append(None)
            elif type(r) is list and len(r) == 2 and r[0] == "err" and type(r[1]) is str:
                values.append(_HoleError(r[1][:200]))
            elif kind == "e" and type(r) is list and len(r) == 2 and r[0] == "ok":
                values.append(_decode(r[1]))
            else:
                raise _Malformed("result")
        results[i] = values
    if state is None:
        return "incomplete", {}
    return (state if done else "incomplete"), results


def _judge(plan: _Plan, values: list | None) -> str | None:
    """None if the test passed, else why it failed."""
    if plan.unsplittable:
        return f"not judged: {plan.unsplittable}"
    if values is None:
        return "no result"
    for kind, value in zip((k for k, _ in plan.steps), values):
        if kind == "x" and isinstance(value, _HoleError):
            return f"statement raised {value}"
    if len(values) < len(plan.steps):
        return "incomplete result"
    for check, source in plan.checks:
        try:
            ok = bool(_evaluate(check, values))
        except _HoleError as e:
            return f"raised {e}"
        except Exception as e:  # plain-data operations the skeleton applies (TypeError, ...)
            return f"check raised {type(e).__name__}: {str(e)[:100]}"
        if not ok:
            return f"assert failed: {source[:120]}"
    return None


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
    bound = program_names(code)
    plans = [plan_test(t, bound) for t in tests]
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
        state, values = _parse_stream(stream, plans)
    except (_Malformed, ValueError, TypeError, RecursionError, MemoryError) as e:
        return fail("error", f"malformed result stream ({e})")
    if state != "ok" or status != "exit 0":
        return fail("error", f"program did not complete ({status}, {state})")
    failures = []
    for i, plan in enumerate(plans):
        why = _judge(plan, values.get(i))
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
