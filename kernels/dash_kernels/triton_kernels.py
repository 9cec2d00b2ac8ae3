"""Triton kernels: lm_head projection fused with log-softmax (forward) and its gradient (backward).

Both kernels read token rows through an index list, so filtered tokens (forward: weight 0 or
|A| <= tau; backward: also g == 0, i.e. clip active with beta = 0) cost nothing. Logits live only
as BLOCK_N x BLOCK_V register tiles.

- `_dash_pg_fwd_kernel`: grid (token blocks, vocab splits). Each program runs an online
  log-sum-exp over its vocab range and writes partial (max, sum, sum p*z, target logit); the tiny
  [splits, n] combine is done by the launcher. Splitting the vocab keeps the GPU busy when few
  tokens survive the filter.
- backward, two ways (`triton_pg_backward(bwd=...)`):
  - "dense" (default), `_dash_pg_dz_kernel`: per chunk of kept tokens, grid (token blocks x vocab
    blocks) recomputes the logits tile and stores dZ = g * (onehot - softmax) / T in the input dtype;
    grad_hidden = dZ @ W and grad_W += dZ^T @ H are dense GEMMs (cuBLAS on GPU). No atomics:
    deterministic, and the cost is that of three GEMMs plus one write and two reads of the dZ chunk.
  - "atomic", `_dash_pg_bwd_kernel`: the same tile, then grad_hidden += dZ @ W and grad_W += dZ^T @ h
    with fp32 `sem="relaxed"` atomics (the tile never leaves the SM; sums depend on program order).

All pointer offsets are int64 (V x H passes 2^31 at V 262144, H 8192). Masked lanes (tokens past the
end of a block, vocab past V) have p = 0 by construction, so a huge bias cannot produce inf * 0 there.
Dots: fp32 inputs use input_precision="ieee" (the reference precision); bf16 / fp16 use tensor cores.

Block sizes are fixed per dtype (no autotune: the interpreter runs a single config anyway); see GPU_BLOCKS.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_tile(H, W, rows, mask_n, offs_v, mask_v, K, stride_hn, stride_hk, stride_wv, stride_wk,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """z = H[rows] @ W[offs_v]^T for one BLOCK_N x BLOCK_V tile. Every offset is int64: offs_v * stride_wv
    passes 2^31 at V 262144 x H 8192, and a transposed operand puts the large stride on offs_k."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = rows[:, None] * stride_hn  # rows are int64
    w_rows = offs_v.to(tl.int64)[:, None] * stride_wv
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        k64 = offs_k.to(tl.int64)[None, :]
        h = tl.load(H + h_rows + k64 * stride_hk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + w_rows + k64 * stride_wk, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _dz_tile(H, W, B, rows, tgt, g, lse, mask_n, offs_v, mask_v, K, inv_t,
             stride_hn, stride_hk, stride_wv, stride_wk,
             HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dz (through 1/T) of one tile: g * (onehot - softmax). p is masked on both axes: a masked token
    loads lse = 0 and h = 0, so exp(bias / T) could overflow there, and inf * (g = 0) would be NaN."""
    z = _logits_tile(H, W, rows, mask_n, offs_v, mask_v, K, stride_hn, stride_hk, stride_wv, stride_wk,
                     BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC)
    if HAS_BIAS:
        z += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    valid = mask_n[:, None] & mask_v[None, :]
    p = tl.where(valid, tl.exp(tl.where(valid, z * inv_t - lse[:, None], 0.0)), 0.0)
    onehot = tl.where(valid & (offs_v[None, :] == tgt[:, None]), 1.0, 0.0)
    return (onehot - p) * g[:, None]


@triton.jit
def _dash_pg_fwd_kernel(
    H, W, B, IDX, TGT, M_OUT, S_OUT, S1_OUT, ZT_OUT,
    n_rows, V, K, inv_t, tiles_per_split,
    stride_hn, stride_hk, stride_wv, stride_wk,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    rows = tl.load(IDX + offs_n, mask=mask_n, other=0).to(tl.int64)
    tgt = tl.load(TGT + rows, mask=mask_n, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t0, t1):
        offs_v = t * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(H, W, rows, mask_n, offs_v, mask_v, K, stride_hn, stride_hk, stride_wv, stride_wk,
                         BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC)
        if HAS_BIAS:
            z += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        z = tl.where(mask_v[None, :], z * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        if ENTROPY:
            s1 = s1 * alpha + tl.sum(p * tl.where(mask_v[None, :], z, 0.0), axis=1)
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * n_rows + offs_n
    tl.store(M_OUT + out, m, mask=mask_n)
    tl.store(S_OUT + out, s, mask=mask_n)
    tl.store(ZT_OUT + out, zt, mask=mask_n)
    if ENTROPY:
        tl.store(S1_OUT + out, s1, mask=mask_n)


@triton.jit
def _dash_pg_bwd_kernel(
    H, W, B, IDX, TGT, G, LSE, GH, GW, GB,
    n_rows, V, K, inv_t,
    stride_hn, stride_hk, stride_wv, stride_wk,
    HAS_BIAS: tl.constexpr, NEED_GH: tl.constexpr, NEED_GW: tl.constexpr, NEED_GB: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """bwd="atomic": one program per (token block, vocab block), grads accumulated with fp32 atomics.
    GH is [n_hidden, K] and GW [V, K], both contiguous fp32."""
    pid = tl.program_id(0)
    n_vblocks = tl.cdiv(V, BLOCK_V)
    pid_n = pid // n_vblocks
    pid_v = pid % n_vblocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    rows = tl.load(IDX + offs_n, mask=mask_n, other=0).to(tl.int64)
    tgt = tl.load(TGT + rows, mask=mask_n, other=0)
    g = tl.load(G + offs_n, mask=mask_n, other=0.0)  # w * dL/dlogp * grad_output / T, compacted
    lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    dz = _dz_tile(H, W, B, rows, tgt, g, lse, mask_n, offs_v, mask_v, K, inv_t,
                  stride_hn, stride_hk, stride_wv, stride_wk, HAS_BIAS, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_K)
    if NEED_GB:
        tl.atomic_add(GB + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
    dz_in = dz.to(H.dtype.element_ty)
    v64 = offs_v.to(tl.int64)[:, None]
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        k64 = offs_k.to(tl.int64)[None, :]
        if NEED_GH:
            w = tl.load(W + v64 * stride_wv + k64 * stride_wk, mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            gh = tl.dot(dz_in, w, input_precision=DOT_PREC)
            tl.atomic_add(GH + rows[:, None] * K + k64, gh, mask=mask_n[:, None] & mask_k[None, :], sem="relaxed")
        if NEED_GW:
            h = tl.load(H + rows[:, None] * stride_hn + k64 * stride_hk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            gw = tl.dot(tl.trans(dz_in), h, input_precision=DOT_PREC)
            tl.atomic_add(GW + v64 * K + k64, gw, mask=mask_v[:, None] & mask_k[None, :], sem="relaxed")


@triton.jit
def _dash_pg_dz_kernel(
    H, W, B, IDX, TGT, G, LSE, DZ,
    n_rows, V, K, inv_t, stride_dz,
    stride_hn, stride_hk, stride_wv, stride_wk,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """bwd="dense": dL/dz of one (token block, vocab block) tile of a token chunk, stored to DZ [n_rows, V]
    (bf16 / fp32, the input dtype). Each element is written by exactly one program: no atomics. Token
    blocks vary fastest, so the programs running together share one W tile through L2."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    rows = tl.load(IDX + offs_n, mask=mask_n, other=0).to(tl.int64)
    tgt = tl.load(TGT + rows, mask=mask_n, other=0)
    g = tl.load(G + offs_n, mask=mask_n, other=0.0)
    lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    dz = _dz_tile(H, W, B, rows, tgt, g, lse, mask_n, offs_v, mask_v, K, inv_t,
                  stride_hn, stride_hk, stride_wv, stride_wk, HAS_BIAS, DOT_PREC, BLOCK_N, BLOCK_V, BLOCK_K)
    ptr = DZ + offs_n.to(tl.int64)[:, None] * stride_dz + offs_v.to(tl.int64)[None, :]
    tl.store(ptr, dz.to(DZ.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps). GPU blocks are picked so that ptxas reports no register
# spills on sm_90 (tests/test_kernels_triton.py compiles both kernels ahead of time, no GPU needed);
# they are not tuned on a GPU. Interpreter blocks are large: its cost grows with the number of programs.
GPU_BLOCKS = {torch.float32: (64, 64, 32, 8), torch.bfloat16: (64, 128, 32, 8), torch.float16: (64, 128, 32, 8)}
INTERPRET_BLOCKS = (32, 128, 64, 4)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products (the reference precision); bf16/fp16: tensor cores (ignored)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(dtype: torch.dtype) -> tuple[int, int, int, int]:
    return INTERPRET_BLOCKS if _interpret() else GPU_BLOCKS[dtype]


def _check(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton backend supports fp32/bf16/fp16, got {hidden.dtype}; use backend='torch'")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight dtypes differ ({hidden.dtype} vs {weight.dtype})")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def triton_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    idx: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp, lse, entropy) in fp32 for the rows hidden[idx] (compacted order)."""
    _check(hidden, weight)
    targets, idx = targets.contiguous(), idx.contiguous()  # hidden / weight strides are kernel arguments
    bias = None if bias is None else bias.contiguous()
    n = idx.numel()
    dev = hidden.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return lse, lse.clone(), (lse.clone() if return_entropy else None)
    vocab, hdim = weight.shape
    bn, bv, bk, warps = _blocks(hidden.dtype)
    grid_n = triton.cdiv(n, bn)
    n_tiles = triton.cdiv(vocab, bv)
    splits = min(n_tiles, max(1, triton.cdiv(4 * _num_sms(dev), grid_n)))
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=dev)
    _dash_pg_fwd_kernel[(grid_n, splits)](
        hidden, weight, bias if bias is not None else hidden, idx, targets, part[0], part[1], part[2], part[3],
        n, vocab, hdim, 1.0 / temperature, per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, ENTROPY=return_entropy,
        DOT_PREC=dot_precision(hidden.dtype),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps,
    )
    m_part, s_part, s1_part, zt_part = part
    m = m_part.amax(0)
    scale = torch.exp(m_part - m)
    s = (s_part * scale).sum(0)
    torch.add(m, s.log(), out=lse)
    logp = zt_part.sum(0) - lse
    ent = None
    if return_entropy:
        ent = lse - (s1_part * scale).sum(0) / s
    return logp, lse, ent


BACKWARDS = ("dense", "atomic")
DENSE_BWD_BYTES = 512 * 2**20  # bwd="dense": budget of the dZ chunk buffer (1728 rows at V 151936 in bf16)


def dense_chunk_rows(n: int, vocab: int, dtype: torch.dtype) -> int:
    """Token rows per dZ chunk: the buffer fits DENSE_BWD_BYTES, in whole token blocks."""
    bn = _blocks(dtype)[0]
    rows = max(bn, DENSE_BWD_BYTES // (vocab * (torch.finfo(dtype).bits // 8)) // bn * bn)
    return min(rows, triton.cdiv(n, bn) * bn)


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (accumulated into fp32 `out` when given) with fp32 accumulation and an fp32 result, so
    bf16 chunks are not rounded to bf16 before they are summed."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if out is None else out.addmm_(a, b)
    try:  # cuBLAS bf16 / fp16 GEMM with an fp32 output (aten::mm.dtype; CUDA only)
        r = torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else None
    except (TypeError, RuntimeError):  # an older torch: no out_dtype
        r = None
    if r is None:  # each chunk rounded to the input dtype once, then summed in fp32
        r = torch.mm(a, b).float()
    return r if out is None else out.add_(r)


def triton_pg_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    idx: torch.Tensor,
    g: torch.Tensor,
    lse: torch.Tensor,
    *,
    temperature: float,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    bwd: str = "dense",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fp32 grads of sum_t L_t with g_t = dL_t/dlogp_t (already scaled by grad_output) at rows idx.

    bwd="dense" (default): per chunk of tokens a Triton kernel recomputes the logit tiles and writes
    dZ (input dtype); grad_hidden = dZ @ W and grad_W += dZ^T @ H are then two dense GEMMs (cuBLAS on
    GPU). No atomics: the result does not depend on scheduling order (deterministic), and the cost is
    2NHV (recompute) + 4NHV (GEMMs) plus writing and reading dZ once. bwd="atomic": one kernel over
    (token block x vocab block) accumulating both grads with fp32 atomics; order-dependent sums.
    """
    if bwd not in BACKWARDS:
        raise ValueError(f"bwd must be one of {BACKWARDS}, got {bwd!r}")
    vocab, hdim = weight.shape
    dev = hidden.device
    targets, idx = targets.contiguous(), idx.contiguous()
    bias = None if bias is None else bias.contiguous()
    gh = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_grad_hidden else None
    gw = torch.zeros(vocab, hdim, dtype=torch.float32, device=dev) if need_grad_weight else None
    gb = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_grad_bias and bias is not None else None
    n = idx.numel()
    if n == 0 or (gh is None and gw is None and gb is None):
        return gh, gw, gb
    bn, bv, bk, warps = _blocks(hidden.dtype)
    g = (g / temperature).float().contiguous()
    lse = lse.float().contiguous()
    common = dict(HAS_BIAS=bias is not None, DOT_PREC=dot_precision(hidden.dtype),
                  BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps)
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    b_arg = bias if bias is not None else hidden
    if bwd == "atomic":
        dummy = lse
        _dash_pg_bwd_kernel[(triton.cdiv(n, bn) * triton.cdiv(vocab, bv),)](
            hidden, weight, b_arg, idx, targets, g, lse,
            gh if gh is not None else dummy, gw if gw is not None else dummy, gb if gb is not None else dummy,
            n, vocab, hdim, 1.0 / temperature, *strides,
            NEED_GH=gh is not None, NEED_GW=gw is not None, NEED_GB=gb is not None, **common,
        )
        return gh, gw, gb
    chunk = dense_chunk_rows(n, vocab, hidden.dtype)
    buf = torch.empty(chunk, vocab, dtype=hidden.dtype, device=dev)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        rows = idx[s:e]
        dz = buf[: e - s]
        _dash_pg_dz_kernel[(triton.cdiv(e - s, bn), triton.cdiv(vocab, bv))](
            hidden, weight, b_arg, rows, targets, g[s:e], lse[s:e], dz,
            e - s, vocab, hdim, 1.0 / temperature, dz.stride(0), *strides, **common,
        )
        if gh is not None:  # kept rows are distinct (a nonzero() index): a copy, not an accumulation
            gh.index_copy_(0, rows, _mm_f32(dz, weight))
        if gw is not None:
            _mm_f32(dz.t(), hidden.index_select(0, rows), out=gw)
        if gb is not None:
            gb += dz.sum(0, dtype=torch.float32)
    return gh, gw, gb
