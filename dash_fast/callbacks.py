"""transformers-style callbacks: the TrainerState / TrainerControl they see, and the event dispatch.

A callback is any object with some of TrainerCallback's methods (`on_train_begin`, `on_step_begin`,
`on_substep_end`, `on_pre_optimizer_step`, `on_optimizer_step`, `on_step_end`, `on_log`, `on_evaluate`,
`on_save`, `on_train_end`; GRPOTrainer adds TRL's `on_init_end` and epoch events); each is called as
`fn(args, state, control, model=..., processing_class=..., optimizer=..., lr_scheduler=..., **event)`.

`on_substep_end` fires where transformers' Trainer fires it: after each gradient-accumulation micro-step of
an optimizer step except the last (whose end is the optimizer step). dash-fast's micro-steps are the
learner's token-budget micro-batches, so their number per step follows the kept rows' lengths and
`micro_batch_tokens`, not `gradient_accumulation_steps`; an out-of-memory retry re-runs (and re-fires) them.
"""

from __future__ import annotations

from typing import Any


def trainer_state(max_steps: int, logging_steps: int, save_steps: int, is_main: bool):
    """A transformers TrainerState and TrainerControl for a run of `max_steps` optimizer steps."""
    from transformers import TrainerControl, TrainerState

    state = TrainerState()
    state.max_steps, state.logging_steps, state.save_steps = max_steps, logging_steps, save_steps
    state.is_world_process_zero = state.is_local_process_zero = is_main
    return state, TrainerControl()


def fire(callbacks: list, event: str, args: Any, state, control, **kwargs) -> None:
    """Call `event` on every callback that has it, in order."""
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(args, state, control, **kwargs)
