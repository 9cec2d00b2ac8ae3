"""Reward *models* as reward functions, with TRL's semantics.

A `reward_funcs` entry may be a model id / path or a loaded `AutoModelForSequenceClassification`. TRL
scores each completion by rendering prompt + completion (the chat template for conversational prompts,
plain concatenation otherwise), tokenizing it right-padded with the reward model's own tokenizer and
taking the logit of class 0 at the last non-pad token; no gradient, batched, on the trainer's device.
`RewardModelFunc` does exactly that and is then called like any other reward function.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def is_reward_model_id(entry: Any) -> bool:
    """A string that names a model (a local folder with a config, or a hub-style `org/name` id) rather than
    one of dash-fast's built-in reward names."""
    if not isinstance(entry, str):
        return False
    from dash_fast.rewards.registry import REWARD_FUNCS

    if entry in REWARD_FUNCS:
        return False
    return os.path.isdir(entry) or ("/" in entry and ":" not in entry)  # "module:function" is a function


class RewardModelFunc:
    """`f(prompts, completions, **_) -> list[float]`: the class-0 logit of a sequence-classification model."""

    def __init__(self, model: Any, tokenizer: Any = None, batch_size: int = 64,
                 model_init_kwargs: dict | None = None, chat_template_kwargs: dict | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, str):
            model = AutoModelForSequenceClassification.from_pretrained(
                model, num_labels=1, **(model_init_kwargs or {}))
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"reward model must be a model id/path or a torch module, got {type(model).__name__}")
        name_or_path = model.config._name_or_path
        if tokenizer is None:
            if not name_or_path:
                raise ValueError("reward model: pass reward_processing_classes (its tokenizer is unknown)")
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="right")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id  # the last-token pooling looks for the first pad
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chat_template_kwargs = dict(chat_template_kwargs or {})  # TRL's, for chat-rendered texts
        self.__name__ = str(name_or_path).rstrip("/").split("/")[-1] or type(model).__name__

    def to(self, device: torch.device) -> RewardModelFunc:
        self.model.to(device)
        return self

    def texts(self, prompts: list, completions: list) -> list[str]:
        """Prompt + completion as the reward model reads it (TRL: chat-rendered when the prompt is chat)."""
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list):  # conversational
                reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
                out.append(self.tokenizer.apply_chat_template(prompt + reply, tokenize=False,
                                                              **self.chat_template_kwargs))
            else:
                text = completion if isinstance(completion, str) else completion[-1]["content"]
                out.append(prompt + text)
        return out

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        device = next(self.model.parameters()).device
        texts = self.texts(prompts, completions)
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False).to(device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def resolve_reward_models(reward_funcs: Any, processing_classes: Any, model_init_kwargs: dict | None = None,
                          chat_template_kwargs: dict | None = None):
    """TRL's `reward_funcs` / `reward_processing_classes` pair -> (callables, processing classes).

    Model ids/paths and loaded `PreTrainedModel`s become `RewardModelFunc`s; functions and built-in reward
    names pass through. `reward_processing_classes` is one tokenizer (or None) per reward, or a single one
    for a single reward; entries for plain functions are ignored, as TRL does."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if processing_classes is None:
        classes = [None] * len(funcs)
    elif isinstance(processing_classes, (list, tuple)):
        classes = list(processing_classes)
    else:
        classes = [processing_classes]
    if len(classes) != len(funcs):
        raise ValueError(f"reward_processing_classes has {len(classes)} entries: the number must match "
                         f"reward_funcs ({len(funcs)})")
    out, out_classes = [], []
    for func, cls in zip(funcs, classes, strict=True):
        if is_reward_model_id(func) or isinstance(func, torch.nn.Module):
            func = RewardModelFunc(func, cls, model_init_kwargs=model_init_kwargs,
                                   chat_template_kwargs=chat_template_kwargs)
            cls = func.tokenizer
        out.append(func)
        out_classes.append(cls)
    return out, out_classes
