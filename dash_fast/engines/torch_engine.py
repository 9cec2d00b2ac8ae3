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

import torch

from dash_fast.data.prompts import pad_left, unique_prompts
from dash_fast.engines.base import Rollout, SamplingParams
from dash_fast.engines.packed_gemm import GEMM_PATHS
from dash_fast.engines.static_decode import (
    PACKED_MIN_NEW_TOKENS,
    StaticDecoder,
    drop_finished_now,
    graph_bucket,
    graph_buckets,
)
from dash_fast.models.decoder import static_unsupported
from dash_fast.runtime.cpu_memory import reuse_freed_memory

# Logits per sampling chunk on CPU (~2.5 MB in fp32): 4 rows at a 151936-token vocabulary, where 2 to 8 rows per
# chunk measured alike (16-256 rows); a small vocabulary's whole batch in one chunk (no per-chunk op overhead).
SAMPLE_ELEMENTS = 640_000
# The top-k draw's candidates at most, ties with the k-th value included; more ties than that (e.g. constant
# logits) draw over the whole vocabulary instead.
TOP_K_TIES_MAX = 2048


def sample_chunk_rows(logits: torch.Tensor) -> int:
    """Rows per chunk of sample_next's passes over the vocabulary: all of them on GPU."""
    if logits.device.type != "cpu":
        return max(1, logits.shape[0])
    return max(1, SAMPLE_ELEMENTS // logits.shape[-1])


def row_chunks(logits: torch.Tensor) -> list[slice]:
    """The row ranges sample_next and log_normaliser make their passes over the vocabulary on (sample_chunk_rows
    rows each)."""
    step = sample_chunk_rows(logits)
    return [slice(i, i + step) for i in range(0, logits.shape[0], step)]


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

    With top-k the draw runs over the k candidates (`sample_among_top_k`); otherwise over the vocabulary
    (`sample_over_vocabulary`), on CPU a few rows at a time (`sample_chunk_rows`) so that each pass over a chunk's
    vocabulary-wide temporaries stays in cache (at 256 rows x 151936 tokens one pass over the whole batch
    streams 155 MB, and the passes cost more than the decode step's attention).
    """
    logits = logits.float()
    drawn = logits
    if seen is not None and params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        drawn = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if params.temperature == 0:
        tokens = drawn.argmax(dim=-1)
        return tokens, logits.gather(1, tokens[:, None]).squeeze(1) - log_normaliser(logits, 1.0)
    if 0 < params.top_k < logits.shape[-1]:
        picked = sample_among_top_k(logits, drawn, params, uniform)
        if picked is not None:
            return picked
    parts = [sample_over_vocabulary(logits[rows], drawn[rows], params, uniform[rows]) for rows in row_chunks(logits)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def log_normaliser(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log sum exp(logits / temperature) per row (in row chunks on CPU, as sample_next)."""
    out = logits.new_empty(logits.shape[0])
    for rows in row_chunks(logits):
        x = logits[rows]
        torch.logsumexp(x if temperature == 1.0 else x / temperature, dim=-1, out=out[rows])
    return out


def sample_over_vocabulary(logits: torch.Tensor, drawn: torch.Tensor, params: SamplingParams,
                           uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_next's draw over the whole vocabulary, for rows `logits` and their penalised `drawn`."""
    t = params.temperature  # x / 1.0 is x: no pass over the vocabulary for it
    logprobs = torch.log_softmax(logits if t == 1.0 else logits / t, dim=-1)
    allowed = logprobs if drawn is logits else torch.log_softmax(drawn if t == 1.0 else drawn / t, dim=-1)
    if 0 < params.top_k < allowed.shape[-1]:  # ties at the k-th value: every tied token stays
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


def sample_among_top_k(logits: torch.Tensor, drawn: torch.Tensor, params: SamplingParams,
                       uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """sample_next for 0 < top_k < vocab over the k candidates only: one top-k pass and one log-sum-exp pass
    over the vocabulary instead of sample_over_vocabulary's six (log-softmax, filter, exp, fp64 copy, cumsum,
    search). The same draw: top-p and min-p on the candidates, then the inverse CDF at `uniform` over them in
    vocabulary order, which is sample_over_vocabulary's CDF without its zero entries (the draw is
    shift-invariant, so the candidates need no normaliser; the sums round differently, so a uniform within
    rounding of a boundary may pick the neighbour). Tokens tied with the k-th value stay candidates, as in
    sample_over_vocabulary: the top-k pass widens until it holds every tie (bf16 logits tie there often: at
    151936 tokens a row's 50th and 51st values were equal in most rows); None when the ties outnumber
    TOP_K_TIES_MAX candidates."""
    k, t = params.top_k, params.temperature
    width = min(k + 1 + max(8, k // 4), drawn.shape[-1])  # room for a few ties: one top-k pass in most steps
    while True:
        top = torch.topk(drawn, width, dim=-1)  # descending
        kth = top.values[:, k - 1 : k]
        if width == drawn.shape[-1] or not bool((top.values[:, -1:] == kth).any()):  # every tie is a candidate
            break
        if width >= TOP_K_TIES_MAX:
            return None
        width = min(2 * width, drawn.shape[-1], TOP_K_TIES_MAX)
    allowed = top.values if t == 1.0 else top.values / t
    allowed = allowed.masked_fill(top.values < kth, float("-inf"))  # below the k-th: not drawn
    if params.top_p < 1.0:  # renormalised over the candidates, the token crossing p kept
        probs = torch.softmax(allowed, -1)
        allowed = allowed.masked_fill(probs.cumsum(-1) - probs > params.top_p, float("-inf"))
    if params.min_p > 0:
        allowed = allowed.masked_fill(allowed < allowed[:, :1] + math.log(params.min_p), float("-inf"))
    ids, order = top.indices.sort(dim=-1)
    allowed = allowed.gather(1, order)
    cdf = (allowed - allowed.max(dim=-1, keepdim=True).values).exp().double().cumsum(-1)
    at = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True).clamp_(max=width - 1)
    tokens = ids.gather(1, at).squeeze(1)
    chosen = logits.gather(1, tokens[:, None]).squeeze(1)  # log-prob on the full tempered, unpenalised distribution
    return tokens, (chosen if t == 1.0 else chosen / t) - log_normaliser(logits, t)


def sample_into(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor | None,
                seen: torch.Tensor | None, rows: torch.Tensor,
                t: int, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One decode step's draw (sample_next) for the output rows `rows`, written at column `t` of the outputs
    (tokens, log-probs, lengths) and marked in `seen` (the repetition penalty's history); returns the tokens."""
    tokens, logps = sample_next(logits, params, uniform, None if seen is None else seen[rows])
    if seen is not None:
        seen[rows, tokens] = True
    out_tokens, out_logps, lengths = outputs
    out_tokens[rows, t] = tokens
    out_logps[rows, t] = logps
    lengths[rows] = t + 1
    return tokens


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


class TorchEngine:
    """The embedded rollout engine (see the module docstring).

    `kv_cache`: "auto" (static when the architecture is supported, else dynamic), "static", "dynamic".
    `cuda_graphs`: None = on when the model is on CUDA (static path only).
    `gemm`: the static path's projections: "auto" ("onednn" on CPU in fp32, or in bf16 where the CPU has oneDNN
    bf16 GEMMs, where this torch has the op and the model is wide enough, static_decode.ONEDNN_MIN_HIDDEN, with
    "packed" for generates of PACKED_MIN_NEW_TOKENS tokens or more; else plain), "onednn" (oneDNN over the
    parameters, no copy), "packed" (oneDNN over a reordered copy made per generate: faster per decode step, one
    more copy of the weights while sampling; both error where unavailable), "plain" (F.linear on the
    parameters, no copy).
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

    @property
    def static_decoder(self) -> StaticDecoder | None:
        """The static path's decoder (its KV cache, CUDA graphs, capture log), None before the first static
        call or after a new model was synced."""
        return self._static

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
            if dec.gemm == "onednn" and dec.pack_long:
                return f"torch static fast path (oneDNN GEMMs, packed from {PACKED_MIN_NEW_TOKENS} new tokens)"
            if dec.gemm == "onednn":
                return "torch static fast path (oneDNN GEMMs)"
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
        with reuse_freed_memory():  # the decode steps' temporaries come from the heap, not fresh mappings
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
            dec.pack(B, params.max_new_tokens)  # a packed copy of the live weights, if any, for this call only
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
        size = graph_bucket(B, largest) if graphs else B  # rows decoded per step (graphs: rows past B are filler)
        decode_steps = 0
        for t in range(params.max_new_tokens):
            uniform = draw_uniforms(B, params, generator, device)  # finished rows (B) reuse row B-1's: discarded
            tokens = sample_into(logits[:n], params, None if uniform is None else uniform[rows.clamp(max=B - 1)],
                                 seen, rows, t, (out_tokens, out_logps, lengths))
            rows = rows.masked_fill(torch.isin(tokens, stop), B)  # finished: later outputs go to the sink
            running = int((rows < B).sum())
            if t == params.max_new_tokens - 1 or running == 0:
                break
            if drop_finished_now(running, n, size, largest, graphs):  # compact (to a graph bucket on CUDA)
                keep = (rows < B).nonzero().view(-1)
                dec.compact(keep, P + t)
                rows, tokens, pos, n = rows[keep], tokens[keep], pos[keep], running
                size = graph_bucket(n, largest) if graphs else n
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
            tokens = sample_into(logits, params, None if uniform is None else uniform[active], seen, active, t,
                                 (out_tokens, out_logps, lengths))
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
