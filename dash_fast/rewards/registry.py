"""The built-in rewards by name, and :func:`get_reward_func`, which turns a config entry into a function."""

from __future__ import annotations

import difflib
import importlib

from dash_fast.rewards.answers import RewardFunc, exact_answer_reward, format_reward, math_reward
from dash_fast.rewards.code import code_reward

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
