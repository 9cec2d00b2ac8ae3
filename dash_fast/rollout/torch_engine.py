"""The embedded sampler: batched prefill + KV-cached decode on the trainer's own module (no weight copy).

Finished rows are dropped from the batch (and from the KV cache) as soon as they emit a stop token, so
the decode cost follows the rows still running, not the longest one.
"""

from __future__ import annotations

import torch

from dash_fast.rollout.base import Rollout, SamplingParams


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. Returns (tokens, log p(token) under softmax(logits / temperature)).

    top-k / top-p only restrict which tokens can be drawn; the returned log-prob is on the full
    tempered distribution, as TRL computes it in the trainer, so the two agree.
    """
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    masked = scaled
    if 0 < params.top_k < masked.shape[-1]:
        kth = torch.topk(masked, params.top_k, dim=-1).values[:, -1:]
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(masked, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, -1) > params.top_p  # keep the token crossing p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        masked = masked.masked_fill(drop, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


class TorchEngine:
    """Generates with a Hugging Face causal LM's own forward and a DynamicCache."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: the engine samples from the trainer's parameter tensors themselves."""
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        from transformers import DynamicCache

        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        B = len(prompt_ids)
        P = max(len(p) for p in prompt_ids)
        ids = torch.full((B, P), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompt_ids):  # left padding: every row's next token is at column P
            ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)

        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        stop = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=device)

        out_tokens = torch.full((B, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        out_logps = torch.zeros((B, params.max_new_tokens), dtype=torch.float32, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        active = torch.arange(B, device=device)  # original row index of each row still in the batch

        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        next_pos = positions[:, -1:] + 1
        decode_steps = 0
        for t in range(params.max_new_tokens):
            tokens, logps = sample_next(logits, params, generator)
            out_tokens[active, t] = tokens
            out_logps[active, t] = logps
            lengths[active] = t + 1
            done = torch.isin(tokens, stop)
            if t == params.max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):  # drop finished rows from the batch and the cache
                keep = (~done).nonzero().view(-1)
                cache.batch_select_indices(keep)
                active, tokens, attn, next_pos = active[keep], tokens[keep], attn[keep], next_pos[keep]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=next_pos,
                        cache=cache, use_cache=True)
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
            decode_steps += 1

        model.train(was_training)
        width = max(int(lengths.max()), 1)
        mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()
        tokens_cpu = out_tokens[:, :width].masked_fill(mask == 0, self.pad_token_id)
        return Rollout(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=tokens_cpu.cpu(),
            completion_mask=mask.cpu(),
            sampling_logps=(out_logps[:, :width] * mask).cpu(),
            stats={"decode_steps": decode_steps + 1, "generated_tokens": int(lengths.sum())},
        )
