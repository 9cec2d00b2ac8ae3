"""Memory planned before any weight loads: what a run holds, from the model's config and the run's config.

`plan(model, run, budget)` is pure arithmetic over two dataclasses (`ModelShape` from a transformers config
or config.json, `RunShape` from a DashConfig) and returns a `MemoryPlan`: named items in bytes, the peak,
and whether it fits `budget`. `fit` searches the settings left to it (`kv_cache_release`,
`gradient_checkpointing`, `generation_batch_size`, each when the config leaves it to the plan) for the
cheapest that fits, and otherwise raises one line naming the largest item and what to change. The trainer
prints the plan at start-up and stores it in summary.json; `dash-fast plan` (or `train --dry-run`) prints
it without training.

What a step holds (per process; bytes of each item in `MemoryPlan.items`):

- resident the whole run: `weights` (the compute copy; a bf16 run on CPU without overlap holds its copy only
  while sampling), `masters` (bf16 runs: fp32 master weights; the optimizer then keeps fp32 grads and AdamW
  state), `optimizer` (AdamW's two states), `reference` (beta > 0: a frozen copy), and
  `runtime` (the process before any weight loads: on CPU its resident set now, measured once the weights'
  loader, transformers.modeling_utils, is imported; on CUDA the context, CUDA_CONTEXT_BYTES).
- while sampling: `kv_cache` (the embedded engine's static cache: 2 x layers x rows x kv heads x
  (prompt + completion) x head_dim, StaticDecoder.reserve; vLLM: its share), `graph_pool` (CUDA graphs'
  pool: one decode step's intermediates and each bucket's logits), `sampling` (one decode step: its
  activations, the logits and sample_next's working set, or the prefill's activations when larger),
  `packed_weights` (the engine's packed copy where static_decode.packs_by_default makes one: CPU, long generates).
- while updating: `grads` (one per trainable parameter: freed after each optimizer step, made again in the
  next update's backward), `activations` (the tensors one micro-batch's forward keeps for its backward, counted
  op by op below; with `gradient_checkpointing` each layer's input plus one layer recomputed) and `loss`
  (the fused loss: its logits chunk buffers, the fp32 lm_head gradient and the hidden-state gradient) and,
  with a tied head, `embedding_grad`: the embedding's dense gradient, made at the end of backward and summed
  with the head's (none under the shared-prompt forward, which adds the looked-up rows into the head's
  gradient). It comes after the activations are freed, yet adds to them: they stay in the allocator (glibc's
  heap under cpu_memory.keep_freed_memory, CUDA's cache) while a [V, H] buffer is mapped anew (bench/memory.py).
  The KV cache and graph pool stay across the update unless `kv_cache_release`; `overlap` samples during it.

peak = resident + max(sampling phase, update phase). Sizes are in bytes; GB in messages are 1e9 bytes.

Under torchrun (WORLD_SIZE > 1, or `dash-fast plan --world-size N`) the plan is per rank: each rank samples
and trains its share of the rows (rows / N; generation_batch_size and micro_batch_tokens are per rank
already). `parallel=ddp` replicates weights, grads and optimizer state on every rank and adds
`grad_allreduce`, the flat gradient buffer all_reduce_grads sums over the ranks (made after backward,
mapped anew while the freed activations stay in the allocator, as `embedding_grad`). `parallel=fsdp2`
shards `weights`, `masters`, `grads` and `optimizer` (1/N each) and adds what it gathers: while sampling
every unit at once (`gathered_sampling`: the full weights; distributed.gathered_params), while updating
the root unit (embeddings, final norm, head: held for the whole forward and backward, FSDPRoot) and
GATHERED_LAYERS decoder layers' worth (`gathered_update`), plus `optimizer_step`: its AdamW runs torch's foreach loop over
the DTensor shards (one process uses the fused kernel), whose temporaries hold a shard's worth (an estimate
that matches the measured peak of the ranks that do not save), and, on rank 0 only, the full weights and
optimizer state it gathers to write a checkpoint (`checkpoint_gather`; distributed.full_state_dict /
full_optimizer_state), a phase of its own: `peak` is then rank 0's and `other_ranks_peak` the others'.
On CPU the ranks of one host share its memory: the budget is the available memory / the local ranks, plus
the rank's own resident set (runtime/memory_budget.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from dash_fast.config import ConfigError, shared_prompt_requested
from dash_fast.engines.packed_gemm import is_silu_name
from dash_fast.engines.static_decode import packs_by_default
from dash_fast.models.decoder import is_post_norm
from dash_fast.models.mixed_precision import copy_unread_while_updating
from dash_fast.runtime.memory_budget import GB, device_budget, process_rss, resident_bytes

CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context + cuBLAS workspaces: outside torch's allocator, not in its counts
DENSE_BWD_BYTES = 512 * 2**20  # = dash_kernels.triton_kernels.DENSE_BWD_BYTES (the Triton dZ chunk budget)
LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral")  # the parameter formula; others are counted on "meta"
# FSDP2's update holds about five decoder layers' worth beyond the shards (measured on CPU, docs/memory.md):
# the running layer's unsharded parameters, the prefetched layer's all-gather buffer and parameters, and
# in backward the layer's unsharded gradients and their reduce-scatter copy
GATHERED_LAYERS = 5
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# Configs of the models in docs/memory.md's table (the fields the plan reads from each config.json)
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                         tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
                         tie_word_embeddings=True),
    "Qwen2.5-3B": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008,
                       tie_word_embeddings=True),
    "Qwen3-0.6B": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                       tie_word_embeddings=True),
    "Qwen3-1.7B": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                       tie_word_embeddings=True),
    "Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                         tie_word_embeddings=True),
    "Llama-3.2-3B": dict(model_type="llama", vocab_size=128256, hidden_size=3072, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
                         tie_word_embeddings=True),
}

ADVICE = {  # what to change when an item is the largest and nothing fits
    "weights": "a smaller model, or shard it over GPUs (torchrun, parallel=fsdp2)",
    "masters": "a smaller model, or shard it over GPUs (torchrun, parallel=fsdp2)",
    "grads": "a smaller model, or shard it over GPUs (torchrun, parallel=fsdp2)",
    "optimizer": "a smaller model, or shard it over GPUs (torchrun, parallel=fsdp2)",
    "reference": "beta=0 (no reference copy), or a smaller model",
    "runtime": "free host memory (other processes)",
    "kv_cache": "a smaller generation_batch_size or max_completion_tokens / max_prompt_tokens",
    "graph_pool": "a smaller generation_batch_size",
    "sampling": "a smaller generation_batch_size",
    "packed_weights": "max_completion_tokens below 64 (generates that short decode over the weights themselves)",
    "activations": "gradient_checkpointing=true or a smaller micro_batch_tokens",
    "loss": "a smaller micro_batch_tokens",
    "embedding_grad": "a smaller model (the vocabulary x hidden gradient)",
    "grad_allreduce": "parallel=fsdp2 (sharded gradients), or a smaller model",
    "gathered_sampling": "more ranks (parallel=fsdp2 gathers the full weights to sample), or a smaller model",
    "gathered_update": "more ranks, or a smaller model (the embeddings and head are gathered for the update)",
    "optimizer_step": "more ranks, or a smaller model",
    "checkpoint_gather": "more host memory on rank 0 (it gathers the full weights and optimizer state to write "
                         "each checkpoint)",
}


class MemoryPlanError(ConfigError):
    """Nothing the plan may choose fits the budget; the message is one line."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only LM that memory depends on."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    params: int  # every parameter, a tied head once
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    silu: bool = True  # the MLP's activation is SiLU (the packed engine then runs gate and up as two GEMMs)
    post_norm: bool = False  # OLMo2's branch-output norms (the embedded engine's oneDNN paths do not run them)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config or a config.json dict (the text config of a multimodal one)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        model_type = str(get("model_type", ""))
        shape = cls(model_type=model_type, vocab=int(get("vocab_size")), hidden=hidden,
                    layers=int(get("num_hidden_layers")), heads=heads,
                    kv_heads=int(get("num_key_value_heads") or heads),
                    head_dim=int(get("head_dim") or hidden // heads),
                    intermediate=int(get("intermediate_size") or 4 * hidden),
                    tied=bool(get("tie_word_embeddings", True)), params=0, qk_norm=model_type == "qwen3",
                    silu=is_silu_name(get("hidden_act") or get("hidden_activation") or "silu"),
                    post_norm=is_post_norm(model_type))
        if model_type in LLAMA_FAMILY:
            n = llama_params(shape, attention_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
                             o_bias=model_type != "qwen2" and bool(get("attention_bias", False)),
                             mlp_bias=bool(get("mlp_bias", False)))
        else:
            n = meta_params(config)
        return dataclasses.replace(shape, params=n)

    @classmethod
    def from_model(cls, model: Any) -> ModelShape:
        """From a loaded module: its config's dimensions, its own parameter count."""
        shape = cls.from_config(model.config)
        return dataclasses.replace(shape, params=sum(p.numel() for p in model.parameters()))


def llama_params(m: ModelShape, attention_bias: bool, o_bias: bool = False, mlp_bias: bool = False) -> int:
    """Parameters of a Llama-family decoder: embeddings, per layer q/k/v/o + gated MLP + two RMSNorms
    (+ Qwen3's q/k norms), the final norm, and the head unless tied. Qwen2 has q/k/v biases, no o bias."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    attn = m.hidden * (q + 2 * kv) + q * m.hidden + (q + 2 * kv if attention_bias else 0) + (m.hidden if o_bias else 0)
    mlp = 3 * m.hidden * m.intermediate + (2 * m.intermediate + m.hidden if mlp_bias else 0)
    layer = attn + mlp + 2 * m.hidden + (2 * m.head_dim if m.qk_norm else 0)
    return m.vocab * m.hidden * (1 if m.tied else 2) + m.layers * layer + m.hidden


def meta_params(config: Any) -> int:
    """Parameter count of any causal LM config, by building it on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class RunShape:
    """The run settings memory depends on (DashConfig's, resolved for one device)."""

    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # the weights' (compute) dtype
    master_weights: bool = False  # fp32 masters + fp32 grads and AdamW state beside bf16 compute weights
    rows: int = 256  # completions per step (prompts_per_step x group_size)
    generation_rows: int = 256  # rows per generate call
    group_size: int = 4  # rows per prompt (a generate call prefills each prompt once)
    prompt_tokens: int = 512
    completion_tokens: int = 2048
    micro_batch_tokens: int = 8192
    gradient_checkpointing: bool = False
    kv_cache_release: bool = False
    overlap: bool = False
    reference: bool = False  # beta > 0 without PEFT: a frozen copy of the weights
    engine: str = "torch"
    loss_impl: str = "fused"
    vllm_bytes: int = 0  # engine=vllm: what vLLM takes (its share of the GPU, or its CPU KV cache + weights)
    world: int = 1  # ranks under torchrun; the plan is per rank
    parallel: str = "ddp"  # with world > 1: ddp (replicated) | fsdp2 (sharded)
    train_forward: str = "hf"  # DashConfig.train_forward: the shared-prompt forward adds a tied embedding's rows
    # into the head's gradient (no dense embedding gradient); config.shared_prompt_requested says when it runs

    @classmethod
    def from_config(cls, cfg: Any, device: str, dtype: str, budget: int | None = None,
                    world: int | None = None) -> RunShape:
        """From a DashConfig whose `dtype` resolved to `dtype` on `device` ("cpu" / "cuda"); settings the
        config leaves to the plan (None) start at their fastest choice (fit may change them). `world`: the
        ranks (None: torchrun's WORLD_SIZE, else 1); each rank's rows are its share of the step's."""
        world = world_size() if world is None else world
        rows = max(1, cfg.prompts_per_step * cfg.group_size // world)
        vllm_bytes = 0
        if cfg.engine == "vllm":
            if device == "cuda":
                vllm_bytes = int(cfg.vllm_gpu_memory_utilization * (budget or 0))
            else:
                from dash_fast.engines.vllm_engine import CPU_KV_CACHE_BYTES

                vllm_bytes = cfg.vllm_kv_cache_bytes or CPU_KV_CACHE_BYTES
        masters = dtype in ("bfloat16", "float16") and getattr(cfg, "master_weights", True)
        return cls(device=device, dtype=dtype, master_weights=masters, rows=rows,
                   generation_rows=min(cfg.generation_batch_size or rows, rows), group_size=cfg.group_size,
                   prompt_tokens=cfg.max_prompt_tokens,
                   completion_tokens=cfg.max_completion_tokens, micro_batch_tokens=cfg.micro_batch_tokens,
                   gradient_checkpointing=bool(cfg.gradient_checkpointing),
                   kv_cache_release=bool(cfg.kv_cache_release), overlap=cfg.overlap,
                   reference=cfg.beta > 0, engine=cfg.engine, loss_impl=cfg.loss_impl, vllm_bytes=vllm_bytes,
                   world=world, parallel=getattr(cfg, "parallel", "ddp"), train_forward=cfg.train_forward)

    @property
    def rows_into_head_grad(self) -> bool:
        """Whether training runs the shared-prompt forward (unless the model cannot: its own forward, with the
        dense embedding gradient this then leaves out of the plan), never with sharded weights."""
        return shared_prompt_requested(self.train_forward, self.device) and not self.sharded

    @property
    def sharded(self) -> bool:
        """FSDP2 shards the weights and their state over the ranks (as the trainer: fsdp2 under torchrun)."""
        return self.parallel == "fsdp2" and self.world > 1


def world_size() -> int:
    """The ranks of this torchrun job (WORLD_SIZE), 1 outside torchrun."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


@dataclass
class MemoryPlan:
    """Named items in bytes, the phase that peaks, and the verdict against the budget."""

    model: ModelShape
    run: RunShape
    items: dict[str, int]
    peak: int
    peak_phase: str  # "sampling" | "update" | "overlap" | "checkpoint" (FSDP2's rank 0)
    budget: int | None
    budget_source: str
    choices: dict[str, Any] = field(default_factory=dict)  # config keys the plan set
    other_ranks_peak: int | None = None  # FSDP2: the peak of ranks other than 0 (which gathers to save)

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    def checkpointing_needed(self, tokens: int, row_tokens: int) -> bool:
        """Whether a micro-batch of `tokens` (padded) tokens in rows of up to `row_tokens` must checkpoint
        its layers to stay within the activations this plan reserved. The plan reserves them for the worst
        micro-batch the token budget allows; a step's real micro-batches are often far smaller (short
        prompts), and those run without the recomputation."""
        wb = DTYPE_BYTES[self.run.dtype]
        plain = activation_bytes(self.model, tokens, row_tokens, wb, False, self.run.device)
        return plain > self.items["activations"]

    @property
    def largest(self) -> str:
        return max(self.items, key=self.items.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {"items_bytes": dict(self.items), "peak_bytes": self.peak, "peak_phase": self.peak_phase,
                "other_ranks_peak_bytes": self.other_ranks_peak, "budget_bytes": self.budget, "budget_source": self.budget_source, "fits": self.fits,
                "choices": dict(self.choices), "model": dataclasses.asdict(self.model),
                "run": dataclasses.asdict(self.run)}

    def format(self) -> str:
        """Start-up lines: the peak against the budget, then every item in GB."""
        r, m = self.run, self.model
        budget = "no budget" if self.budget is None else f"budget {self.budget / GB:.1f} GB ({self.budget_source})"
        items = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.items.items() if v)
        settings = (f"gradient_checkpointing={r.gradient_checkpointing}, kv_cache_release={r.kv_cache_release}, "
                    f"generation rows={r.generation_rows}/{r.rows}")
        chosen = f"; chosen by the plan: {', '.join(f'{k}={v}' for k, v in self.choices.items())}" if self.choices \
            else ""
        ranks = "" if r.world == 1 else (f" per rank ({r.world} ranks, {r.parallel}: weights, grads and optimizer "
                                         f"state {'sharded' if r.sharded else 'replicated'}; {r.rows} rows each)")
        others = "" if self.other_ranks_peak is None else \
            f" on rank 0 (other ranks {self.other_ranks_peak / GB:.2f} GB)"
        return (f"memory plan{ranks}: peak {self.peak / GB:.2f} GB in {self.peak_phase}{others}, {budget}; "
                f"{m.model_type} "
                f"{m.params / 1e6:.1f}M params, {r.dtype}{' + fp32 masters' if r.master_weights else ''} on {r.device}\n"
                f"  items (GB): {items}\n  {settings}{chosen}")


# ---------------------------------------------------------------------------------------------- the items
def kv_cache_bytes(m: ModelShape, rows: int, length: int, dtype_bytes: int, device: str) -> int:
    """The embedded engine's static cache for `rows` rows of `length` tokens (StaticDecoder.reserve): K and V
    per layer, the key-valid mask and the RoPE table."""
    if device == "cuda":
        length = -(-length // 64) * 64
    kv = 2 * m.layers * rows * m.kv_heads * length * m.head_dim * dtype_bytes
    rope = length * 2 * m.head_dim * dtype_bytes  # cos and sin per position, in the cache's dtype (HF rotary_emb)
    return kv + rows * length + rope


def layer_activation_bytes(m: ModelShape, dtype_bytes: int) -> int:
    """Bytes one decoder layer's forward keeps for backward, per token. Each RMSNorm keeps its input, the
    normalised value and its output: 3H in fp32, and in bf16 the fp32 copy and normalised value plus two
    bf16 tensors, 12H bytes either way. Attention keeps q and k after RoPE and v (SDPA's inputs), SDPA's
    output and its contiguous copy (the o projection's input); the MLP its gate, act(gate), up and their
    product (4I); Qwen3 its q/k norms' three tensors each."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    return 2 * 12 * m.hidden + (3 * q + 2 * kv + 4 * m.intermediate) * dtype_bytes + (12 * (q + kv) if m.qk_norm else 0)


def activation_bytes(m: ModelShape, tokens: int, row_tokens: int, dtype_bytes: int, checkpointing: bool,
                     device: str) -> int:
    """One micro-batch's forward-for-backward tensors over `tokens` (padded) tokens in rows of up to
    `row_tokens`: every layer's activations plus one layer's gradients in backward; with checkpointing,
    each layer's input plus one layer recomputed with its gradients. Outside the layers: the final norm
    and the gathered hidden states. On CPU, SDPA with a mask keeps it as fp32 per layer ([rows, 1, T, T]:
    tokens x row_tokens elements); CUDA's kernels keep no mask (flash-attn) or the shared one."""
    per_layer = tokens * layer_activation_bytes(m, dtype_bytes)
    if device == "cpu":
        per_layer += tokens * row_tokens * 4
    inside = m.layers * tokens * m.hidden * dtype_bytes + 2 * per_layer if checkpointing else (m.layers + 1) * per_layer
    return inside + tokens * (12 + dtype_bytes) * m.hidden


def loss_bytes(m: ModelShape, tokens: int, dtype_bytes: int, device: str, loss_impl: str) -> int:
    """The loss of one micro-batch: fp32 gradients of the lm_head [V, H] and of the hidden states [N, H],
    plus its logits buffers: torch path (CPU) two chunk buffers (entropy on), Triton (CUDA) the dZ chunk;
    the naive reference materialises the fp32 logits, their softmax and gradient."""
    grads = (m.vocab * m.hidden + tokens * m.hidden) * 4
    if loss_impl == "naive":
        return grads + 3 * tokens * m.vocab * 4
    if device == "cuda" and loss_impl == "fused":
        return grads + min(DENSE_BWD_BYTES, tokens * m.vocab * dtype_bytes)
    from dash_kernels.torch_ref import chunk_rows

    return grads + 2 * min(tokens, chunk_rows(m.vocab, 4)) * m.vocab * 4


def step_elements(m: ModelShape) -> int:
    """Elements per token of a no-grad forward at its widest point: the residual, the normed input, q/k/v
    and attention output, and the MLP's gate and up (their product taken in place)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    return 3 * m.hidden + 2 * q + 2 * kv + 2 * m.intermediate


def sampling_bytes(m: ModelShape, rows: int, prompts: int, prompt_tokens: int, length: int, dtype_bytes: int,
                   device: str) -> int:
    """The larger of the prefill (each of `prompts` distinct prompts once) and one decode step: its activations,
    attention scores over the cache, the logits and sample_next's working set per row over the vocabulary
    (fp32 copy, log-probs, filtered log-probs, and the fp64 CDF with its cumsum: on CPU for a few rows at
    a time), plus the output tokens and log-probs of every row."""
    from dash_fast.engines.torch_engine import SAMPLE_ELEMENTS

    upcast = 0 if dtype_bytes == 4 else 4
    working = rows if device == "cuda" else min(rows, max(1, SAMPLE_ELEMENTS // m.vocab))
    vocab_work = rows * m.vocab * dtype_bytes + working * m.vocab * (upcast + 4 + 4 + 8 + 8)
    decode = rows * step_elements(m) * dtype_bytes + 2 * rows * m.heads * length * dtype_bytes + vocab_work
    prefill = prompts * prompt_tokens * step_elements(m) * dtype_bytes
    outputs = rows * (length - prompt_tokens) * (8 + 4)
    return max(decode, prefill) + outputs


def graph_pool_bytes(m: ModelShape, rows: int, dtype_bytes: int) -> int:
    """CUDA graphs' shared pool (an estimate, not measured here): the largest bucket's decode-step
    intermediates, and the static logits of every bucket (powers of two: under twice the largest)."""
    return rows * step_elements(m) * dtype_bytes + 2 * rows * m.vocab * dtype_bytes


def plan(m: ModelShape, r: RunShape, budget: int | None = None, budget_source: str = "",
         runtime: int = 0) -> MemoryPlan:
    """The memory of run `r` on model `m` (see the module docstring); `runtime`: the process's own bytes."""
    wb = DTYPE_BYTES[r.dtype]
    p = m.params
    state_bytes = 4 if r.master_weights else wb
    shard = -(-p // r.world) if r.sharded else p  # a rank's parameters: FSDP2 pads each to a multiple of world
    items = {
        "runtime": runtime,
        "weights": shard * wb,
        "masters": shard * 4 if r.master_weights else 0,
        "grads": shard * state_bytes,
        "optimizer": 2 * shard * state_bytes,
        "reference": p * wb if r.reference else 0,
    }
    length = r.prompt_tokens + r.completion_tokens
    if r.engine == "vllm":
        items["kv_cache"] = r.vllm_bytes + (p * 2 if r.device == "cpu" else 0)  # CPU: its own weights too
        items["graph_pool"] = 0
    else:
        items["kv_cache"] = kv_cache_bytes(m, r.generation_rows, length, wb, r.device)
        items["graph_pool"] = graph_pool_bytes(m, r.generation_rows, wb) if r.device == "cuda" else 0
    prompts = max(1, -(-r.generation_rows // r.group_size))
    items["sampling"] = sampling_bytes(m, r.generation_rows, prompts, r.prompt_tokens, length, wb, r.device)
    packs = r.engine == "torch" and packs_by_default(r.device, r.dtype, m.hidden, m.post_norm, r.completion_tokens)
    items["packed_weights"] = packed_weights_bytes(m, wb) if packs else 0
    tokens = max(r.micro_batch_tokens, length)  # a row alone may exceed the budget
    items["activations"] = activation_bytes(m, tokens, length, wb, r.gradient_checkpointing, r.device)
    items["loss"] = loss_bytes(m, tokens, wb, r.device, r.loss_impl)
    items["embedding_grad"] = m.vocab * m.hidden * wb if m.tied and not r.rows_into_head_grad else 0
    items["grad_allreduce"] = p * state_bytes if r.world > 1 and not r.sharded else 0
    items["gathered_sampling"] = p * wb if r.sharded else 0
    layer = layer_params(m)
    items["gathered_update"] = (p - m.layers * layer + min(GATHERED_LAYERS, m.layers) * layer) * wb if r.sharded else 0
    items["checkpoint_gather"] = p * (wb + (4 if r.master_weights else 0) + 2 * state_bytes) if r.sharded else 0
    items["optimizer_step"] = shard * state_bytes if r.sharded else 0

    copy = items["weights"] * (r.master_weights and not r.sharded  # then freed (MixedPrecision.release)
                               and copy_unread_while_updating(r.device, r.engine, r.overlap))
    resident = sum(items[k] for k in ("runtime", "weights", "masters", "optimizer", "reference")) - copy
    engine = items["kv_cache"] + items["graph_pool"]
    sample = engine + items["sampling"] + items["packed_weights"] + items["gathered_sampling"] + copy
    backward = items["loss"] + items["activations"] + items["embedding_grad"] + items["grad_allreduce"] + \
        items["gathered_update"] + items["optimizer_step"] + items["grads"]  # freed after each optimizer step
    update = backward + (0 if r.kv_cache_release and not r.overlap else engine)
    if r.overlap:
        phase, top = "overlap", sample + backward
    else:
        phase, top = ("sampling", sample) if sample >= update else ("update", update)
    save = items["checkpoint_gather"] + (0 if r.kv_cache_release else engine)
    if items["checkpoint_gather"] and save > top:  # rank 0's peak; the others' stays the step's
        return MemoryPlan(m, r, items, resident + save, "checkpoint", budget, budget_source,
                          other_ranks_peak=resident + top)
    return MemoryPlan(m, r, items, resident + top, phase, budget, budget_source)


def packed_weights_bytes(m: ModelShape, element_bytes: int) -> int:
    """The packed copy (in the weights' dtype): every layer's projections, the lm_head and the buffer fused weights
    are concatenated in (q|k|v; gate|up too when the activation is not SiLU)."""
    fused = max((m.heads + 2 * m.kv_heads) * m.head_dim, 0 if m.silu else 2 * m.intermediate) * m.hidden
    return element_bytes * (m.layers * layer_params(m) + m.vocab * m.hidden + fused)


def layer_params(m: ModelShape) -> int:
    """Parameters of one decoder layer: all but the embeddings, the untied head and the final norm, split
    evenly over the layers (exact for the Llama family, whose layers are alike)."""
    return max(0, m.params - m.vocab * m.hidden * (1 if m.tied else 2) - m.hidden) // max(1, m.layers)


def candidates(r: RunShape, free: set[str]) -> list[RunShape]:
    """Settings to try, cheapest first: as configured; then release the KV cache across the update (no
    extra compute; CUDA re-captures graphs per rollout); then gradient checkpointing (~1/3 more backward
    compute); then both; then, the generation halved (whole groups) with each of those. Only the keys in
    `free` (those the config leaves to the plan) change."""
    toggles = [(False, False), (True, False), (False, True), (True, True)]
    out, rows = [], r.generation_rows
    while True:
        for release, ckpt in toggles:
            if (release and ("kv_cache_release" not in free or r.overlap or r.engine != "torch")) or \
                    (ckpt and "gradient_checkpointing" not in free):
                continue
            out.append(dataclasses.replace(r, generation_rows=rows, kv_cache_release=release or r.kv_cache_release,
                                           gradient_checkpointing=ckpt or r.gradient_checkpointing))
        if "generation_batch_size" not in free or rows <= r.group_size:
            return out
        rows = max(r.group_size, (rows // 2) // r.group_size * r.group_size)


def fit(m: ModelShape, r: RunShape, budget: int | None, budget_source: str = "", runtime: int = 0,
        free: set[str] = frozenset()) -> MemoryPlan:
    """The first of `candidates` whose plan fits `budget`, with `choices` naming the config keys it set;
    MemoryPlanError (one line: the largest item and what to change) when none does."""
    first = plan(m, r, budget, budget_source, runtime)
    if first.fits:
        return first
    for c in candidates(r, set(free)):
        p = plan(m, c, budget, budget_source, runtime)
        if p.fits:
            p.choices = {k: getattr(c, a) for k, a in (("kv_cache_release", "kv_cache_release"),
                                                       ("gradient_checkpointing", "gradient_checkpointing"),
                                                       ("generation_batch_size", "generation_rows"))
                         if getattr(c, a) != getattr(r, a)}
            return p
    best = plan(m, candidates(r, set(free))[-1], budget, budget_source, runtime)  # the most frugal
    big = best.largest
    raise MemoryPlanError(
        f"memory plan: needs {best.peak / GB:.1f} GB, over the budget of {budget / GB:.1f} GB ({budget_source}) "
        f"even with {_settings(best.run)}; the largest item is {big} ({best.items[big] / GB:.1f} GB): "
        f"{ADVICE[big]} (or memory_budget_gb=N to override the budget)")


def _settings(r: RunShape) -> str:
    return (f"gradient_checkpointing={r.gradient_checkpointing}, kv_cache_release={r.kv_cache_release}, "
            f"{r.generation_rows} rows per generate call")


# ---------------------------------------------------------------------------------------------- a run's plan
def model_shape(model: Any) -> ModelShape:
    """The shape of `model`: a ModelShape, a loaded module, a KNOWN_MODELS name, a config.json file or a
    model directory."""
    if isinstance(model, ModelShape):
        return model
    if not isinstance(model, str):
        return ModelShape.from_model(model)
    if model in KNOWN_MODELS:
        return ModelShape.from_config(KNOWN_MODELS[model])
    if model.endswith(".json") and os.path.isfile(model):
        with open(model) as f:
            return ModelShape.from_config(json.load(f))
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(model))


FREE_KEYS = ("kv_cache_release", "gradient_checkpointing", "generation_batch_size")


def plan_run(model: Any, cfg: Any, device: str, dtype: str, runtime: int | None = None,
             world: int | None = None) -> MemoryPlan:
    """The fitted plan of DashConfig `cfg` on `model` (see model_shape) on `device`, per rank of `world`
    (None: torchrun's WORLD_SIZE; outside torchrun the ranks are taken to share this host): budget from
    device_budget, the settings cfg leaves as None chosen by `fit`. Raises MemoryPlanError."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    world = world_size() if world is None else world
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or world
    budget, source = device_budget(device, cfg.memory_budget_gb, local_ranks=local)
    if runtime is None and kind == "cpu":
        import transformers.modeling_utils  # noqa: F401 - every run loads its weights through it: ~0.17 GB of RSS
    if runtime is None:
        runtime = CUDA_CONTEXT_BYTES if kind == "cuda" else process_rss()
    shape = model_shape(model)
    run = RunShape.from_config(cfg, kind, dtype, budget, world)
    free = {k for k in FREE_KEYS if getattr(cfg, k) is None}
    return fit(shape, run, budget, source, runtime, free)


def apply_choices(cfg: Any, p: MemoryPlan) -> None:
    """Write the plan's settings into the config: its choices, and False for the keys it left off."""
    for key in ("kv_cache_release", "gradient_checkpointing"):
        if getattr(cfg, key) is None:
            setattr(cfg, key, p.choices.get(key, False))
    if "generation_batch_size" in p.choices:
        cfg.generation_batch_size = p.choices["generation_batch_size"]


def startup_plan(model: Any, cfg: Any, device: Any, dtype: str, verbose: bool = True) -> MemoryPlan | None:
    """The trainer's start-up plan, before the weights load (`dtype`: the weights' as the run trains them):
    fitted (MemoryPlanError when nothing fits), its choices written into `cfg`, printed when `verbose`. None when
    the model's config cannot be read as a decoder's (the run then goes on, with the settings left to the plan off)."""
    device = str(device)
    runtime = None
    if not isinstance(model, str) and not device.startswith("cuda"):  # a loaded module is resident already
        runtime = max(0, process_rss() - resident_bytes(model.parameters()))  # mapped weights page in later
    try:
        p = plan_run(model, cfg, device, dtype, runtime)
    except MemoryPlanError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        if verbose:
            print(f"dash-fast: memory plan unavailable ({type(e).__name__}: {e})")
        p = None
    if p is not None and verbose:
        print("dash-fast: " + p.format())
    if p is not None:
        apply_choices(cfg, p)
    else:
        for key in ("kv_cache_release", "gradient_checkpointing"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, False)
    return p


def enable_gradient_checkpointing(model: Any) -> None:
    """Checkpoint every decoder layer of the model's own forward (transformers'; non-reentrant, so frozen
    inputs such as a LoRA base's embeddings still pass gradients). The shared-prompt forward checkpoints
    its layers itself (shared_prompt_hidden)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
