"""Reward functions with TRL's signature, their registry, and the checks the trainer runs around them.

A reward function is ``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]``:
``completions`` are strings, ``columns`` are dataset columns as lists (one entry per completion).
``None`` means "not applicable" to that row: the trainer sums the others (all None: 0, with a warning, as TRL).

Top-level imports are stdlib only: math_verify, torch and the sandbox load on first use, and the
math worker process (see :func:`math_reward`) loads this file on its own.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import math
import numbers
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list]

# ----------------------------------------------------------------------------- answer extraction

_END_MARKERS = re.compile(r"(?:\s|<\|[^|<>]*\|>|</s>|<eos>|<pad>|<eot>)+\Z")
_ANSWER_MARKER = re.compile(r"####|answer\s*:|=", re.IGNORECASE)


def strip_end_markers(text: str) -> str:
    """Drop trailing end-of-text tokens (``<eos>``, ``</s>``, ``<|im_end|>``, ...) and whitespace."""
    return _END_MARKERS.sub("", text)


def extract_final_answer(text: str) -> str:
    """The final answer of a completion, as the embedded task writes it (``...steps... ANSWER<eos>``).

    Rule: remove trailing end-of-text markers, take the last non-empty line, and on it the text after
    the last ``####``, ``answer:`` (any case) or ``=``, whichever comes last; if none occurs, the whole
    line. Stripped, nothing else normalised. Examples: ``"3+4=7\\n7*2=14<eos>" -> "14"``,
    ``"so x = 12"`` -> ``"12"``, ``"Answer: 5"`` -> ``"5"``, ``"14"`` -> ``"14"``, ``""`` -> ``""``.
    """
    lines = [line for line in strip_end_markers(text).splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1]
    markers = list(_ANSWER_MARKER.finditer(last))
    return (last[markers[-1].end() :] if markers else last).strip()


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces kept; None if absent.

    Also reads the brace-less ``\\boxed 5`` form. An unclosed brace gives None.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":
        m = re.match(r" +([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def gsm8k_final_answer(text: str) -> str:
    """The value after the last ``####`` (GSM8K's answer line), thousands separators removed."""
    value = text.rsplit("####", 1)[-1].strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", value)


# ----------------------------------------------------------------------------- reward functions


def _column(columns: dict[str, Any], name: str, func: str, n: int) -> list | None:
    col = columns.get(name)
    if col is not None and len(col) != n:
        raise ValueError(f"{func}: column {name!r} has {len(col)} entries for {n} completions")
    return col


def exact_answer_reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """1.0 if :func:`extract_final_answer` of the completion equals ``answer`` (both stripped), else 0.0.

    Rows whose ``answer`` is None are not applicable (None). Needs an ``answer`` column.
    """
    answers = _column(columns, "answer", "exact_answer_reward", len(completions))
    if answers is None:
        raise ValueError("exact_answer_reward needs an 'answer' column")
    return [
        None if gold is None else float(extract_final_answer(completion_text(c)) == str(gold).strip())
        for c, gold in zip(completions, answers)
    ]


MATH_TIMEOUT_S = 2  # per math_verify parse / compare; signal.alarm takes whole seconds
MATH_WORKER_TIMEOUT_S = 30.0  # off the main thread: the whole batch, plus MATH_TIMEOUT_S per row


def _gold_text(answer: Any, solution: Any) -> str | None:
    """Gold answer of a row: ``answer`` (GSM8K ``...#### 72`` or a bare value), else MATH's boxed ``solution``."""
    if answer is not None and str(answer).strip():
        answer = str(answer)
        return gsm8k_final_answer(answer) if "####" in answer else answer.strip()
    if solution is not None:
        solution = str(solution)
        boxed = extract_boxed(solution)
        return boxed if boxed is not None else (gsm8k_final_answer(solution) if "####" in solution else None)
    return None


def _pred_text(completion: str) -> str:
    """What math_verify parses: the completion, or just its value after ``####`` when there is no \\boxed."""
    if "\\boxed" not in completion and "####" in completion:
        return f"${gsm8k_final_answer(completion)}$"
    return completion


def _score_math(
    golds: Sequence[str | None], preds: Sequence[str], timeout_s: int | None
) -> list[float | None]:
    """math_verify check per row; any failure (unparsable, timeout, sympy error) scores 0.0.

    ``timeout_s`` uses math_verify's signal-based timeouts (main thread only); None disables them.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    @lru_cache(maxsize=1024)
    def parse_gold(gold: str):
        return parse(f"$\\boxed{{{gold}}}$", parsing_timeout=timeout_s)

    scores: list[float | None] = []
    for gold, pred in zip(golds, preds):
        if gold is None:
            scores.append(None)
            continue
        boxed = extract_boxed(pred)
        if (boxed if boxed is not None else pred).strip().strip("$").strip() == gold:
            scores.append(1.0)  # cheap exact match, no sympy
            continue
        try:
            gold_parsed = parse_gold(gold)
            pred_parsed = parse(_pred_text(pred), parsing_timeout=timeout_s)
            ok = bool(
                gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s)
            )
        except (Exception, TimeoutException):
            ok = False
        scores.append(float(ok))
    return scores


def _score_math_in_worker(golds: list[str | None], preds: list[str]) -> list[float | None]:
    """Run :func:`_score_math` in a fresh process, whose main thread can use signal timeouts.

    Used when the reward is computed off the main thread. The whole batch is bounded by a wall-clock
    timeout; if it passes, the batch scores 0.0 (logged), never a hang.
    """
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('dash_fast_rewards_worker', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "job = json.load(sys.stdin)\n"
        "print(json.dumps(mod._score_math(job['golds'], job['preds'], mod.MATH_TIMEOUT_S)))\n"
    )
    budget = MATH_WORKER_TIMEOUT_S + MATH_TIMEOUT_S * 3 * len(preds)
    try:
        out = subprocess.run(
            [sys.executable, "-c", script, os.path.abspath(__file__)],
            input=json.dumps({"golds": golds, "preds": preds}),
            capture_output=True,
            text=True,
            timeout=budget,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as e:
        logger.warning("math_reward worker failed (%s); scoring %d rows 0.0", type(e).__name__, len(preds))
        return [None if g is None else 0.0 for g in golds]


def math_reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """1.0 if the completion's answer equals the gold one under math_verify, else 0.0.

    Gold: ``answer`` (GSM8K ``"...#### 72"`` or a bare value) or else ``solution`` (MATH, its last
    ``\\boxed{}``); a row with neither is not applicable (None). Prediction: the completion's last
    ``\\boxed{}`` or ``####`` value, else whatever math_verify finds. Parse failures score 0.0.
    Timeouts: math_verify's signal alarms in the main thread; elsewhere a worker process (slower,
    never hangs).
    """
    n = len(completions)
    answers = _column(columns, "answer", "math_reward", n)
    solutions = _column(columns, "solution", "math_reward", n)
    if answers is None and solutions is None:
        raise ValueError("math_reward needs an 'answer' or a 'solution' column")
    golds = [
        _gold_text(
            answers[i] if answers is not None else None, solutions[i] if solutions is not None else None
        )
        for i in range(n)
    ]
    preds = [completion_text(c) for c in completions]
    if threading.current_thread() is threading.main_thread():
        return _score_math(golds, preds, MATH_TIMEOUT_S)
    return _score_math_in_worker(golds, preds)


_FINAL_LINE = re.compile(r"^(?:.*(?:####|answer\s*:|=))?\s*\S+$", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{.+\}", re.DOTALL)
_HASH_LINE = re.compile(r"^#### \S", re.MULTILINE)


def has_answer_format(text: str) -> bool:
    """Default format: a ``\\boxed{...}``, a ``#### `` answer line, or a final answer line.

    A final answer line is the last non-empty line (end markers removed) ending in a single token,
    optionally after ``=``, ``answer:`` or ``####``: ``"...\\n7*2=14<eos>"`` and ``"42"`` pass,
    ``"I am not sure"`` does not.
    """
    if _BOXED.search(text) or _HASH_LINE.search(text):
        return True
    lines = [line for line in strip_end_markers(text).splitlines() if line.strip()]
    return bool(lines) and _FINAL_LINE.match(lines[-1].strip()) is not None


def make_format_reward(pattern: str | re.Pattern | None = None) -> RewardFunc:
    """A format reward: 1.0 if ``pattern`` (regex, searched with MULTILINE) matches the completion.

    ``pattern=None`` uses :func:`has_answer_format`.
    """
    if pattern is None:
        check = has_answer_format
    else:
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        check = lambda text: regex.search(text) is not None

    def format_reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
        return [float(check(completion_text(c))) for c in completions]

    return format_reward


format_reward = make_format_reward()
format_reward.__doc__ = (
    "1.0 if the completion has an answer format (see :func:`has_answer_format`), else 0.0."
)

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The program in a completion: the last ```python (or ```py) block, else the last fenced block of
    any language, else the whole text. An unclosed last fence (truncated completion) counts."""
    blocks = _FENCE.findall(text)
    python = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return text


CODE_TIMEOUT_S = 5.0
CODE_MEMORY_MB = 512
CODE_WORKERS = 2


def make_code_reward(
    timeout_s: float = CODE_TIMEOUT_S,
    memory_mb: int = CODE_MEMORY_MB,
    max_workers: int = CODE_WORKERS,
    sandbox: str | None = None,
) -> RewardFunc:
    """An MBPP-style code reward with these sandbox limits (see :func:`code_reward`). ``sandbox``:
    "namespaces" | "unsafe-local" | None (the process default, set from the trainer's config)."""

    def code_reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
        """1.0 if the completion's code (:func:`extract_code`) passes every assert in ``test_list``
        (all-pass, as MBPP pass@1), else 0.0. Runs in :mod:`dash_fast.rewards.sandbox`, which judges the asserts
        outside the program and refuses to run (SandboxUnavailable) without containment. Optional MBPP columns:
        ``test_imports`` (run before the code) and ``test_setup_code`` (after it). Rows without tests: None.
        """
        from dash_fast.rewards.sandbox import run_many

        n = len(completions)
        tests = _column(columns, "test_list", "code_reward", n)
        if tests is None:
            raise ValueError("code_reward needs a 'test_list' column")
        imports = _column(columns, "test_imports", "code_reward", n) or [None] * n
        setup = _column(columns, "test_setup_code", "code_reward", n) or [None] * n
        rows, jobs = [], []
        for i, completion in enumerate(completions):
            row_tests = json.loads(tests[i]) if isinstance(tests[i], str) else tests[i]
            if not row_tests:
                continue
            parts = [*(imports[i] or []), extract_code(completion_text(completion)), setup[i] or ""]
            rows.append(i)
            jobs.append(("\n".join(parts), [str(t) for t in row_tests]))
        scores: list[float | None] = [None] * n
        for i, result in zip(
            rows, run_many(jobs, max_workers=max_workers, timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox)
        ):
            scores[i] = float(result.passed)
        return scores

    code_reward.needs_sandbox = True  # the trainer checks the sandbox before it starts
    return code_reward


code_reward = make_code_reward()

# ----------------------------------------------------------------------------- registry

REWARD_FUNCS: dict[str, RewardFunc] = {
    "exact_answer": exact_answer_reward,
    "math": math_reward,
    "format": format_reward,
    "code": code_reward,
}


def get_reward_func(name_or_callable: str | RewardFunc) -> RewardFunc:
    """A registered reward by name (``"math"`` or ``"math_reward"``), ``"module:function"``, or a callable."""
    if callable(name_or_callable):
        return name_or_callable
    if not isinstance(name_or_callable, str):
        raise ValueError(
            f"reward function must be a name or a callable, got {type(name_or_callable).__name__}"
        )
    name = name_or_callable.strip()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            func = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load reward function {name!r}: {e}") from e
        if not callable(func):
            raise ValueError(f"reward function {name!r} is not callable")
        return func
    key = name.lower().removesuffix("_reward")
    if key in REWARD_FUNCS:
        return REWARD_FUNCS[key]
    close = difflib.get_close_matches(key, REWARD_FUNCS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown reward function {name!r}{hint} known: {', '.join(sorted(REWARD_FUNCS))} "
        "(or 'module:function')"
    )


# ----------------------------------------------------------------------------- calling and combining


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it, in one line."""


def _func_name(func: Callable) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


def call_reward_func(
    func: RewardFunc,
    prompts: list,
    completions: list,
    completion_ids: list | None,
    columns: dict[str, list],
) -> list[float | None]:
    """Call one reward function and check its output: one finite float or None per completion.

    Raises :class:`RewardError` naming the function when it raises, returns the wrong length or a
    non-numeric value, or a nan/inf (name and row). A None is kept: "not applicable".
    """
    name = _func_name(func)
    try:
        out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as e:
        msg = " ".join(str(e).split())
        raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {msg}") from e
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # tensor / ndarray
    if not isinstance(out, (list, tuple)):
        raise RewardError(
            f"reward function {name!r} returned {type(out).__name__}, expected a list of floats or None"
        )
    if len(out) != len(completions):
        raise RewardError(
            f"reward function {name!r} returned {len(out)} values for {len(completions)} completions"
        )
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise RewardError(f"reward function {name!r} returned a non-numeric value at row {i}: {v!r:.80}")
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(f"reward function {name!r} returned a non-finite value at row {i}: {v}")
        values.append(v)
    return values


# dataset columns TRL does not pass on: the prompt and the completion come as `prompts` / `completions`
_RESERVED_COLUMNS = ("prompt", "completion", "completion_ids")
# keyword arguments the trainer adds that a warning about a row's inputs leaves out (as TRL)
_TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric")


def is_async_callable(func: Callable) -> bool:
    """An ``async def`` function, a partial of one, or an instance whose ``__call__`` is one (as TRL checks)."""
    import functools
    import inspect

    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def score_completions(
    funcs: Sequence[RewardFunc],
    prompts: list,
    completions: list,
    completion_ids: list | None,
    columns: dict[str, list],
    **trainer_kwargs: Any,
) -> list[list[float | None]]:
    """Every reward function's values, called as TRL 1.16 calls them: ``f(prompts=..., completions=...,
    completion_ids=..., **columns, trainer_state=..., log_extra=..., log_metric=...)``; dataset columns named
    prompt / completion / completion_ids are not passed (they would collide); ``async def`` functions are
    awaited together. Checks each output with :func:`call_reward_func`'s rules."""
    import asyncio

    kwargs = {k: v for k, v in columns.items() if k not in _RESERVED_COLUMNS}
    kwargs.update(trainer_kwargs)
    out: list[list[float | None] | None] = [None] * len(funcs)
    pending = []
    for k, func in enumerate(funcs):
        if is_async_callable(func):
            pending.append(k)
        else:
            out[k] = call_reward_func(func, prompts, completions, completion_ids, kwargs)
    if pending:
        async def gather():
            async def one(func):
                return await func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            return await asyncio.gather(*(one(funcs[k]) for k in pending), return_exceptions=True)

        results = _run_coroutine(gather())
        for k, result in zip(pending, results):
            out[k] = call_reward_func(_Returned(funcs[k], result), prompts, completions, completion_ids, kwargs)
    return out  # type: ignore[return-value]


class _Returned:
    """An async reward function's awaited result (or exception), passed through call_reward_func's checks."""

    def __init__(self, func: Callable, result: Any) -> None:
        self.__name__ = _func_name(func)
        self.result = result

    def __call__(self, **_: Any) -> Any:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def _run_coroutine(coro):
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # called from inside an event loop (a notebook): run beside it
        return pool.submit(asyncio.run, coro).result()


def warn_rows_without_reward(per_func: list[list[float | None]], prompts: list, completions: list,
                             columns: dict[str, list]) -> None:
    """TRL's warning when every reward function returned None for a row (the row's reward becomes 0)."""
    rows = [i for i in range(len(prompts)) if all(values[i] is None for values in per_func)]
    if not rows:
        return
    i = rows[0]
    inputs = {k: v[i] for k, v in columns.items() if k not in _TRAINER_KWARGS}
    inputs.update(prompt=prompts[i], completion=completions[i])
    logger.warning("All reward functions returned None for the following kwargs: %s (the first of %d such row(s)). "
                   "Please ensure that at least one reward function returns a valid reward.", inputs, len(rows))
