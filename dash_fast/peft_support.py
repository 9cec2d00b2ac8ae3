"""LoRA / PEFT for the TRL-style trainer: `peft_config=LoraConfig(...)` or a `PeftModel` as the model.

Only adapter parameters train (PEFT freezes the rest). The embedded engine's static decoder and the
shared-prompt forward read base weights directly, so with adapter layers both fall back to the model's
own forward (`torch_engine.static_unsupported` says why); the loss reads `lm_head.weight` directly, so
an adapter *on* lm_head would be silently ignored and is refused (modules_to_save=["lm_head"] trains it).
Checkpoints are written with `PeftModel.save_pretrained`: the adapters, in PEFT format.
"""

from __future__ import annotations

from typing import Any

import torch


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (adapter layers are injected into it in place)."""
    return model.get_base_model() if is_peft_model(model) else model


def check_adapters(model: torch.nn.Module) -> None:
    """Refuse adapters dash-fast would silently ignore."""
    config = next(iter(getattr(model, "peft_config", {}).values()), None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise ValueError(f"dash-fast does not support peft_config={type(config).__name__}: prompt-learning "
                         "methods add virtual tokens in PeftModel.forward, which the trainer's forward bypasses")
    head = base_model(model).get_output_embeddings()
    if head is not None and hasattr(head, "lora_A"):
        raise ValueError("dash-fast does not support a LoRA adapter on lm_head: the loss kernels read "
                         "lm_head.weight directly (use modules_to_save=['lm_head'] to train the head)")


def apply_peft(model: Any, peft_config: Any, load_kwargs: dict | None = None) -> torch.nn.Module:
    """`model` (id / path / module) with `peft_config` applied; a PeftModel passes through, checked."""
    if peft_config is not None:
        try:
            from peft import get_peft_model
        except ImportError:
            raise ImportError("peft_config needs peft: pip install 'dash-fast[peft]'") from None
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, **(load_kwargs or {}))
        if is_peft_model(model):
            raise ValueError("pass either a PeftModel or peft_config, not both")
        model = get_peft_model(model, peft_config)
    if is_peft_model(model):
        check_adapters(model)
    return model
