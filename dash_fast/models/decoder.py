"""Llama-family decoder math shared by the sampler's forward (engines/static_decode.py) and the training
forward (models/shared_prompt.py): which models it serves, RMSNorm, embeddings, the attention and MLP halves of a
layer, grouped-query SDPA and the logit factor, read directly off a transformers model's own tensors.

Each piece reproduces the model's own forward (Hugging Face's op order and dtypes), so both callers match it;
a family's differences from Llama are in `Family`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STATIC_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "gemma", "granite", "phi3", "olmo2")
# why families users pick are not on the fast path (their own forward runs instead)
FALLBACK_REASONS = {
    "gemma2": "soft-capped attention logits and sliding-window layers",
    "gemma3_text": "sliding-window layers with their own RoPE, and pre/post-feedforward norms",
}

def static_unsupported(model: torch.nn.Module) -> str | None:
    """Why the static path cannot run this model (None when it can)."""
    if any(hasattr(m, "lora_A") or type(m).__module__.startswith("peft.") for m in model.modules()):
        return "PEFT adapter layers (the static forward reads the base weights)"  # their own forward instead
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind in FALLBACK_REASONS:
        return f"model_type {kind!r}: {FALLBACK_REASONS[kind]}"
    if kind not in STATIC_MODEL_TYPES:
        return f"model_type {kind!r} is not one of {STATIC_MODEL_TYPES}"
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
        return "no .model.layers / .model.rotary_emb"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "sliding-window layers"
    window = getattr(config, "sliding_window", None) if kind in ("mistral", "phi3") else None
    if window and window < getattr(config, "max_position_embeddings", math.inf):  # a window that can bind
        return "sliding-window attention"
    if getattr(decoder.rotary_emb, "rope_type", "default") in ("dynamic", "longrope"):
        return "length-dependent RoPE"
    if ((getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0
            or getattr(config, "partial_rotary_factor", 1.0) != 1.0):
        return "partial rotary embedding"
    if type(decoder.embed_tokens.weight).__name__ == "DTensor":
        return "sharded (FSDP2) parameters"
    return None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate_half: [x1, x2] -> [-x2, x1] over the last dimension (RoPE's rotation by 90 degrees)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's Llama/Qwen RMSNorm (normalise in float32, scale in the input dtype); one op in fp32."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def prompt_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, P, P] SDPA mask of left-padded prompts: causal over each row's valid keys `valid` [B, P];
    padding queries see themselves, so no softmax row is empty (no NaN)."""
    P = valid.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(P, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """SDPA of q [b, H, T, D] over k, v [b, H_kv, S, D] under a boolean `mask` [b or 1, 1, T or 1, S].

    With GQA the query heads are regrouped onto their KV head ([b, H_kv, g * T, D], the mask repeated per
    head of a group), so the attention runs at K/V's own head count: SDPA's enable_gqa with a mask falls
    back on CUDA to the math kernel, which expands K/V per query head."""
    b, H, T, D = q.shape
    n_kv = k.shape[1]
    if n_kv == H:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    g = H // n_kv
    if mask.shape[-2] != 1:  # a mask per query position: the same for every head of a group
        mb, mh, _, S = mask.shape
        mask = mask[:, :, None].expand(mb, mh, g, T, S).reshape(mb, mh, g * T, S)
    o = F.scaled_dot_product_attention(q.reshape(b, n_kv, g * T, D), k, v, attn_mask=mask, scale=scale)
    return o.view(b, H, T, D)


class Projections:
    """How the layer pieces below multiply by a layer's weights: `linear(x, module)` is x W^T + b and
    `linear_add(x, a, module, scale)` is x + scale * (a W^T + b), the residual add fused into the GEMM. This one
    is plain torch (the engine, no-grad passes); the training forward passes grad_accumulation.py's
    AccumulatingProjections, whose backward adds each weight's gradient into its `.grad` in place."""

    def linear(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        return F.linear(x, module.weight, module.bias)

    def linear_add(self, x: torch.Tensor, a: torch.Tensor, module: torch.nn.Module,
                   scale: float = 1.0) -> torch.Tensor:
        return add_scaled_bias(torch.addmm(x, a, module.weight.t(), alpha=scale), module.bias, scale)


PLAIN = Projections()


def add_scaled_bias(out: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """out + scale * bias (out itself without a bias): what `linear_add` adds after its fused GEMM."""
    if bias is None:
        return out
    return out + bias if scale == 1.0 else out + scale * bias


@dataclass(frozen=True)
class Family:
    """What a supported family changes in the Llama layer (the rest is read off its modules: attention
    scaling, q/k norms, fused projections, NoPE layers, RoPE scaling through its own rotary module).

    norm_offset: Gemma's RMSNorm scales by (1 + w). residual_scale: Granite's residual_multiplier on both
    branches. post_norm: OLMo2 normalises each branch's output (post_attention / post_feedforward
    layernorm) instead of its input, and its q/k norms span all heads."""

    norm_offset: float = 0.0
    residual_scale: float = 1.0
    post_norm: bool = False

    def weight(self, norm: torch.nn.Module) -> torch.Tensor:
        """The effective RMSNorm weight of `norm`."""
        return norm.weight + self.norm_offset if self.norm_offset else norm.weight


def family_of(model: torch.nn.Module) -> Family:
    cfg = model.config
    return Family(norm_offset=1.0 if cfg.model_type == "gemma" else 0.0,
                  residual_scale=float(getattr(cfg, "residual_multiplier", 1.0)),
                  post_norm=is_post_norm(cfg.model_type))


def is_post_norm(model_type: str) -> bool:
    """Whether the architecture normalises each branch's output instead of its input (OLMo2; Family.post_norm)."""
    return model_type == "olmo2"


def embed(decoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's input embeddings of flat `ids`, scaled as its own forward scales them (Gemma's
    embed_scale buffer, Granite's embedding_multiplier); the padding row gets no gradient, as there."""
    table = decoder.embed_tokens
    return scale_embeddings(decoder, F.embedding(ids, table.weight, table.padding_idx))


def scale_embeddings(decoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Looked-up embedding rows `x` scaled as the decoder's own forward scales them (see `embed`)."""
    table = decoder.embed_tokens
    if hasattr(table, "embed_scale"):
        return x * table.embed_scale.to(x.dtype)
    multiplier = getattr(decoder.config, "embedding_multiplier", None)
    return x if multiplier in (None, 1.0) else x * multiplier


# The pieces of a decoder layer. Each caller keeps its own RoPE and attention (the engine's KV cache, the
# training forward's prompt/completion split) and passes its RMSNorm: `rms_norm` here (the engine) or
# `shared_prompt._norm` (float64 kept for exact gradient tests).
def attention_input(x: torch.Tensor, layer: torch.nn.Module, fam: Family, norm, eps: float) -> torch.Tensor:
    """What the attention projections read: the normed residual stream (OLMo2: the stream itself)."""
    return x if fam.post_norm else norm(x, fam.weight(layer.input_layernorm), eps)


def qkv_projections(attn: torch.nn.Module, h: torch.Tensor, shape: tuple[int, ...], norm, eps: float,
                    fam: Family = Family(), proj: Projections = PLAIN):
    """q, k, v of the normed hidden `h` [N, hidden], viewed as [*shape, heads, head_dim]: separate or fused
    (Phi-3's qkv_proj) projections; q/k norms applied per head (Qwen3) or over all heads (OLMo2), with
    `norm`, the caller's RMSNorm, and `proj`'s GEMMs."""
    D = attn.head_dim
    if hasattr(attn, "qkv_proj"):  # Phi-3: [q | k | v] in one GEMM
        qkv = proj.linear(h, attn.qkv_proj)
        nq = attn.o_proj.weight.shape[1]
        q, k, v = qkv.split([nq, (qkv.shape[-1] - nq) // 2, (qkv.shape[-1] - nq) // 2], dim=-1)
    else:
        q = proj.linear(h, attn.q_proj)
        k = proj.linear(h, attn.k_proj)
        v = proj.linear(h, attn.v_proj)
    if hasattr(attn, "q_norm") and fam.post_norm:  # OLMo2: over the flat projection
        q, k = norm(q, fam.weight(attn.q_norm), eps), norm(k, fam.weight(attn.k_norm), eps)
    q, k, v = (t.reshape(*shape, -1, D) for t in (q, k, v))
    if hasattr(attn, "q_norm") and not fam.post_norm:  # Qwen3: per head
        q, k = norm(q, fam.weight(attn.q_norm), eps), norm(k, fam.weight(attn.k_norm), eps)
    return q, k, v


def attention_residual(x: torch.Tensor, o: torch.Tensor, layer: torch.nn.Module, fam: Family, norm,
                       eps: float, proj: Projections = PLAIN) -> torch.Tensor:
    """x + o_proj(o) (Granite: scaled by residual_multiplier; OLMo2: normed first)."""
    if fam.post_norm:
        out = proj.linear(o, layer.self_attn.o_proj)
        return x + norm(out, fam.weight(layer.post_attention_layernorm), eps)
    return proj.linear_add(x, o, layer.self_attn.o_proj, fam.residual_scale)


def mlp_block(x: torch.Tensor, layer: torch.nn.Module, fam: Family, norm, eps: float,
              proj: Projections = PLAIN) -> torch.Tensor:
    """The MLP half of a layer: x + mlp(norm(x)) (OLMo2: x + norm(mlp(x)))."""
    if fam.post_norm:
        return x + norm(_mlp(x, layer.mlp, proj), fam.weight(layer.post_feedforward_layernorm), eps)
    h = norm(x, fam.weight(layer.post_attention_layernorm), eps)
    return mlp_residual(x, h, layer.mlp, fam.residual_scale, proj)


def _gated(h: torch.Tensor, mlp: torch.nn.Module, proj: Projections) -> torch.Tensor:
    """act(gate(h)) * up(h), from separate or fused (Phi-3's gate_up_proj) projections. The product is
    taken in place when no gradient is recorded (sampling, log-prob passes): the same values, one buffer
    less."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = proj.linear(h, mlp.gate_up_proj).chunk(2, dim=-1)
        act = mlp.activation_fn(gate)
    else:
        gate = proj.linear(h, mlp.gate_proj)
        up = proj.linear(h, mlp.up_proj)
        act = mlp.act_fn(gate)
    return act * up if torch.is_grad_enabled() else act.mul_(up)


def _mlp(h: torch.Tensor, mlp: torch.nn.Module, proj: Projections) -> torch.Tensor:
    return proj.linear(_gated(h, mlp, proj), mlp.down_proj)


def mlp_residual(x: torch.Tensor, h: torch.Tensor, mlp: torch.nn.Module, scale: float = 1.0,
                 proj: Projections = PLAIN) -> torch.Tensor:
    """x + scale * down(act(gate(h)) * up(h)), the residual add fused into the down GEMM."""
    return proj.linear_add(x, _gated(h, mlp, proj), mlp.down_proj, scale)


def logit_multiplier(model) -> float:
    """The factor a model applies to `hidden @ lm_head.T` (Cohere's logit_scale, Granite's 1 / logits_scaling),
    folded into the hidden states so that the kernels' logits are the model's (1.0 for most models)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale, scaling = getattr(config, "logit_scale", None), getattr(config, "logits_scaling", None)
    return (1.0 if scale is None else float(scale)) / (1.0 if scaling is None else float(scaling))
