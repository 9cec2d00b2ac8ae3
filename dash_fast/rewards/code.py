"""The MBPP-style code reward: the completion's program must pass every assert of its row's ``test_list``,
run in :mod:`dash_fast.rewards.sandbox`."""

from __future__ import annotations

import json
import re

from dash_fast.rewards.answers import RewardFunc, completion_text, reward_column

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
        tests = reward_column(columns, "test_list", "code_reward", n)
        if tests is None:
            raise ValueError("code_reward needs a 'test_list' column")
        imports = reward_column(columns, "test_imports", "code_reward", n) or [None] * n
        setup = reward_column(columns, "test_setup_code", "code_reward", n) or [None] * n
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
