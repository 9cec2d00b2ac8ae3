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
solution can signal as well.

Containment (Linux namespaces; works without root where the kernel allows unprivileged user
namespaces; see :func:`check_sandbox`). A fork server (``python -I -S`` with an empty
environment, started once) forks a *keeper* per program, which enters fresh user (not as root),
mount, PID, network, IPC and UTS namespaces and forks the *runner*, PID 1 of the new PID namespace:

- file system: a new root (tmpfs) with read-only, nosuid binds of /usr, /bin, /lib*, the Python
  standard library and /dev/{null,zero,random,urandom}; a fresh /proc of the new PID namespace (the
  trainer's /proc/<pid>/environ is not in it); the working directory /tmp is a size-limited tmpfs
  (``disk_mb``, and 4096 inodes), so many 16 MiB files cannot fill the disk; no /home, /root, /etc,
  /work: the trainer's tokens and caches are not in the view. pivot_root drops the old root.
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

Status = Literal["ok", "timeout", "error", "killed"]
SandboxMode = Literal["namespaces", "unsafe-local"]
SANDBOX_MODES = ("namespaces", "unsafe-local")

# Fresh per-program uids are drawn from this range (as root). No passwd entry is needed.
UID_BASE = 1_500_000_000
UID_RANGE = 100_000_000

STDERR_TAIL_BYTES = 2000
RESULT_CAP_BYTES = 8 << 20  # a result stream larger than this is malformed (scores 0)


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
    if isinstance(op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and abs(b) > 10_000:
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


# ============================================================================ the runner (sandbox)
#
# Runs in the fork server's children; stdlib only, since the server is `python -I -S`.


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


def _runner(hdr: dict, server: dict, libc: _Libc | None) -> None:
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
        pid = os.fork()
    except BaseException as e:
        os.write(5, f"setup-error {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        os._exit(0)
    if pid == 0:
        _runner(hdr, server, libc)
        os._exit(0)
    for fd in (0, 1, 2, 3, 4):
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


# ============================================================================ parent: run


class _Server:
    """The trainer's handle on one fork server (started lazily, restarted if it died)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None  # subprocess.Popen
        self.sock: socket.socket | None = None

    def _start(self) -> None:
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        python = os.path.realpath(sys.executable)  # the base interpreter: no venv site-packages
        self.proc = subprocess.Popen(
            [python, "-I", "-S", os.path.abspath(__file__), "--serve", str(theirs.fileno())],
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


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]))
