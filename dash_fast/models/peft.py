"""LoRA / PEFT for the TRL-style trainer: `peft_config=LoraConfig(...)` or a `PeftModel` as the model.

Only adapter parameters train (PEFT freezes the rest). The embedded engine's static decoder and the
shared-prompt forward read base weights directly, so with adapter layers both fall back to the model's
own forward (`models/decoder.static_unsupported` says why); the loss reads `lm_head.weight` directly, so
an adapter *on* lm_head would be silently ignored and is refused (modules_to_save=["lm_head"] trains it).
Checkpoints are written with `PeftModel.save_pretrained`: the adapters, in PEFT format; resume loads them
back (`load_adapter_weights`), the base weights being the ones the model was built with.

The reference policy for `beta > 0` lives in the policy's own weights, as in TRL: the base model with the
adapters disabled (a new adapter from `peft_config`), or, for a PeftModel passed in (whose adapter may
already be trained), a frozen copy of its adapter named "ref" (`add_reference_adapter`). Either way no
second copy of the base weights exists.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


REF_ADAPTER = "ref"


def add_reference_adapter(model: torch.nn.Module) -> None:
    """TRL's reference for a PeftModel passed in with beta != 0: a frozen copy of its active adapter, so that
    the KL is to the initial policy (base + that adapter), not to the bare base."""
    name = model.active_adapter
    model.add_adapter(REF_ADAPTER, model.peft_config[name])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, param in params.items():
            if f".{REF_ADAPTER}." in key:
                param.copy_(params[key.replace(f".{REF_ADAPTER}.", f".{name}.")])
                param.requires_grad_(False)


@contextlib.contextmanager
def reference_policy(model: torch.nn.Module) -> Iterator[None]:
    """Inside it the PeftModel computes the reference policy: the "ref" adapter when there is one, else the
    base model with adapters disabled. In eval mode (no dropout), like the frozen copy of a full model."""
    was_training = model.training
    model.eval()
    try:
        if REF_ADAPTER in model.peft_config:
            previous = model.active_adapter
            model.set_adapter(REF_ADAPTER)
            try:
                yield
            finally:
                model.set_adapter(previous)  # marks `previous` trainable again, as it was
        else:
            with model.disable_adapter():
                yield
    finally:
        model.train(was_training)


def require_adapter_checkpoint(path: str) -> None:
    """A PeftModel resumes from a checkpoint of adapters (adapter_config.json), never from a full model's."""
    if not os.path.exists(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"checkpoint {path} holds no PEFT adapter (adapter_config.json), but the model is a "
                         "PeftModel: resume a LoRA run from its own checkpoint")


def load_adapter_weights(path: str, model: torch.nn.Module) -> None:
    """Load a checkpoint's trained adapter (PEFT format, as save_pretrained wrote it) into `model`, exactly;
    the "ref" adapter is not trained and stays as built."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    name = model.active_adapter
    require_adapter_checkpoint(path)
    weights = load_peft_weights(path, device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not match the model's adapter {name!r}: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")


def apply_peft(model: Any, peft_config: Any, load_kwargs: dict | None = None,
               beta: float = 0.0) -> torch.nn.Module:
    """`model` (id / path / module) with `peft_config` applied; a PeftModel passes through, checked, and gets
    TRL's frozen "ref" adapter when `beta != 0`."""
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
        if peft_config is None and beta != 0 and REF_ADAPTER not in model.peft_config:
            add_reference_adapter(model)
    return model
