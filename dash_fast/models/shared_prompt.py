"""The training forward with each prompt computed once per group (Llama-family decoders).

GRPO trains on G completions of every prompt. A plain forward runs the prompt G times; here the prompt
tokens of a micro-batch run once per distinct prompt, and each completion attends to its prompt's keys
and values (gathered by index, so the gradient of all G rows flows back into the one prompt pass) and
causally to its own tokens. The loss and every gradient are those of the plain forward (a test holds
them equal in float64); the work saved is (G - 1) prompt passes per group. The projections add their
weights' gradients into `.grad` in place (grad_accumulation.py).

Layout of one micro-batch: U distinct prompts left-padded to [U, P], R completions right-padded to
[R, C]; the decoder's linear layers run on the flat [U * P + R * C, hidden] tokens, attention in two
SDPA calls (prompts over themselves; completions over their prompt plus themselves).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from dash_fast.data.prompts import pad_left, unique_prompts
from dash_fast.models.decoder import (
    Projections,
    attention_input,
    attention_residual,
    embed,
    family_of,
    grouped_sdpa,
    mlp_block,
    prompt_attention_mask,
    qkv_projections,
    rms_norm,
    rotate_half,
    scale_embeddings,
    static_unsupported,
)
from dash_fast.models.grad_accumulation import ACCUMULATING


def shared_prompt_unsupported(model: torch.nn.Module) -> str | None:
    """Why this model must train with its own forward instead (None when the shared forward applies)."""
    reason = static_unsupported(model)
    if reason is not None:
        return reason
    if getattr(model.config, "attention_dropout", 0.0):  # training would apply it; this forward does not
        return "attention dropout"
    return None


def pack_shared(prompts: list[list[int]], completion_lengths: list[int], token_budget: int) -> list[list[int]]:
    """Micro-batches of row indices whose padded size U * P + R * C stays within `token_budget`.

    Rows are taken in order of completion length (little padding in [R, C]); a prompt counts once per
    micro-batch however many of its rows are in it. A row alone may exceed the budget."""
    order = sorted(range(len(prompts)), key=lambda i: completion_lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    seen: set[tuple[int, ...]] = set()
    longest_prompt = longest_completion = 0
    for i in order:
        key = tuple(prompts[i])
        p = max(longest_prompt, len(prompts[i]))
        c = max(longest_completion, completion_lengths[i])
        cost = (len(seen) + (key not in seen)) * p + (len(current) + 1) * c
        if current and cost > token_budget:
            batches.append(current)
            current, seen = [], set()
            p, c = len(prompts[i]), completion_lengths[i]
        current.append(i)
        seen.add(key)
        longest_prompt, longest_completion = p, c
    if current:
        batches.append(current)
    return batches


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in max(dtype, float32). Hugging Face rounds a float64 model's norm to float32 too; here
    float64 stays float64, so gradients summed over micro-batches that split a group's rows stay exact."""
    if x.dtype == torch.float64:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm(x, weight, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb on flat tokens: x [T, heads, D], cos / sin [T, 1, D], in HF's op order, so the
    training forward's values track the model's own (StaticDecoder._rope fuses the last product and sum)."""
    return x * cos + rotate_half(x) * sin


def embed_for_training(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings of flat `ids`, as `decoder.embed`. With a tied head the embedding's gradient is
    its looked-up rows only: backward adds them by index into the tied weight's `.grad`, where the head's
    dense gradient already is (the loss runs first in backward), instead of autograd making a dense
    vocabulary x hidden gradient for the lookup and summing the two (a 545 MB buffer filled and added per
    micro-batch at Qwen2.5-0.5B's shape). The gradient is the same sum. Not for sharded (FSDP2) weights."""
    decoder = model.model
    table = decoder.embed_tokens
    weight, head = table.weight, model.get_output_embeddings()
    if not (torch.is_grad_enabled() and weight.requires_grad and head is not None and head.weight is weight
            and type(weight.data) is torch.Tensor):
        return embed(decoder, ids)
    rows = F.embedding(ids, weight.detach()).requires_grad_()
    keep = None if table.padding_idx is None else ids != table.padding_idx  # the padding row gets no gradient

    def add_rows(grad: torch.Tensor) -> None:
        if weight.grad is None:  # the head took no gradient in this backward
            weight.grad = torch.zeros_like(weight)
        index, values = (ids, grad) if keep is None else (ids[keep], grad[keep])
        weight.grad.index_add_(0, index, values.to(weight.grad.dtype))

    rows.register_hook(add_rows)
    return scale_embeddings(decoder, rows)


def shared_prompt_hidden(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]],
                         pad_id: int, checkpointing: bool = False,
                         proj: Projections = ACCUMULATING) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm hidden states that predict each completion token, flattened in row order to [N, H],
    and the tokens they predict [N]. Row r predicts completions[r] after prompts[r]. `checkpointing`:
    each decoder layer keeps only its input for backward and runs again there (torch's non-reentrant
    checkpoint: the same values and gradients, one layer's activations alive instead of all of them).
    `proj`: the layers' GEMMs (default: weight gradients added into .grad in place; decoder.PLAIN: autograd's)."""
    cfg, decoder = model.config, model.model
    device = decoder.embed_tokens.weight.device
    unique, group = unique_prompts(prompts)
    row_prompt = group.tolist()
    U, R = len(unique), len(completions)
    C = max(1, max(len(c) for c in completions) - 1)  # the last completion token predicts nothing

    ids_p, attn_p = pad_left(unique, pad_id)
    P, valid_p = ids_p.shape[1], attn_p.bool()
    ids_c = torch.full((R, C), pad_id, dtype=torch.long)
    for r, c in enumerate(completions):
        if len(c) > 1:
            ids_c[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
    prompt_len = valid_p.sum(-1)
    pos_p = (attn_p.cumsum(-1) - 1).clamp(min=0)
    pos_c = prompt_len[group][:, None] + torch.arange(C)[None, :]
    ids_p, ids_c, valid_p, group = ids_p.to(device), ids_c.to(device), valid_p.to(device), group.to(device)
    positions = torch.cat([pos_p.reshape(-1), pos_c.reshape(-1)]).to(device)

    # masks: prompts as in the engine's prefill; completions see their prompt's valid keys and, causally,
    # their own tokens
    mask_p = prompt_attention_mask(valid_p)
    causal_c = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    mask_c = torch.cat([valid_p[group][:, None, :].expand(R, C, P), causal_c.expand(R, C, C)], dim=-1)[:, None]

    fam, eps = family_of(model), cfg.rms_norm_eps
    x = embed_for_training(model, torch.cat([ids_p.reshape(-1), ids_c.reshape(-1)]))
    cos, sin = decoder.rotary_emb(x, positions[None])
    cos, sin = cos[0, :, None], sin[0, :, None]
    n_p = U * P

    def run_layer(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        attn = layer.self_attn
        D = attn.head_dim
        h = attention_input(x, layer, fam, _norm, eps)
        q, k, v = qkv_projections(attn, h, (h.shape[0],), _norm, eps, fam, proj)
        if getattr(attn, "use_rope", True):  # SmolLM3's NoPE layers skip it
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        q_p, k_p, v_p = (t[:n_p].view(U, P, -1, D).transpose(1, 2) for t in (q, k, v))
        q_c, k_c, v_c = (t[n_p:].view(R, C, -1, D).transpose(1, 2) for t in (q, k, v))
        o_p = grouped_sdpa(q_p, k_p, v_p, mask_p, attn.scaling)
        k_c = torch.cat([k_p.index_select(0, group), k_c], dim=2)  # [R, kv heads, P + C, D]
        v_c = torch.cat([v_p.index_select(0, group), v_c], dim=2)
        o_c = grouped_sdpa(q_c, k_c, v_c, mask_c, attn.scaling)
        o = torch.cat([o_p.transpose(1, 2).reshape(n_p, -1), o_c.transpose(1, 2).reshape(R * C, -1)])
        x = attention_residual(x, o, layer, fam, _norm, eps, proj)
        return mlp_block(x, layer, fam, _norm, eps, proj)

    checkpointing = checkpointing and torch.is_grad_enabled()
    for layer in decoder.layers[: cfg.num_hidden_layers]:
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(run_layer, x, layer, use_reentrant=False)
        else:
            x = run_layer(x, layer)

    # row r: the prompt's last position predicts token 0, completion position j predicts token j + 1
    index = []
    for r, (u, c) in enumerate(zip(row_prompt, completions)):
        if not c:  # an engine may return a row with no tokens: it predicts nothing
            continue
        index.append(u * P + P - 1)
        index.extend(range(n_p + r * C, n_p + r * C + len(c) - 1))
    index = torch.tensor(index, dtype=torch.long, device=device)
    hidden = _norm(x.index_select(0, index), fam.weight(decoder.norm), eps)
    targets = torch.tensor([t for c in completions for t in c], dtype=torch.long, device=device)
    return hidden, targets
