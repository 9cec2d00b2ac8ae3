"""The code reward's verdict, decided outside the program: each test is split into a skeleton evaluated here
and the program-dependent values (holes) the sandbox returns; the sandbox's result stream is decoded and
judged here.

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

Stdlib only, and loadable by file path next to sandbox.py (as sandbox_runner.py is).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass

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
class Plan:
    steps: list[tuple[str, str]]  # sent to the sandbox
    checks: list[tuple[ast.expr, str]]  # (skeleton, its source), in order; holes index into steps
    unsplittable: str | None = None  # why this test cannot be judged outside the program


def plan_test(test: str, bound: frozenset[str]) -> Plan:
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
        return Plan([], [], f"test does not parse: {type(e).__name__}")
    except _Unsplittable as e:
        return Plan([], [], str(e))
    return Plan(steps, checks)


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


class Malformed(Exception):
    pass


def _float(s) -> float:
    if type(s) is not str or not _FLOAT_RE.fullmatch(s):
        raise Malformed("float")
    return float(s)


def decode(x, depth: int = 0):
    """Tagged plain data from the sandbox -> builtin objects. Anything else is malformed."""
    if depth > 200 or type(x) is not list or not x or type(x[0]) is not str:
        raise Malformed("value")
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
        return _SEQ[tag](decode(e, depth + 1) for e in x[1])
    if tag == "d" and n == 2 and type(x[1]) is list:
        out = {}
        for pair in x[1]:
            if type(pair) is not list or len(pair) != 2:
                raise Malformed("dict")
            out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
        return out
    raise Malformed(f"tag {tag!r}")


def _no_numbers(_s):
    raise Malformed("bare number")


def parse_stream(data: bytes, plans: list[Plan]) -> tuple[str, dict[int, list]]:
    """The runner's result lines -> (program state: 'ok' | 'error' | 'incomplete', {test: hole values}).

    Lines: {"code": "ok"|"error"}, then {"t": i, "r": [...]} per test, then {"done": true}. Any
    deviation (bad JSON, unknown keys, a duplicate, out-of-order, a value that does not decode) is
    malformed: the whole program scores 0."""
    state, results, done = None, {}, False
    for line in data.split(b"\n"):
        if not line:
            continue
        if done:
            raise Malformed("data after done")
        try:
            obj = json.loads(line, parse_float=_no_numbers, parse_constant=_no_numbers)
        except (ValueError, RecursionError) as e:
            raise Malformed(f"json: {type(e).__name__}") from None
        if type(obj) is not dict:
            raise Malformed("line")
        if state is None:
            if set(obj) != {"code"} or obj["code"] not in ("ok", "error"):
                raise Malformed("first line")
            state = obj["code"]
            continue
        if set(obj) == {"done"} and obj["done"] is True:
            done = True
            continue
        i = obj.get("t")
        if set(obj) != {"t", "r"} or type(i) is not int or i in results or not 0 <= i < len(plans):
            raise Malformed("test line")
        if state != "ok" or (results and i <= max(results)) or type(obj["r"]) is not list:
            raise Malformed("test order")
        steps, values = plans[i].steps, []
        if len(obj["r"]) > len(steps):
            raise Malformed("too many results")
        for (kind, _), r in zip(steps, obj["r"]):
            if kind == "x" and r is None:
                values.append(None)
            elif type(r) is list and len(r) == 2 and r[0] == "err" and type(r[1]) is str:
                values.append(_HoleError(r[1][:200]))
            elif kind == "e" and type(r) is list and len(r) == 2 and r[0] == "ok":
                values.append(decode(r[1]))
            else:
                raise Malformed("result")
        results[i] = values
    if state is None:
        return "incomplete", {}
    return (state if done else "incomplete"), results


def judge(plan: Plan, values: list | None) -> str | None:
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
