"""Answer rewards: exact match, math (math-verify) and format, and the answer extraction they share.

A reward function is ``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]``:
``completions`` are strings (or TRL's conversational messages, read by :func:`completion_text`), ``columns``
are dataset columns as lists (one entry per completion). ``None`` means "not applicable" to that row.

Top-level imports are stdlib only: math_verify loads on first use, and the math worker process (see
:func:`math_reward`) loads this file on its own, without importing dash_fast.
"""

from __future__ import annotations

import json
import logging
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



def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)



def reward_column(columns: dict[str, Any], name: str, func: str, n: int) -> list | None:
    """Dataset column `name` (None when absent), checked to hold one entry per completion (`func` names the
    reward in the error)."""
    col = columns.get(name)
    if col is not None and len(col) != n:
        raise ValueError(f"{func}: column {name!r} has {len(col)} entries for {n} completions")
    return col


def exact_answer_reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    """1.0 if :func:`extract_final_answer` of the completion equals ``answer`` (both stripped), else 0.0.

    Rows whose ``answer`` is None are not applicable (None). Needs an ``answer`` column.
    """
    answers = reward_column(columns, "answer", "exact_answer_reward", len(completions))
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
    answers = reward_column(columns, "answer", "math_reward", n)
    solutions = reward_column(columns, "solution", "math_reward", n)
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
