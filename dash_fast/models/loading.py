"""Model loading and the refusals made before any weights load.

`resolve_device` / `attn_implementation` / `load_model` put a causal LM on its device in the run's dtype
(fp32 masters for a bf16 run, mixed_precision.py); `check_text_only` refuses what the engines and the
training forward cannot run (a vision-language model, logits transformed after the lm_head).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dash_fast.models.mixed_precision import to_masters

__all__ = ["attn_implementation", "check_text_only", "load_causal_lm", "load_model", "logit_transform", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per local rank
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(name)


def attn_implementation(device: torch.device, dtype: str) -> str:
    """flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed (`pip install dash-fast[flash]`),
    else PyTorch SDPA (which itself picks a flash / memory-efficient kernel on CUDA)."""
    import importlib.util

    if device.type == "cuda" and dtype in ("bfloat16", "float16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def load_model(model: str | torch.nn.Module, dtype: str, device: torch.device,
               masters: bool = False) -> torch.nn.Module:
    """The model on `device`: loaded in `dtype`, or with `masters` (a bf16 run's fp32 master weights,
    mixed_precision.py) loaded in fp32 / its trainable parameters cast to fp32."""
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
        return to_masters(model) if masters else model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32 if masters else getattr(torch, dtype),
                              "attn_implementation": attn_implementation(device, dtype)}
    return AutoModelForCausalLM.from_pretrained(model, **kwargs).to(device)


def logit_transform(model) -> str | None:
    """Why the model's logits are not `hidden @ lm_head.T` up to a constant factor (the loss and log-prob ops
    compute that; the learner folds Cohere's / Granite's factor into the hidden states, learner.logit_multiplier),
    naming the config field; None when they are. Gemma-2/3 soft-cap them. `model`: a module or its config."""
    config = getattr(model, "config", model)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    checks = (("final_logit_softcapping", None),)
    for name, neutral in checks:
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return (f"config.{name}={value}: it transforms the logits after the lm_head, which dash-fast's loss, "
                    "log-prob and sampling ops do not apply")
    return None


def check_text_only(model: str | torch.nn.Module, trust_remote_code: bool = False) -> None:
    """Refuse, before any weights load, a vision-language model (its config has a vision tower, or is one of
    transformers' image-text-to-text types: the engines and the training forward take token ids only, so its
    image inputs could not reach it) and one whose logits the ops cannot compute (`logit_transform`)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if isinstance(model, str):
        try:
            config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):  # not a readable config: loading the model reports it
            return
        name = model
    else:
        config = getattr(model, "config", None)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = type(inner).__name__
    model_type = getattr(config, "model_type", None)
    if getattr(config, "vision_config", None) is not None or model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"dash-fast does not support model={name!r}: its config ({model_type}) is a vision-language "
                         "config, and dash-fast's engines and training forward take token ids only (no images); "
                         "pass a text-only causal LM")
    reason = logit_transform(config)
    if reason:
        raise ValueError(f"dash-fast does not support {reason}")


def load_causal_lm(name: str, args: Any, init_kwargs: dict, peft: bool = False) -> torch.nn.Module:
    """A causal LM loaded as TRL's GRPOTrainer loads one from `args` (a GRPOConfig): `model_init_kwargs` (dtype,
    attn_implementation, ...) and `trust_remote_code`.
    `bf16=True` loads the fp32 master weights (mixed_precision.py), as TRL's autocast trains an fp32
    checkpoint; with PEFT the frozen base loads in bf16 (only the adapters train, in fp32)."""
    from transformers import AutoModelForCausalLM

    dtype = "bfloat16" if getattr(args, "bf16", False) else "float16" if getattr(args, "fp16", False) else "float32"
    device = resolve_device("cpu" if getattr(args, "use_cpu", False) else "auto")
    masters = dtype == "bfloat16" and not peft and (getattr(args, "extra", None) or {}).get("master_weights", True)
    kwargs = {"dtype": torch.float32 if masters else getattr(torch, dtype), **init_kwargs}
    if isinstance(kwargs["dtype"], str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    kwargs.pop("device_map", None)
    remote = getattr(args, "trust_remote_code", False)
    if "attn_implementation" not in kwargs:
        try:
            return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=remote, **kwargs,
                                                        attn_implementation=attn_implementation(device, dtype))
        except ValueError as e:  # an architecture without SDPA / flash-attn (e.g. Gemma2): its default
            if "attention implementation" not in str(e) and "does not support" not in str(e):
                raise
    return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=remote, **kwargs)
