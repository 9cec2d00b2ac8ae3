"""The embedded sampler: batched prefill + KV-cached decode on the trainer's own parameter tensors.

Two paths behind one `TorchEngine.generate`:

- "static" (Llama-shaped decoders: STATIC_MODEL_TYPES, their differences in `Family`): a hand-rolled forward over a
  pre-allocated KV cache (gpt-fast style). It reads the module's parameter tensors directly (zero-copy:
  the optimizer's in-place updates are seen at the next call), skips Hugging Face's per-call mask and
  cache machinery, and drops finished rows by compacting the cache, in batches (a finished row rides
  along until a quarter of the rows have finished, or a CUDA-graph bucket can shrink). On CUDA the decode
  step is captured once per batch-size bucket as a CUDA graph and replayed. Graphs are captured on the
  main thread only, all of them into one memory pool: `TorchEngine.prepare` reserves the cache for the
  largest call and captures every bucket up front (the trainer does so before its first overlapped
  rollout), and a sampler in a worker thread that meets a bucket with no graph runs that step eagerly
  (`graph_misses` in the rollout stats) rather than capture while the training thread allocates.
- "dynamic": the model's own forward with a transformers DynamicCache. Works for any causal LM.

Both sample with `sample_next` from one uniform per output row and step, so they give the same tokens
for the same logits whatever rows are still in the batch (greedy is exact up to float rounding; tests
hold them to it in float64).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dash_fast.data.prompts import pad_left, unique_prompts
from dash_fast.engines.base import Rollout, SamplingParams
from dash_fast.models.decoder import (
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
    static_unsupported,
)

DROP_FRACTION = 0.25  # eager decode compacts the cache once this fraction of its rows has finished


def draw_uniforms(n: int, params: SamplingParams, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor | None:
    """One float64 uniform per output row for this decode step (None when greedy). The engines draw for
    every row and index by output row, so a seeded row's tokens do not depend on which other rows are
    still in the batch (compaction policy, static vs dynamic path)."""
    if params.temperature == 0:
        return None
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor | None, seen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row, by inverse CDF at `uniform` [rows] (see draw_uniforms; unused when greedy).
    Returns (tokens, log p(token) under softmax(logits / temperature)).

    The repetition penalty (on the tokens `seen` [rows, vocab] marks: the row's prompt and completion so
    far), top-k, top-p and min-p only change which tokens are drawn, in Hugging Face's order (penalty on the
    raw logits, then temperature, top-k, top-p, min-p); the returned log-prob is on the full tempered
    distribution, as TRL computes it in the trainer, so the two agree. The draw is by inverse CDF (one
    uniform per row, float64 cumsum) rather than torch.multinomial, whose per-vocabulary-entry exponential
    noise dominates a small model's decode step on CPU.
    """
    logits = logits.float()
    drawn = logits
    if seen is not None and params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        drawn = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if params.temperature == 0:
        tokens = drawn.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
    allowed = logprobs if drawn is logits else torch.log_softmax(drawn / params.temperature, dim=-1)
    if 0 < params.top_k < allowed.shape[-1]:
        kth = torch.topk(allowed, params.top_k, dim=-1).values[:, -1:]
        allowed = allowed.masked_fill(allowed < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_lp, order = torch.sort(allowed, dim=-1, descending=True)
        probs = torch.softmax(sorted_lp, -1)  # renormalised after top-k, as HF's warpers
        drop_sorted = probs.cumsum(-1) - probs > params.top_p  # keep the token crossing p
        allowed = allowed.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if params.min_p > 0:  # HF's MinPLogitsWarper: p < min_p x max p is dropped (the top token always stays)
        top = allowed.max(dim=-1, keepdim=True).values
        allowed = allowed.masked_fill(allowed < top + math.log(params.min_p), float("-inf"))
    cdf = allowed.exp().double().cumsum(-1)  # unnormalised; dropped tokens add 0 and are never drawn
    tokens = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def seen_tokens(ids: torch.Tensor, attn: torch.Tensor, row_prompt: torch.Tensor, vocab: int,
                params: SamplingParams, extra_rows: int = 0) -> torch.Tensor | None:
    """[rows (+ extra_rows), vocab] bool: the tokens of each output row's prompt (the repetition penalty's
    history; sampled tokens are marked as they come). None when the penalty is off."""
    if params.repetition_penalty == 1.0:
        return None
    counts = torch.zeros(ids.shape[0], vocab, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, ids, attn.to(torch.int32))  # padding adds 0
    seen = (counts > 0).index_select(0, row_prompt)
    return torch.cat([seen, seen.new_zeros(extra_rows, vocab)]) if extra_rows else seen


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword a transformers decoder's forward takes its KV cache by: `cache` from transformers 5.24
    (which deprecates `past_key_values`), `past_key_values` before. Passing the wrong one is silent: the
    forward swallows it in **kwargs and attends only the current token."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


# ---------------------------------------------------------------- packed GEMMs (CPU decode)
# At decode a GEMM has m = rows in the batch (16-256): there MKL's sgemm over a row-major weight reaches a
# fraction of its large-m rate on CPU, while oneDNN over a weight reordered once into its blocked layout
# runs near it. The packed copy is built at the start of each generate from the live parameters (so an
# optimizer step's in-place update is picked up at the next call) and freed at its end: it costs one more
# copy of the weights while sampling, none while training.
GEMM_PATHS = ("auto", "plain", "packed")


def packed_gemm_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why oneDNN's packed linear cannot run here (None when it can): it is used on CPU for fp32 weights
    (the dtype its speed and agreement with the plain path are measured at), where this torch build has it
    (checked once, on a small product against F.linear)."""
    if device.type != "cpu":
        return f"{device.type} device"
    if dtype != torch.float32:
        return f"{dtype} weights"
    if not torch.backends.mkldnn.is_available():
        return "torch built without oneDNN"
    try:
        w = torch.linspace(-1, 1, 24, dtype=dtype).view(6, 4)
        x = torch.linspace(-1, 2, 12, dtype=dtype).view(3, 4)
        out = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None, "none",
                                                 [], "")
    except (RuntimeError, AttributeError) as e:
        return f"oneDNN packed linear unavailable ({type(e).__name__})"
    if not torch.allclose(out, F.linear(x, w), atol=1e-5):
        return "oneDNN packed linear disagrees with F.linear"
    return None


class PackedLinear:
    """One projection with its weight [out, in] reordered into oneDNN's blocked layout for `rows`-row inputs
    (any row count runs; `rows` picks the layout). Several weights (q|k|v, gate|up) concatenated along `out`
    make one GEMM of the width of all of them."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], rows: int) -> None:
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        self.sizes = [t.shape[0] for t in weights]
        if all(b is None for b in biases):
            self.bias = None
        else:
            self.bias = torch.cat([b if b is not None else w.new_zeros(n) for b, n in zip(biases, self.sizes)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def add(self, x: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """x + scale * linear(a), the add fused into the GEMM when scale is 1 (as `linear_add`)."""
        if scale == 1.0:
            return torch.ops.mkldnn._linear_pointwise.binary(a, x, self.weight, self.bias, "add")
        return torch.add(x, self(a), alpha=scale)


@dataclass
class PackedLayer:
    """A decoder layer's four GEMMs: q|k|v in one, o, gate|up in one, down."""

    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear
    act: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer: torch.nn.Module, rows: int) -> PackedLayer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]

        def pack(mods):
            return PackedLinear([m.weight for m in mods], [m.bias for m in mods], rows)

        act = mlp.activation_fn if hasattr(mlp, "gate_up_proj") else mlp.act_fn
        return cls(pack(qkv), pack([attn.o_proj]), pack(gate_up), pack([mlp.down_proj]), act)


class StaticDecoder:
    """A Llama-family forward over a pre-allocated KV cache, reading the module's own tensors.

    Cache layout: per layer k, v of [B_max, n_kv_heads, S_max, head_dim]. Prompts are left-padded to
    a common length P, so at decode step t every row writes slot P + t (one slice, no scatter);
    `key_valid[b, s]` masks the padding slots. Running rows are compacted to the front once enough rows
    have finished (`_drop_finished_now`).
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
        self.rope_q = self.rope_k = self.rot = torch.empty(0)
        self.graphs: dict[int, tuple] = {}  # bucket size -> (replay, static inputs, static logits)
        self._param_ptrs: tuple = ()
        # capture(step) -> (replay, outputs): CUDA graphs by default; tests inject a CPU stand-in
        self.capture: Callable[[Callable[[], torch.Tensor]], tuple] | None = None
        self._pool = None  # one CUDA graph memory pool shared by every bucket
        self.capture_log: list[tuple[int, str]] = []  # (bucket, thread name) of each capture
        self.graph_misses = 0  # decode steps run eagerly because their bucket had no graph (worker thread)
        self.workers = 0  # generate() calls running outside the main thread right now
        self.gemm, self.gemm_reason = self._pick_gemm(gemm)
        self.packed: list[PackedLayer] = []  # oneDNN-packed projections, live during one generate (pack / unpack)
        self.packed_head: PackedLinear | None = None

    def _pick_gemm(self, gemm: str) -> tuple[str, str | None]:
        """("packed" or "plain", why plain when "auto" could not pack), fixed when the decoder is built."""
        if gemm not in GEMM_PATHS:
            raise ValueError(f"gemm={gemm!r}: must be one of {GEMM_PATHS}")
        if gemm == "plain":
            return "plain", "gemm='plain'"
        head = self.model.get_output_embeddings().weight
        reason = packed_gemm_unavailable(head.device, head.dtype)
        if reason is None and self.family.post_norm:
            reason = "post-norm layers"
        if reason is not None and gemm == "packed":
            raise ValueError(f"gemm='packed' cannot run this model: {reason}")
        return ("plain", reason) if reason else ("packed", None)

    def pack(self, rows: int) -> None:
        """Reorder every projection and the lm_head from the live parameters for `rows`-row decode steps
        (gemm == "packed"; a no-op otherwise). One more copy of those weights until `unpack`."""
        if self.gemm != "packed":
            return
        self.packed = [PackedLayer.of(layer, rows) for layer in self.layers]
        head = self.model.get_output_embeddings()
        self.packed_head = PackedLinear([head.weight], [getattr(head, "bias", None)], rows)

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
        self.key_valid = self.rope_q = self.rope_k = self.rot = torch.empty(0)
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
        self.rope_k = torch.stack([cos[0], sin[0]], dim=1)  # the model's own RoPE as a table: [S, 2, D]
        self.rope_q = self.rope_k * self.scaling  # queries carry the softmax scale: one op less per layer
        half = self.head_dim // 2  # rotate_half(x) == x @ rot: a signed permutation, exact in any dtype
        eye = torch.eye(half, device=device, dtype=dtype)
        self.rot = torch.zeros(self.head_dim, self.head_dim, device=device, dtype=dtype)
        self.rot[half:, :half] = -eye
        self.rot[:half, half:] = eye
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
    def _rope(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin, with table = [b, T, 1, 2, D] (cos, sin). Not shared_prompt's
        `_rope`: here cos/sin come from a per-slot table built once per cache (gathered by position each
        decode step), the queries' table carries the softmax scale (the CPU decode attention is two raw
        GEMMs with no scale argument), and rotate_half is a matmul by a signed permutation; the training
        forward keeps Hugging Face's op order instead, so its values track the model's own forward."""
        cos, sin = table[..., 0, :], table[..., 1, :]
        return torch.addcmul(x * cos, x @ self.rot, sin)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [b, T, H, D] (pre-scaled), cache views k, v [b, H_kv, S, D] -> [b * T, H * D].

        SDPA with a boolean mask (`grouped_sdpa`), except for one-token decode on CPU: there `mask` is an
        additive float bias [b * H_kv, g, S] and two batched GEMMs beat PyTorch's CPU flash kernel ~2x. Either
        way query heads are grouped onto their KV head (GQA without repeating K/V)."""
        b, T, _, D = q.shape
        if mask.dtype == torch.bool:
            return grouped_sdpa(q.transpose(1, 2), k, v, mask, 1.0).transpose(1, 2).reshape(b * T, -1)
        S = k.shape[2]
        g = self.n_heads // self.n_kv
        scores = torch.baddbmm(mask, q.reshape(b * self.n_kv, g, D), k.reshape(b * self.n_kv, S, D).transpose(1, 2))
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
        rope_q = self.rope_q.index_select(0, flat).view(b, T, 1, 2, D)
        rope_k = self.rope_k.index_select(0, flat).view(b, T, 1, 2, D)
        for i, layer in enumerate(self.layers):
            if self.packed:
                x = self._packed_layer(x, i, layer, rope_q, rope_k, start, kv_len, mask)
                continue
            attn = layer.self_attn
            h = attention_input(x, layer, fam, rms_norm, eps)
            q, k, v = qkv_projections(attn, h, (b, T), rms_norm, eps, fam)
            o = self._attend(i, attn, q, k, v, rope_q, rope_k, start, kv_len, mask)
            x = attention_residual(x, o, layer, fam, rms_norm, eps)
            x = mlp_block(x, layer, fam, rms_norm, eps)
        h = rms_norm(x.view(b, T, -1)[:, -1], fam.weight(self.decoder.norm), eps)
        if self.logit_multiplier != 1.0:
            h = h * self.logit_multiplier
        if self.packed_head is not None:
            return self.packed_head(h)
        head = self.model.get_output_embeddings()
        return F.linear(h, head.weight, getattr(head, "bias", None))

    def _attend(self, i: int, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope_q: torch.Tensor, rope_k: torch.Tensor, start: int | torch.Tensor, kv_len: int,
                mask: torch.Tensor) -> torch.Tensor:
        """Layer i's attention from its q, k, v [b, T, heads, D]: RoPE, the new K/V into the cache at `start`,
        attention over slots [0, kv_len) (see `forward`); returns [b * T, H * D]."""
        T = q.shape[1]
        if getattr(attn, "use_rope", True):
            q, k = self._rope(q, rope_q), self._rope(k, rope_k).transpose(1, 2)
        else:  # SmolLM3's NoPE layers: no rotation, the softmax scale still on the queries
            q, k = q * self.scaling, k.transpose(1, 2)
        kc, vc = self.k[i][: q.shape[0]], self.v[i][: q.shape[0]]
        if isinstance(start, torch.Tensor):
            kc.index_copy_(2, start, k)
            vc.index_copy_(2, start, v.transpose(1, 2))
        else:
            kc[:, :, start : start + T] = k
            vc[:, :, start : start + T] = v.transpose(1, 2)
        return self._attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], mask)

    def _packed_layer(self, x: torch.Tensor, i: int, layer: torch.nn.Module, rope_q: torch.Tensor,
                      rope_k: torch.Tensor, start: int | torch.Tensor, kv_len: int, mask: torch.Tensor) -> torch.Tensor:
        """Layer i on the packed GEMMs (q|k|v in one, gate|up in one): the same math as the plain path's
        attention_input / qkv_projections / attention_residual / mlp_block for the pre-norm families."""
        p, fam, eps, attn = self.packed[i], self.family, self.eps, layer.self_attn
        b, T = rope_q.shape[:2]
        D = self.head_dim
        h = rms_norm(x, fam.weight(layer.input_layernorm), eps)
        q, k, v = p.qkv(h).split([self.n_heads * D, self.n_kv * D, self.n_kv * D], dim=-1)
        q, k, v = (t.reshape(b, T, -1, D) for t in (q, k, v))
        if hasattr(attn, "q_norm"):  # Qwen3: per head
            q, k = rms_norm(q, fam.weight(attn.q_norm), eps), rms_norm(k, fam.weight(attn.k_norm), eps)
        o = self._attend(i, attn, q, k, v, rope_q, rope_k, start, kv_len, mask)
        x = p.o.add(x, o, fam.residual_scale)
        gate, up = p.gate_up(rms_norm(x, fam.weight(layer.post_attention_layernorm), eps)).chunk(2, dim=-1)
        return p.down.add(x, p.act(gate).mul_(up), fam.residual_scale)

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


def _drop_finished_now(running: int, in_use: int, size: int, largest: int, graphs: bool) -> bool:
    """Whether to compact finished rows out of the cache now. Compaction copies every running row's cache;
    a finished row left in place costs one row of decode. So rows are dropped in batches: when a graph
    bucket can shrink, or (eager) when at least DROP_FRACTION of the rows in use have finished."""
    if graphs:
        return _bucket(running, largest) < size
    return in_use - running >= max(1, DROP_FRACTION * in_use)


def _bucket(n: int, largest: int) -> int:
    """Batch-size bucket for CUDA graphs: the next power of two (capped at the cache's row capacity)."""
    return min(largest, 1 << max(0, (n - 1).bit_length()))


def graph_buckets(capacity: int) -> list[int]:
    """Every bucket a cache of `capacity` rows can decode at, largest first (the capture order: smaller
    graphs then reuse the shared pool's blocks)."""
    return sorted({_bucket(n, capacity) for n in range(1, capacity + 1)}, reverse=True)


class TorchEngine:
    """The embedded rollout engine (see the module docstring).

    `kv_cache`: "auto" (static when the architecture is supported, else dynamic), "static", "dynamic".
    `cuda_graphs`: None = on when the model is on CUDA (static path only).
    `gemm`: the static path's projections: "auto" (oneDNN-packed on CPU in fp32 where this torch has the
    op, else plain), "packed" (error where unavailable), "plain" (F.linear on the parameters, no copy).
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, kv_cache: str = "auto",
                 cuda_graphs: bool | None = None, gemm: str = "auto") -> None:
        if kv_cache not in ("auto", "static", "dynamic"):
            raise ValueError(f"kv_cache={kv_cache!r}: must be auto, static or dynamic")
        if gemm not in GEMM_PATHS:
            raise ValueError(f"gemm={gemm!r}: must be one of {GEMM_PATHS}")
        self.gemm = gemm
        self.model = model
        self.pad_token_id = pad_token_id
        self.kv_cache = kv_cache
        self.cuda_graphs = cuda_graphs
        self.capture = None  # StaticDecoder.capture: None = CUDA graphs (tests inject a stand-in)
        self._static: StaticDecoder | None = None

    def _decoder_for(self, model: torch.nn.Module) -> StaticDecoder:
        if self._static is None or self._static.model is not model:
            self._static = StaticDecoder(model, self.gemm)
        self._static.capture = self.capture  # the engine's capture, as set now (a decoder may predate it)
        return self._static

    def _use_graphs(self, device: torch.device) -> bool:
        """CUDA graphs replayed (or, with an injected `capture`, its stand-in): the static path on CUDA."""
        graphs = self.cuda_graphs if self.cuda_graphs is not None else device.type == "cuda"
        return graphs and (device.type == "cuda" or self.capture is not None)

    @torch.no_grad()
    def prepare(self, batch: int, length: int) -> list[int]:
        """Reserve the static cache once for `batch` rows of `length` tokens (prompt + completion) and,
        when graphs are on, capture every batch-size bucket now, on this (the main) thread. Call it before
        sampling in a worker thread (overlap=True): the worker then only replays. Returns the buckets
        captured ([] on the dynamic path or without graphs)."""
        if self.path() != "static":
            return []
        param = self.model.get_output_embeddings().weight
        dec = self._decoder_for(self.model)
        dec.reserve(batch, length, param.device, param.dtype)
        if not self._use_graphs(param.device):
            return []
        if not dec.may_capture():
            raise RuntimeError("TorchEngine.prepare must run on the main thread, with no sampler running")
        if param.device.type == "cuda":
            dec.drop_stale_graphs()
        todo = [b for b in graph_buckets(dec.capacity) if b not in dec.graphs]
        for b in todo:  # inputs: pad tokens at position 0, slot 0 (prefill rewrites both before any decode)
            tokens = torch.full((b,), self.pad_token_id, dtype=torch.long, device=param.device)
            dec.capture_bucket(b, tokens, torch.zeros_like(tokens), 0)
        return todo

    def release(self) -> None:
        """Free the static KV cache and the CUDA graphs until the next generate (StaticDecoder.release)."""
        if self._static is not None:
            self._static.release()

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: the engine samples from the trainer's parameter tensors themselves."""
        if model is not self.model:
            self.model, self._static = model, None

    @property
    def can_sample_concurrently(self) -> bool:
        """Whether generate() may run in a worker thread beside training (overlap.py): true exactly on the
        static path, which reads parameters and touches no module state; the dynamic one toggles
        model.eval()/train()."""
        return self.path() == "static"

    def describe(self) -> str:
        """The rollout path, for the start-up line and summary.json: the static fast path, or the dynamic
        fallback with its reason."""
        if self.path() == "static":
            dec = self._decoder_for(self.model)
            if dec.gemm == "packed":
                return "torch static fast path (oneDNN packed GEMMs)"
            return f"torch static fast path (plain GEMMs: {dec.gemm_reason})"
        reason = "kv_cache='dynamic'" if self.kv_cache == "dynamic" else static_unsupported(self.model)
        return f"torch dynamic fallback ({reason})"

    def path(self) -> str:
        """"static" or "dynamic": which path generate() takes for the current model."""
        if self.kv_cache == "dynamic":
            return "dynamic"
        reason = static_unsupported(self.model)
        if reason is None:
            return "static"
        if self.kv_cache == "static":
            raise ValueError(f"kv_cache='static' cannot run this model: {reason}")
        return "dynamic"

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        device = next(self.model.parameters()).device
        unique, row_prompt = unique_prompts(prompt_ids)
        ids, attn = pad_left(unique, self.pad_token_id)  # every row's next token is at column P
        ids, attn, row_prompt = ids.to(device), attn.to(device), row_prompt.to(device)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        run = self._generate_static if self.path() == "static" else self._generate_dynamic
        tokens, logps, lengths, stats = run(ids, attn, row_prompt, params, generator)
        width = max(int(lengths.max()), 1)
        mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()
        return Rollout(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=tokens[:, :width].masked_fill(mask == 0, self.pad_token_id).cpu(),
            completion_mask=mask.cpu(),
            sampling_logps=(logps[:, :width] * mask).cpu(),
            stats={**stats, "generated_tokens": int(lengths.sum()), "prefill_prompts": len(unique)},
        )

    def _outputs(self, B: int, params: SamplingParams, device: torch.device):
        return (torch.full((B, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device),
                torch.zeros((B, params.max_new_tokens), dtype=torch.float32, device=device),
                torch.zeros(B, dtype=torch.long, device=device),
                torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=device))

    def _generate_static(self, ids, attn, row_prompt, params: SamplingParams, generator):
        model = self.model
        device, dtype = ids.device, model.get_output_embeddings().weight.dtype
        B, P = row_prompt.numel(), ids.shape[1]
        dec = self._decoder_for(model)
        worker = threading.current_thread() is not threading.main_thread()
        dec.workers += worker
        try:
            dec.pack(B)  # the packed path's copy of the live weights, for this call only
            return self._decode_static(dec, ids, attn, row_prompt, params, generator, B, P, device, dtype)
        finally:
            dec.unpack()
            dec.workers -= worker

    def _decode_static(self, dec, ids, attn, row_prompt, params, generator, B, P, device, dtype):
        dec.reserve(B, P + params.max_new_tokens, device, dtype)
        graphs = self.cuda_graphs if self.cuda_graphs is not None else device.type == "cuda"
        replay = graphs and self._use_graphs(device)
        if replay and device.type == "cuda":
            dec.drop_stale_graphs()
        misses = dec.graph_misses
        largest = dec.capacity if graphs else B  # buckets are fixed by the cache, not by this call
        out_tokens, out_logps, lengths, stop = self._outputs(B + 1, params, device)  # row B: finished rows' sink

        logits = dec.prefill(ids, attn)  # each distinct prompt once (a group's G rows share it) ...
        seen = seen_tokens(ids, attn, row_prompt, logits.shape[-1], params, extra_rows=1)  # row B: the sink
        if ids.shape[0] < B:  # ... then its K/V rows are copied to every row that samples from it
            dec.compact(row_prompt, P)
            logits, attn = logits.index_select(0, row_prompt), attn.index_select(0, row_prompt)
        pos = attn.sum(-1)  # next RoPE position of each row
        rows = torch.arange(B, device=device)  # output row of each cache row in use; B once it has finished
        n = B  # cache rows in use: running rows and finished ones not yet dropped
        size = _bucket(B, largest) if graphs else B  # rows decoded per step (graphs: rows past B are filler)
        decode_steps = 0
        for t in range(params.max_new_tokens):
            uniform = draw_uniforms(B, params, generator, device)  # finished rows (B) reuse row B-1's: discarded
            tokens, logps = sample_next(logits[:n], params, None if uniform is None else uniform[rows.clamp(max=B - 1)],
                                        None if seen is None else seen[rows])
            if seen is not None:
                seen[rows, tokens] = True
            out_tokens[rows, t] = tokens
            out_logps[rows, t] = logps
            lengths[rows] = t + 1
            rows = rows.masked_fill(torch.isin(tokens, stop), B)  # finished: later outputs go to the sink
            running = int((rows < B).sum())
            if t == params.max_new_tokens - 1 or running == 0:
                break
            if _drop_finished_now(running, n, size, largest, graphs):  # compact (to a graph bucket on CUDA)
                keep = (rows < B).nonzero().view(-1)
                dec.compact(keep, P + t)
                rows, tokens, pos, n = rows[keep], tokens[keep], pos[keep], running
                size = _bucket(n, largest) if graphs else n
            if graphs:  # static shapes: `size` rows, the last size - n of them filler
                padded = torch.cat([tokens, tokens.new_full((size - n,), self.pad_token_id)])
                padded_pos = torch.cat([pos, pos.new_zeros(size - n)])
                if replay:
                    logits = dec.decode_graph(padded, padded_pos, P + t)
                else:  # the same static-shape step, eager: what tests can check without a GPU
                    logits = dec.decode(padded, padded_pos, P + t, full_length=True)
            else:
                logits = dec.decode(tokens, pos, P + t, full_length=False)
            pos = pos + 1
            decode_steps += 1
        return (out_tokens[:B], out_logps[:B], lengths[:B],
                {"decode_steps": decode_steps + 1, "kv_cache": "static", "graph_misses": dec.graph_misses - misses})

    def _generate_dynamic(self, ids, attn, row_prompt, params: SamplingParams, generator):
        from transformers import DynamicCache

        model = self.model
        was_training = model.training
        model.eval()
        device = ids.device
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        out_tokens, out_logps, lengths, stop = self._outputs(row_prompt.numel(), params, device)
        active = torch.arange(row_prompt.numel(), device=device)  # original row of each row still in the batch

        cache = DynamicCache()
        cache_kw = cache_keyword(model)
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, **{cache_kw: cache},
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        seen = seen_tokens(ids, attn, row_prompt, logits.shape[-1], params)
        if ids.shape[0] < row_prompt.numel():  # one prefill per distinct prompt, copied to its rows
            cache.batch_select_indices(row_prompt)
            logits, attn, positions = logits[row_prompt], attn[row_prompt], positions[row_prompt]
        next_pos = positions[:, -1:] + 1
        decode_steps = 0
        for t in range(params.max_new_tokens):
            uniform = draw_uniforms(row_prompt.numel(), params, generator, device)
            tokens, logps = sample_next(logits, params, None if uniform is None else uniform[active],
                                        None if seen is None else seen[active])
            if seen is not None:
                seen[active, tokens] = True
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
                        **{cache_kw: cache}, use_cache=True)
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
            decode_steps += 1
        model.train(was_training)
        return out_tokens, out_logps, lengths, {"decode_steps": decode_steps + 1, "kv_cache": "dynamic"}
