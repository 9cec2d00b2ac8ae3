"""Adapters from real dataset rows (GSM8K, MATH, MBPP) to dash-fast's standard columns.

Standard columns: ``prompt`` (str, or chat messages ``[{"role", "content"}]`` via :func:`to_chat`),
``answer`` (the gold value the rewards compare against), and every other column passed through
(``solution`` for the math rewards, ``test_list`` for :func:`dash_fast.rewards.code_reward`, ...).
A malformed row raises ``ValueError`` naming the row index and the column, before any training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from dash_fast.rewards.answers import extract_boxed, gsm8k_final_answer

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
MBPP_INSTRUCTION = "Write the function in a ```python code block."


def _field(row: dict, index: int, column: str, kind: type | tuple[type, ...] = str) -> Any:
    if column not in row or row[column] is None:
        raise ValueError(f"row {index}: missing column {column!r}")
    value = row[column]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"row {index}: column {column!r} must be {want}, got {type(value).__name__}")
    return value


def adapt_gsm8k(row: dict, index: int = 0, instruction: str = GSM8K_INSTRUCTION) -> dict:
    """GSM8K (``question``, ``answer`` = reasoning + ``#### n``) -> prompt, answer = n, solution = full text."""
    question = _field(row, index, "question")
    full = _field(row, index, "answer")
    if "####" not in full:
        raise ValueError(f"row {index}: column 'answer' has no '#### <answer>' line")
    answer = gsm8k_final_answer(full)
    if not answer:
        raise ValueError(f"row {index}: column 'answer' has an empty '####' value")
    prompt = f"{question.strip()}\n{instruction}" if instruction else question.strip()
    return {**row, "prompt": prompt, "answer": answer, "solution": full}


def adapt_math(row: dict, index: int = 0, instruction: str = MATH_INSTRUCTION) -> dict:
    """MATH (``problem``, ``solution`` with ``\\boxed{}``) -> prompt, answer = last boxed content."""
    problem = _field(row, index, "problem")
    solution = _field(row, index, "solution")
    answer = extract_boxed(solution)
    if answer is None:
        raise ValueError(f"row {index}: column 'solution' has no complete \\boxed{{...}} answer")
    prompt = f"{problem.strip()}\n{instruction}" if instruction else problem.strip()
    return {**row, "prompt": prompt, "answer": answer}


def adapt_mbpp(row: dict, index: int = 0, instruction: str = MBPP_INSTRUCTION) -> dict:
    """MBPP (``text`` or sanitized ``prompt``, ``test_list``) -> prompt with the task and the first test
    as an example; ``test_list`` stays for the code reward; answer = reference ``code`` if present."""
    task_column = "text" if "text" in row else "prompt"
    task = _field(row, index, task_column)
    tests = _field(row, index, "test_list", (list, tuple))
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"row {index}: column 'test_list' must be a non-empty list of str")
    prompt = f"{task.strip()}\nYour code should pass this test:\n{tests[0]}"
    if instruction:
        prompt += f"\n{instruction}"
    return {**row, "prompt": prompt, "answer": row.get("code"), "test_list": list(tests)}


FORMATS: dict[str, Callable[..., dict]] = {"gsm8k": adapt_gsm8k, "math": adapt_math, "mbpp": adapt_mbpp}


def detect_format(columns: Iterable[str]) -> str | None:
    """The known format whose columns are present ('gsm8k', 'math', 'mbpp'), or None (unknown, or
    already standard)."""
    cols = set(columns)
    if "test_list" in cols and ("text" in cols or "prompt" in cols):
        return "mbpp"
    if "prompt" in cols:
        return None
    if {"question", "answer"} <= cols:
        return "gsm8k"
    if {"problem", "solution"} <= cols:
        return "math"
    return None


DATASET_FORMATS = ("auto", "prompt", *FORMATS)
# The reward each format is scored with when the user names none (TRL has no default; dash-fast's CLI does).
DEFAULT_REWARDS = {"prompt": "exact_answer", "gsm8k": "math", "math": "math", "mbpp": "code"}
_LAYOUTS = "prompt (a 'prompt' column), gsm8k (question, answer), math (problem, solution), mbpp (text, test_list)"


def resolve_format(rows: list[dict], fmt: str = "auto", prompt_column: str = "prompt") -> str:
    """The format rows are read as: `fmt`, or with 'auto' the one their first row's columns show.
    Raises ValueError (one line: the columns found and the formats known) when no format fits."""
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"dataset_format={fmt!r}: must be one of {', '.join(DATASET_FORMATS)}")
    if fmt != "auto" or not rows:
        return "prompt" if fmt == "auto" else fmt
    columns = list(rows[0])
    found = detect_format(columns)
    if found is None and prompt_column in columns:
        return "prompt"
    if found is None:
        raise ValueError(f"unknown dataset layout: columns {sorted(columns)}; known formats: {_LAYOUTS} "
                         "(set dataset_format, or prompt_column for the prompt's column)")
    return found


def format_rows(rows: list[dict], fmt: str = "auto", prompt_column: str = "prompt") -> tuple[list[dict], str]:
    """Rows in dash-fast's standard columns (`prompt`, `answer`, ...) and the format they were read as;
    'prompt' rows are returned as they are."""
    fmt = resolve_format(rows, fmt, prompt_column)
    if fmt == "prompt":
        return rows, fmt
    return [FORMATS[fmt](row, i) for i, row in enumerate(rows)], fmt


def load_dataset_rows(source: Any, fmt: str = "auto", prompt_column: str = "prompt",
                      name: str = "dataset") -> tuple[list[dict], str]:
    """Rows of a dataset (path, `datasets.Dataset` or list of dicts) in the standard columns, and their
    format; a bad layout or row is a DataError naming the dataset."""
    from dash_fast.data.prompts import DataError, load_rows

    try:
        return format_rows(load_rows(source), fmt, prompt_column)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{name}: {e}") from None


def _adapter(fmt: str) -> Callable[..., dict]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def to_chat(prompt: str | list[dict], system_prompt: str | None = None) -> list[dict]:
    """A prompt as chat messages for instruct models; a message list is kept (system prompt prepended
    unless it already starts with one)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(
        isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt
    ):
        messages = [dict(m) for m in prompt]
    else:
        raise ValueError(
            f"prompt must be a str or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}"
        )
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def adapt_rows(
    rows: Iterable[dict], fmt: str | None = None, *, chat: bool = False, system_prompt: str | None = None
) -> list[dict]:
    """Adapt plain row dicts (format auto-detected when ``fmt`` is None; unknown -> rows unchanged)."""
    rows = list(rows)
    fmt = fmt or (detect_format(rows[0].keys()) if rows else None)
    adapt = _adapter(fmt) if fmt else (lambda row, index: dict(row))
    out = [adapt(row, i) for i, row in enumerate(rows)]
    if chat:
        for row in out:
            row["prompt"] = to_chat(row["prompt"], system_prompt)
    return out


def adapt_dataset(dataset, fmt: str | None = None, *, chat: bool = False, system_prompt: str | None = None):
    """Adapt a ``datasets.Dataset`` (format auto-detected when ``fmt`` is None)."""
    fmt = fmt or detect_format(dataset.column_names)
    if fmt is None and not chat:
        return dataset
    adapt = _adapter(fmt) if fmt else (lambda row, index: dict(row))

    def fn(row: dict, index: int) -> dict:
        row = adapt(row, index)
        if chat:
            row["prompt"] = to_chat(row["prompt"], system_prompt)
        return row

    return dataset.map(fn, with_indices=True, load_from_cache_file=False, desc=f"format {fmt or 'chat'}")


def load_formatted(
    path: str, fmt: str | None = None, *, split: str = "train", cache_dir: str | None = None, **kwargs
):
    """Load a local JSONL / JSON / parquet file with ``datasets`` (no network) and adapt it.

    ``kwargs`` go to :func:`adapt_dataset` (``chat``, ``system_prompt``).
    """
    from datasets import load_dataset

    ext = os.path.splitext(path)[1].lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(ext)
    if builder is None:
        raise ValueError(f"unsupported dataset file {path!r}: expected .jsonl, .json or .parquet")
    dataset = load_dataset(builder, data_files=path, split=split, cache_dir=cache_dir)
    return adapt_dataset(dataset, fmt, **kwargs)
