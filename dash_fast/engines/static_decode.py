"""The static decoder: a hand-rolled Llama-family forward over a pre-allocated KV cache (gpt-fast style).

It reads the module's parameter tensors directly (zero-copy: the optimizer's in-place updates are seen at
the next call), skips Hugging Face's per-call mask and cache machinery, compacts finished rows out of the
cache in batches, and on CUDA replays its decode step from one CUDA graph per batch-size bucket. On CPU in
fp32 its projections can run on oneDNN-packed weights (packed_gemm.py). TorchEngine drives it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dash_fast.engines.packed_gemm import (
    GEMM_PATHS,
    ConcatBuffer,
    PackedLayer,
    PackedLinear,
    packed_gemm_unavailable,
)
from dash_fast.models.decoder import (
    Family,
    attention_input,
    attention_residual,
    embed,
    family_of,
    grouped_sdpa,
    logit_multiplier,
    mlp_block,
    prompt_attention_mask,
    qkv_projections,
    rms_norm,
    rotate_half,
)

DROP_FRACTION = 0.25  # eager decode compacts the cache once this fraction of its rows has finished
# gemm="auto" uses oneDNN from this hidden size on. Measured (CPU, 2 threads, batch 16-64): at hidden 896 (the
# Qwen2.5-0.5B shape) oneDNN over the parameters decodes 1.5x faster than MKL's F.linear; at the embedded
# tiny model's 128 F.linear is 1.2-1.3x faster (per-call overhead on small GEMMs). Widths in between: unmeasured.
ONEDNN_MIN_HIDDEN = 512
# gemm="auto" decodes on a packed copy of the weights (reordered at the start of each generate, freed at its end)
# from this many new tokens on. Measured at the Qwen2.5-0.5B shape (CPU, 2 threads, 16 rows): a decode step
# takes ~140 ms on the packed copy against ~185 ms over the parameters, and the reorder 0.7-0.8 s standalone
# (up to ~1.8 s inside the trainer, where the copy's memory is newly mapped): it pays back after ~20-40 steps.
PACKED_MIN_NEW_TOKENS = 64
# The packed path's MLP runs on at most this many tokens at a time (the prefill's): measured at the 0.5B shape
# (2 threads), gate|up + silu x up over 1024 tokens at once took 105 ms, in chunks of 256 90 ms (128: 95 ms),
# the [tokens, 2 x intermediate] intermediate then staying in cache. The weights are reordered for inputs of at
# least this many rows: at 16 rows the 0.5B shape's decode step measured ~1% faster than on the 16-row layout
# (five same-process A/Bs, 0.7-2.4% each; GEMM alone at m = 16: 156-162 vs 129-153 GFLOP/s), at 64-1024 rows alike.
MLP_ROWS = 256


class StaticDecoder:
    """A Llama-family forward over a pre-allocated KV cache, reading the module's own tensors.

    Cache layout: per layer k, v of [B_max, n_kv_heads, S_max, head_dim]. Prompts are left-padded to
    a common length P, so at decode step t every row writes slot P + t (one slice, no scatter);
    `key_valid[b, s]` masks the padding slots. Running rows are compacted to the front once enough rows
    have finished (`drop_finished_now`).
    """

    def __init__(self, model: torch.nn.Module, gemm: str = "auto") -> None:
        self.model = model
        cfg = model.config
        self.decoder = model.model
        self.layers = list(self.decoder.layers[: cfg.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.eps = cfg.rms_norm_eps
        self.family = family_of(model)
        self.logit_multiplier = logit_multiplier(model)  # Granite's 1 / logits_scaling, as the learner applies it
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.key_valid = torch.empty(0)
        self.rope = torch.empty(0)
        self.graphs: dict[int, tuple] = {}  # bucket size -> (replay, static inputs, static logits)
        self._param_ptrs: tuple = ()
        # capture(step) -> (replay, outputs): CUDA graphs by default; tests inject a CPU stand-in
        self.capture: Callable[[Callable[[], torch.Tensor]], tuple] | None = None
        self._pool = None  # one CUDA graph memory pool shared by every bucket
        self.capture_log: list[tuple[int, str]] = []  # (bucket, thread name) of each capture
        self.graph_misses = 0  # decode steps run eagerly because their bucket had no graph (worker thread)
        self.workers = 0  # generate() calls running outside the main thread right now
        self.gemm, self.gemm_reason = pick_gemm(model, self.family, gemm)  # fixed when the decoder is built
        self.pack_long = gemm == "auto" and self.gemm == "onednn"  # long generates on a packed copy (packs)
        self.packed: list[PackedLayer] = []  # oneDNN-packed projections, live during one generate (pack / unpack)
        self.packed_head: PackedLinear | None = None

    def packs(self, new_tokens: int) -> bool:
        """Whether a generate of `new_tokens` tokens decodes on a packed copy: gemm="packed", or "auto" on oneDNN
        from PACKED_MIN_NEW_TOKENS on (where the copy's reorder pays back)."""
        return self.gemm == "packed" or (self.pack_long and auto_packs(self.gemm, new_tokens))

    @torch.no_grad()
    def pack(self, rows: int, new_tokens: int) -> None:
        """The oneDNN linears for `rows`-row decode steps of a generate of `new_tokens` tokens: reordered from
        the live parameters when `packs` says so (one more copy of every projection and the lm_head until
        `unpack`), else over the parameters as they are; a no-op on the plain path."""
        if self.gemm == "plain":
            return
        reorder = self.packs(new_tokens)
        rows = max(rows, MLP_ROWS)  # the layout oneDNN picks for MLP_ROWS-row inputs: at least as fast at 16 rows
        concat = ConcatBuffer()  # one buffer for every layer's fused weights, freed with this call
        self.packed = [PackedLayer.of(layer, rows, concat, reorder) for layer in self.layers]
        head = self.model.get_output_embeddings()
        self.packed_head = PackedLinear([head.weight], [getattr(head, "bias", None)], rows, reorder=reorder)

    def unpack(self) -> None:
        """Free the packed copy (its weights go stale at the next optimizer step)."""
        self.packed, self.packed_head = [], None

    @property
    def capacity(self) -> int:
        """Rows the reserved cache holds (0 before the first reserve)."""
        return self.k[0].shape[0] if self.k else 0

    def release(self) -> None:
        """Free the cache, the RoPE tables and every graph (and so their pool); `reserve` rebuilds them.
        What stays: the parameters (the trainer's own) and blocks the CUDA caching allocator keeps for
        reuse (the backward reuses them; `torch.cuda.empty_cache()` would hand them to the driver)."""
        self.k, self.v = [], []
        self.key_valid = self.rope = torch.empty(0)
        self.graphs.clear()
        self._pool = None

    # ---------------------------------------------------------------- buffers
    def reserve(self, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        """(Re)allocate the cache when it is too small or on another device/dtype; reused across calls."""
        have = self.k[0].shape if self.k else None
        if (have is not None and have[0] >= batch and have[2] >= length and self.k[0].device == device
                and self.k[0].dtype == dtype):
            return
        if device.type == "cuda":
            length = -(-length // 64) * 64  # round up: one cache (and one set of graphs) fits many calls
        shape = (batch, self.n_kv, length, self.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.key_valid = torch.zeros((batch, length), device=device, dtype=torch.bool)
        cos, sin = self.decoder.rotary_emb(self.k[0], torch.arange(length, device=device)[None])
        self.rope = torch.stack([cos[0], sin[0]], dim=1)  # the model's own RoPE as a table: [S, 2, D]
        self.graphs.clear()

    def compact(self, keep: torch.Tensor, used: int) -> None:
        """Gather cache rows `keep` to the front, copying only the `used` slots written so far; the rows
        after them keep stale but finite data. `keep` is ascending when finished rows are dropped, and
        repeats rows when one prefilled prompt feeds the G rows sampled from it."""
        n = keep.numel()
        for buf in (*self.k, *self.v):
            buf[:n, :, :used] = buf[:, :, :used].index_select(0, keep)
        self.key_valid[:n] = self.key_valid.index_select(0, keep)

    # ---------------------------------------------------------------- the forward
    @staticmethod
    def _rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin for x [b, T, heads, D], with table = [b, T, 1, 2, D] (cos, sin) gathered
        by position from the per-cache table (shared_prompt's `_rope` keeps Hugging Face's op order instead, so
        the training forward's values track the model's own). The packed path rotates q and k as one tensor:
        the softmax scale is applied in the attention, so both take the same table."""
        cos, sin = table[..., 0, :], table[..., 1, :]
        return torch.addcmul(x * cos, rotate_half(x), sin)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [b, T, H, D], cache views k, v [b, H_kv, S, D] -> [b * T, H * D]: softmax(q k^T * scaling) v.

        SDPA with a boolean mask (`grouped_sdpa`), except for one-token decode on CPU: there `mask` is an
        additive float bias [b * H_kv, g, S] and two batched GEMMs beat PyTorch's CPU flash kernel ~2x. Either
        way query heads are grouped onto their KV head (GQA without repeating K/V)."""
        b, T, _, D = q.shape
        if mask.dtype == torch.bool:
            return grouped_sdpa(q.transpose(1, 2), k, v, mask, self.scaling).transpose(1, 2).reshape(b * T, -1)
        S = k.shape[2]
        g = self.n_heads // self.n_kv
        scores = torch.baddbmm(mask, q.reshape(b * self.n_kv, g, D), k.reshape(b * self.n_kv, S, D).transpose(1, 2),
                               alpha=self.scaling)
        return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * self.n_kv, S, D)).view(b, -1)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, start: int | torch.Tensor, kv_len: int,
                mask: torch.Tensor) -> torch.Tensor:
        """Logits of the last position for `ids` [b, T] at RoPE positions `pos` [b, T], whose K/V go to
        cache slots start .. start+T-1; attention reads slots [0, kv_len) under `mask` (see _attention).
        `start` is a device tensor in CUDA-graph mode (so one captured graph serves every step)."""
        b, T = ids.shape
        D = self.head_dim
        fam, eps = self.family, self.eps
        x = embed(self.decoder, ids.reshape(-1))  # [b * T, hidden]
        flat = pos.reshape(-1)  # index_select: several times faster than advanced indexing on CPU
        rope = self.rope.index_select(0, flat).view(b, T, 1, 2, D)
        for i, layer in enumerate(self.layers):
            if self.packed:
                x = self._packed_layer(x, i, layer, rope, start, kv_len, mask)
                continue
            attn = layer.self_attn
            h = attention_input(x, layer, fam, rms_norm, eps)
            q, k, v = qkv_projections(attn, h, (b, T), rms_norm, eps, fam)
            if getattr(attn, "use_rope", True):  # SmolLM3's NoPE layers: no rotation
                q, k = self._rope(q, rope), self._rope(k, rope)
            o = self._attend(i, q, k, v, start, kv_len, mask)
            x = attention_residual(x, o, layer, fam, rms_norm, eps)
            x = mlp_block(x, layer, fam, rms_norm, eps)
        h = rms_norm(x.view(b, T, -1)[:, -1], fam.weight(self.decoder.norm), eps)
        if self.logit_multiplier != 1.0:
            h = h * self.logit_multiplier
        if self.packed_head is not None:
            return self.packed_head(h)
        head = self.model.get_output_embeddings()
        return F.linear(h, head.weight, getattr(head, "bias", None))

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor,
                kv_len: int, mask: torch.Tensor) -> torch.Tensor:
        """Layer i's attention from its rotated q, k and its v [b, T, heads, D]: the new K/V into the cache at
        `start`, attention over slots [0, kv_len) (see `forward`); returns [b * T, H * D]."""
        T = q.shape[1]
        k = k.transpose(1, 2)
        kc, vc = self.k[i][: q.shape[0]], self.v[i][: q.shape[0]]
        if isinstance(start, torch.Tensor):
            kc.index_copy_(2, start, k)
            vc.index_copy_(2, start, v.transpose(1, 2))
        else:
            kc[:, :, start : start + T] = k
            vc[:, :, start : start + T] = v.transpose(1, 2)
        return self._attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], mask)

    def _packed_layer(self, x: torch.Tensor, i: int, layer: torch.nn.Module, rope: torch.Tensor,
                      start: int | torch.Tensor, kv_len: int, mask: torch.Tensor) -> torch.Tensor:
        """Layer i on the packed GEMMs (q|k|v in one; PackedLayer has the MLP's): the same math as the plain
        path's attention_input / qkv_projections / attention_residual / mlp_block for the pre-norm families,
        with q and k rotated as one tensor."""
        p, fam, eps, attn = self.packed[i], self.family, self.eps, layer.self_attn
        b, T = rope.shape[:2]
        D, H = self.head_dim, self.n_heads
        h = rms_norm(x, fam.weight(layer.input_layernorm), eps)
        qk, v = p.qkv(h).split([(H + self.n_kv) * D, self.n_kv * D], dim=-1)
        qk, v = qk.reshape(b, T, -1, D), v.reshape(b, T, -1, D)
        if hasattr(attn, "q_norm"):  # Qwen3: per head, each with its own weight
            q, k = qk.split([H, self.n_kv], dim=2)
            qk = torch.cat([rms_norm(q, fam.weight(attn.q_norm), eps), rms_norm(k, fam.weight(attn.k_norm), eps)], 2)
        if getattr(attn, "use_rope", True):
            qk = self._rope(qk, rope)
        q, k = qk.split([H, self.n_kv], dim=2)
        o = self._attend(i, q, k, v, start, kv_len, mask)
        x = p.o.add(x, o, fam.residual_scale)
        norm = fam.weight(layer.post_attention_layernorm)  # tokens are independent here: MLP_ROWS at a time
        out = [p.mlp_residual(c, rms_norm(c, norm, eps), fam.residual_scale) for c in x.split(MLP_ROWS)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def prefill(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """All prompts at once: left-padded `ids` [B, P] with `attn` [B, P]; returns next-token logits."""
        B, P = ids.shape
        self.key_valid[:B] = False
        self.key_valid[:B, :P] = attn.bool()
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        return self.forward(ids, pos, 0, P, prompt_attention_mask(self.key_valid[:B, :P]))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, slot: int, full_length: bool) -> torch.Tensor:
        """One token per row at cache `slot`. `full_length` attends over the whole cache (static shapes,
        what a CUDA graph captures); otherwise over slots [0, slot] only (less work, eager)."""
        b = tokens.shape[0]
        self.key_valid[:b, slot] = True
        kv_len = self.key_valid.shape[1] if full_length else slot + 1
        mask = self._decode_mask(b, kv_len)
        start = torch.tensor([slot], device=tokens.device) if full_length else slot
        return self.forward(tokens[:, None], pos[:, None], start, kv_len, mask)

    def _decode_mask(self, b: int, kv_len: int) -> torch.Tensor:
        valid = self.key_valid[:b, None, None, :kv_len]
        if valid.device.type != "cpu":
            return valid
        g = self.n_heads // self.n_kv  # the CPU GEMM path's additive bias, built once per step
        bias = torch.zeros((b, self.n_kv, g, kv_len), dtype=self.k[0].dtype)
        return bias.masked_fill_(~valid, float("-inf")).view(b * self.n_kv, g, kv_len)

    # ---------------------------------------------------------------- CUDA graphs (GPU only)
    def drop_stale_graphs(self) -> None:
        """Graphs read parameters by address: in-place optimizer updates are picked up, but a new storage
        (model.to(), load_state_dict with assign=True) invalidates them."""
        ptrs = tuple(p.data_ptr() for p in self.model.parameters())
        if ptrs != self._param_ptrs:
            self.graphs.clear()
            self._param_ptrs = ptrs

    def may_capture(self) -> bool:
        """Capture only on the main thread and while no sampler runs in a worker: a capture beside another
        thread's allocations or syncs fails ("operation not permitted when stream is capturing")."""
        return threading.current_thread() is threading.main_thread() and self.workers == 0

    def capture_bucket(self, b: int, tokens: torch.Tensor, pos: torch.Tensor, slot: int) -> None:
        """Capture the full-length decode step for `b` rows, with these inputs (their cache and mask
        writes are the ones a replay with them repeats)."""
        static = {"tokens": tokens.clone(), "pos": pos.clone(),
                  "slot": torch.full((1,), slot, dtype=torch.long, device=tokens.device)}

        def step() -> torch.Tensor:
            self.key_valid[:b].index_fill_(1, static["slot"], True)
            mask = self._decode_mask(b, self.key_valid.shape[1])
            return self.forward(static["tokens"][:, None], static["pos"][:, None], static["slot"],
                                self.key_valid.shape[1], mask)

        replay, logits = (self.capture or self._cuda_capture)(step)
        self.graphs[b] = (replay, static, logits)
        self.capture_log.append((b, threading.current_thread().name))

    def _cuda_capture(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        # Warm-up on a side stream (cuBLAS workspaces, allocator), then capture into the shared pool.
        # thread_local: another thread's CUDA calls during the capture do not invalidate it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = step()
        return graph.replay, logits

    def decode_graph(self, tokens: torch.Tensor, pos: torch.Tensor, slot: int) -> torch.Tensor:
        """`decode(..., full_length=True)` replayed from the graph of this batch size, captured here when
        missing and allowed (`may_capture`), else run eagerly (same result, `graph_misses` + 1)."""
        b = tokens.shape[0]
        if b not in self.graphs:
            if not self.may_capture():
                self.graph_misses += 1
                return self.decode(tokens, pos, slot, full_length=True)
            self.capture_bucket(b, tokens, pos, slot)
        replay, static, logits = self.graphs[b]
        static["tokens"].copy_(tokens)
        static["pos"].copy_(pos)
        static["slot"].fill_(slot)
        replay()
        return logits


def pick_gemm(model: torch.nn.Module, family: Family, gemm: str) -> tuple[str, str | None]:
    """The static decoder's GEMM path for `model`: ("onednn", "packed" or "plain", why plain when "auto" did not
    pick oneDNN). "auto" is "onednn" from ONEDNN_MIN_HIDDEN on (with the packed copy for long generates:
    StaticDecoder.packs), "plain" below it; an explicit path the model cannot run is refused."""
    if gemm not in GEMM_PATHS:
        raise ValueError(f"gemm={gemm!r}: must be one of {GEMM_PATHS}")
    if gemm == "plain":
        return "plain", "gemm='plain'"
    head = model.get_output_embeddings().weight
    if gemm == "auto":
        return auto_gemm(head.device, head.dtype, model.config.hidden_size, family.post_norm)
    reason = onednn_unavailable(head.device, head.dtype, family.post_norm)
    if reason is not None:
        raise ValueError(f"gemm={gemm!r} cannot run this model: {reason}")
    return gemm, None


def onednn_unavailable(device: torch.device, dtype: torch.dtype, post_norm: bool) -> str | None:
    """Why the oneDNN paths cannot run a model of this kind (None when they can)."""
    return packed_gemm_unavailable(device, dtype) or ("post-norm layers" if post_norm else None)


def auto_gemm(device: torch.device, dtype: torch.dtype, hidden: int, post_norm: bool) -> tuple[str, str | None]:
    """gemm="auto"'s path for a model of this kind: "onednn" from ONEDNN_MIN_HIDDEN on where oneDNN can run it,
    else "plain" with the reason. The memory plan asks it too, through packs_by_default."""
    reason = onednn_unavailable(device, dtype, post_norm)
    if reason is not None:
        return "plain", reason
    if hidden < ONEDNN_MIN_HIDDEN:
        return "plain", f"hidden size {hidden} < {ONEDNN_MIN_HIDDEN}"
    return "onednn", None


def auto_packs(gemm: str, new_tokens: int) -> bool:
    """Whether gemm="auto" on path `gemm` decodes a generate of `new_tokens` tokens on a packed copy."""
    return gemm == "onednn" and new_tokens >= PACKED_MIN_NEW_TOKENS


def packs_by_default(device: str, dtype: str, hidden: int, post_norm: bool, new_tokens: int) -> bool:
    """Whether the default engine (gemm="auto") decodes a generate of `new_tokens` tokens on a packed copy of a
    model of this kind, asked without the model (the memory plan: device "cpu", dtype "float32", ...)."""
    gemm, _ = auto_gemm(torch.device(device), getattr(torch, dtype), hidden, post_norm)
    return auto_packs(gemm, new_tokens)


def drop_finished_now(running: int, in_use: int, size: int, largest: int, graphs: bool) -> bool:
    """Whether to compact finished rows out of the cache now. Compaction copies every running row's cache;
    a finished row left in place costs one row of decode. So rows are dropped in batches: when a graph
    bucket can shrink, or (eager) when at least DROP_FRACTION of the rows in use have finished."""
    if graphs:
        return graph_bucket(running, largest) < size
    return in_use - running >= max(1, DROP_FRACTION * in_use)


def graph_bucket(n: int, largest: int) -> int:
    """Batch-size bucket for CUDA graphs: the next power of two (capped at the cache's row capacity)."""
    return min(largest, 1 << max(0, (n - 1).bit_length()))


def graph_buckets(capacity: int) -> list[int]:
    """Every bucket a cache of `capacity` rows can decode at, largest first (the capture order: smaller
    graphs then reuse the shared pool's blocks)."""
    return sorted({graph_bucket(n, capacity) for n in range(1, capacity + 1)}, reverse=True)

