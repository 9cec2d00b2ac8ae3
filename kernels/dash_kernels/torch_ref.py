"""Naive references on materialised logits (tests, benchmarks) and the chunked torch path (CPU default).

The chunked path walks kept tokens in chunks of C rows, so peak extra memory is O(C x V). When the
caller needs gradients it computes them from the same logits chunk right away (the chunk holds full
vocab rows, so the log-sum-exp, and therefore g = dloss/dlogp, is known before the chunk is dropped):
3 matmuls per token instead of the 4 of forward + recompute-in-backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .utils import check_inputs, check_is_mode, compute_dtype, pg_token_loss, pg_token_terms, sampler_is_ratio

CHUNK_BYTES = 32 * 2**20  # logits chunk budget; 256 rows at V = 32k fp32 (tuned in bench/loss.py on 2 cores)
# The fewest rows a chunk takes whatever the vocabulary: the chunk's GEMMs have the rows as m (or k). At
# V = 151936 the byte budget alone gave 55 rows: a 256-token forward+backward at H 896 took 2.2 s there
# against 1.5 s at 256 rows or 512, 2 threads (`python bench/loss.py --quick --providers
# dash_torch:55,dash_torch,dash_torch:512 --hidden 896 --vocab 151936 --rows 1`; bench/results/e2e_qwen05b.md).
MIN_CHUNK_ROWS = 256


def chunk_rows(vocab: int, element_bytes: int) -> int:
    """Token rows per logits chunk of the torch path (the memory plan counts two such buffers)."""
    return max(MIN_CHUNK_ROWS, min(4096, CHUNK_BYTES // (vocab * element_bytes)))


def default_chunk_size(vocab: int, dtype: torch.dtype) -> int:
    return chunk_rows(vocab, torch.finfo(dtype).bits // 8)


def chunk_length(n: int, vocab: int, dtype: torch.dtype, chunk_size: int | None = None) -> int:
    """Tokens per logits chunk when `chunked_pg` runs over `n` tokens: `chunk_size`, else the default, at most n."""
    return min(n, chunk_size or default_chunk_size(vocab, dtype))


def row_chunks(row_ids: torch.Tensor, chunk: int) -> list[int] | None:
    """Chunk edges [0, ..., n] for `chunked_pg` that never cut a row: whole rows per chunk, at most `chunk`
    tokens each, so a per-row quantity (a sequence-level IS ratio) is complete inside its chunk. None when a
    row is longer than `chunk` or its tokens are not one run (`row_ids`: the row of each token, in order)."""
    n = row_ids.numel()
    ids = row_ids.cpu()
    starts = (torch.nonzero(ids[1:] != ids[:-1]).squeeze(1) + 1).tolist()
    if n == 0 or torch.unique(ids).numel() != len(starts) + 1:
        return None
    bounds = [0]
    for s, e in zip([0, *starts], [*starts, n]):
        if e - s > chunk:
            return None
        if e - bounds[-1] > chunk:
            bounds.append(s)
    return [*bounds, n]


def chunked_pg(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    g_fn: Callable[[int, int, torch.Tensor], torch.Tensor] | None,
    *,
    temperature: float = 1.0,
    need_grad_hidden: bool = False,
    need_grad_weight: bool = False,
    need_grad_bias: bool = False,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    grad_weight_into: torch.Tensor | None = None,
    bounds: list[int] | None = None,
) -> dict[str, torch.Tensor | None]:
    """Token log-probs of `hidden` rows (optionally entropy) and, when g_fn is given, the gradients
    of sum_t L_t where g_fn(start, end, logp_chunk) returns dL_t/dlogp_t for that chunk.

    `bounds`: the chunks' edges [0, ..., n] (`row_chunks` cuts them between rows); default every `chunk_size`
    (or `default_chunk_size`) tokens.

    Rows with g == 0 (clipped, beta = 0) are dropped from the gradient matmuls. `grad_weight_into` (a [V, H]
    tensor of the compute dtype): the weight's gradient is added into it instead of a new zeroed buffer, and
    "grad_weight" is that tensor.
    """
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    dev = hidden.device
    w = weight.to(cdt)
    wt = w.t()
    inv_t = 1.0 / temperature
    b = None if bias is None else bias.to(cdt) * inv_t
    grads = g_fn is not None and (need_grad_hidden or need_grad_weight or need_grad_bias)
    grad_weight = None
    if grads and need_grad_weight:
        grad_weight = grad_weight_into if grad_weight_into is not None else torch.zeros(vocab, hdim, dtype=cdt, device=dev)
    out: dict[str, torch.Tensor | None] = {
        "logp": torch.empty(n, dtype=cdt, device=dev),
        "entropy": torch.empty(n, dtype=cdt, device=dev) if return_entropy else None,
        "grad_hidden": torch.zeros(n, hdim, dtype=cdt, device=dev) if grads and need_grad_hidden else None,
        "grad_weight": grad_weight,
        "grad_bias": torch.zeros(vocab, dtype=cdt, device=dev) if grads and need_grad_bias else None,
    }
    if n == 0:
        return out
    gh, gw, gb = out["grad_hidden"], out["grad_weight"], out["grad_bias"]
    if bounds is None:
        chunk = chunk_length(n, vocab, cdt, chunk_size)
        bounds = [*range(0, n, chunk), n]
    edges = list(zip(bounds[:-1], bounds[1:]))
    buf = torch.empty(max(e - s for s, e in edges), vocab, dtype=cdt, device=dev)
    # Entropy needs z - m and exp(z - m) at once: exp goes to a second buffer and the two swap roles.
    buf2 = torch.empty_like(buf) if return_entropy else None
    for s, e in edges:
        hc = hidden[s:e].to(cdt)
        if inv_t != 1.0:  # z = (h W^T + b) / T  ==  (h / T) W^T + b / T: scale C x H, not C x V
            hc = hc * inv_t
        z = buf[: e - s]
        if b is None:
            torch.mm(hc, wt, out=z)
        else:
            torch.addmm(b, hc, wt, out=z)
        torch._log_softmax(z, 1, False, out=z)  # in place: row-local, one sweep through memory
        tgt = targets[s:e]
        out["logp"][s:e] = z.gather(1, tgt[:, None]).squeeze(1)
        if return_entropy:  # -sum p log p needs log p and p at once: p goes to the other buffer
            p = torch.exp(z, out=buf2[: e - s])
            out["entropy"][s:e] = -torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
            buf, buf2 = buf2, buf
        else:
            p = z.exp_()
        if not grads:
            continue
        # dL/dz = g * (onehot - p) (times 1/T). The C x V matrix is never scaled: g goes on the
        # C x H side (g * (W[y] - p @ W) and p^T (-g h) + onehot^T (g h)).
        g = g_fn(s, e, out["logp"][s:e]).to(cdt)
        nz = g != 0
        n_zero = int((~nz).sum())
        if n_zero == e - s:
            continue
        rows = None
        if n_zero * 8 >= e - s:  # enough clipped rows to be worth a gather
            rows = nz.nonzero().squeeze(1)
            p, hc, g, tgt = p.index_select(0, rows), hc.index_select(0, rows), g[rows], tgt[rows]
        if gh is not None:
            gh_c = torch.mm(p, w)
            torch.sub(w.index_select(0, tgt), gh_c, out=gh_c).mul_(g[:, None])
            if rows is None:
                gh[s:e] = gh_c
            else:
                gh[s:e].index_copy_(0, rows, gh_c)
        if gw is not None:
            hg = hc * g[:, None]  # hc already carries the 1/T
            gw.index_add_(0, tgt, hg)
            gw.addmm_(p.t(), hg, alpha=-1.0)
        if gb is not None:
            gb.index_add_(0, tgt, g)
            gb.addmv_(p.t(), g, alpha=-1.0)
    if inv_t != 1.0:
        for t in (gh, gb):
            if t is not None:
                t.mul_(inv_t)
    return out


# ----------------------------------------------------------------------------- naive references


def logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Token log-probs on materialised N x V logits (reference only)."""
    cdt = compute_dtype(hidden.dtype)
    z = hidden.to(cdt) @ weight.to(cdt).t()
    if bias is not None:
        z = z + bias.to(cdt)
    logsm = torch.log_softmax(z / temperature, dim=-1)
    logp = logsm.gather(1, targets[:, None]).squeeze(1)
    if return_entropy:
        return logp, -(logsm.exp() * logsm).sum(-1)
    return logp


def pg_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    sampler_logp: torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    tau: float | None = None,
    return_entropy: bool = False,
    is_mode: str = "token_truncate",
    is_clip_min: float | None = None,
    is_clip_max: float | None = 3.0,
    kl_correction: bool = False,
) -> tuple[torch.Tensor, dict]:
    """docs/design.md section 3 written the obvious way, with autograd on materialised logits. Also the
    trainer's `loss_impl=naive` (the one naive loss). Arguments and result as `fused_linear_pg_loss`."""
    check_inputs("pg_loss_ref", hidden, weight, beta, targets=targets, advantages=advantages,
                 token_weights=token_weights, old_logp=old_logp, ref_logp=ref_logp, sampler_logp=sampler_logp,
                 row_ids=row_ids)
    check_is_mode(is_mode, sampler_logp, row_ids)
    out = logprobs_ref(hidden, weight, bias, targets, temperature=temperature, return_entropy=return_entropy)
    logp, ent = out if return_entropy else (out, None)
    cdt = logp.dtype
    keep = token_weights != 0
    if tau is not None:
        keep = keep & (advantages.abs() > torch.tensor(tau, dtype=advantages.dtype))
    lp0 = logp.detach()
    adv = torch.where(keep, advantages.to(cdt), 0)
    w = torch.where(keep, token_weights.to(cdt), 0)
    # Dropped tokens get harmless stand-ins so a NaN there can never reach the loss or a gradient.
    old = lp0 if old_logp is None else torch.where(keep, old_logp.to(cdt), lp0)
    ref = torch.where(keep, ref_logp.to(cdt), lp0) if beta != 0.0 else None
    ratio = None
    if sampler_logp is not None:  # over kept tokens only (a sequence sum skips dropped ones, as the fused op)
        samp = torch.where(keep, sampler_logp.to(cdt), old)
        ratio = torch.where(keep, sampler_is_ratio(old, samp, is_mode, is_clip_min, is_clip_max, row_ids), 0)
    per_tok, clipped, kl = pg_token_loss(logp, adv, None if old_logp is None else old, ref, eps_low, eps_high,
                                         beta, ratio, kl_correction)
    loss = torch.where(keep, w * per_tok, 0).sum()
    n_keep = keep.sum().clamp(min=1)
    stats = {
        "logp": lp0,
        "clip_fraction": (clipped & keep).sum().to(cdt) / n_keep,
        "kl_mean": None if kl is None else torch.where(keep, kl.detach(), 0).sum() / n_keep,
        "entropy": None if ent is None else ent.detach(),
        "is_ratio": ratio,
        "kept_tokens": int(keep.sum()),
    }
    return loss, stats


__all__ = ["chunk_rows", "chunked_pg", "default_chunk_size", "logprobs_ref", "pg_loss_ref", "pg_token_terms", "sampler_is_ratio"]
