"""Supervised warm start: next-token loss on the completion tokens of (prompt, completion) pairs.

The embedded default runs it before RL (as the paper's models start from a model that can already
answer sometimes); `dash-fast sft` runs it on any dataset with a completion column.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from dash_fast.data.prompts import pad_right


@dataclass
class SFTConfig:
    """Supervised warm start (used by the embedded default before RL; `steps: 0` skips it)."""

    steps: int = 0
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20


def sft_batches(prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int, steps: int,
                seed: int):
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(prompt_ids)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def run_sft(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    completions: list[str],
    cfg: SFTConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log_every: int = 50,
) -> list[dict]:
    """Train `model` in place for cfg.steps steps (AdamW, warmup then cosine decay). Returns the loss log."""
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    p_ids = [tokenizer(p)["input_ids"] for p in prompts]
    c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    log: list[dict] = []
    t0 = time.perf_counter()
    for step, batch in enumerate(sft_batches(p_ids, c_ids, cfg.batch_size, cfg.steps, seed), start=1):
        seqs = [p_ids[i] + c_ids[i] for i in batch]
        ids, attn = pad_right(seqs, tokenizer.pad_token_id)
        labels = ids.clone()
        labels[attn == 0] = -100
        for j, i in enumerate(batch):
            labels[j, : len(p_ids[i])] = -100  # learn the completion only
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps:
            log.append({"sft_step": step, "loss": out.loss.item(), "time_s": time.perf_counter() - t0})
    return log
