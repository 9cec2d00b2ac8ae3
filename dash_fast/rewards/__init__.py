"""Rewards: the built-in reward functions, the registry that names them, and the errors a run reports.

Modules by job: ``answers`` (exact / math / format rewards and answer extraction), ``code`` (the code reward,
run in ``sandbox``: containment, with ``sandbox_runner`` inside it and the verdict in ``sandbox_verdict``),
``registry`` (names -> functions), ``calling`` (TRL's calling convention and output
checks), ``reward_models`` (sequence-classification models as reward functions).
"""

from dash_fast.rewards.answers import (
    RewardFunc,
    exact_answer_reward,
    format_reward,
    make_format_reward,
    math_reward,
)
from dash_fast.rewards.calling import RewardError
from dash_fast.rewards.code import code_reward, make_code_reward
from dash_fast.rewards.registry import REWARD_FUNCS, get_reward_func

__all__ = [
    "REWARD_FUNCS",
    "RewardError",
    "RewardFunc",
    "code_reward",
    "exact_answer_reward",
    "format_reward",
    "get_reward_func",
    "make_code_reward",
    "make_format_reward",
    "math_reward",
]
