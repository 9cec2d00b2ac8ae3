"""Calling reward functions as TRL 1.16 does, and checking what they return.

:func:`score_completions` passes the dataset columns and the trainer's keyword arguments, awaits ``async def``
functions together, and checks each output (:func:`call_reward_func`): one finite float or None per
completion, else a one-line :class:`RewardError` naming the function.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from dash_fast.rewards.answers import RewardFunc

logger = logging.getLogger(__name__)


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
