"""oneDNN GEMMs for the static decoder's CPU decode (fp32; bf16 where oneDNN has bf16 GEMMs on the CPU).

At decode a GEMM has m = rows in the batch (16-256): there MKL's sgemm over a row-major weight reaches a
fraction of its large-m rate on CPU. oneDNN does better over the parameters as they are ("onednn": no
copy) and better still over weights reordered into its blocked layout ("packed"). The packed copy is built
at the start of each generate from the live parameters (so an optimizer step's in-place update is picked up
at the next call) and freed at its end: one more copy of the weights while sampling (it raises a trainer's
peak RSS when sampling is the peak) and its first-touch cost per generate, which pays back only over
enough decode steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

GEMM_PATHS = ("auto", "plain", "onednn", "packed")


def packed_gemm_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why oneDNN's packed linear cannot run here (None when it can): on CPU for fp32 weights, and for bf16
    weights where oneDNN has bf16 GEMMs on this CPU (AVX512-BF16 / AMX: at 16 rows of the Qwen2.5-0.5B shape
    the packed bf16 GEMMs ran 1.7-1.8x F.linear's rate, with the same outputs), where this torch build has it
    (checked once per dtype, on a small product against F.linear)."""
    if device.type != "cpu":
        return f"{device.type} device"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{dtype} weights"
    if not torch.backends.mkldnn.is_available():
        return "torch built without oneDNN"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "no oneDNN bf16 GEMMs on this CPU"
    return _packed_linear_disagrees(dtype)


@functools.cache
def _packed_linear_disagrees(dtype: torch.dtype) -> str | None:
    """Why oneDNN's packed linear fails or disagrees with F.linear on a small product in `dtype` (None: it
    agrees, to fp32 rounding or to one bf16 rounding of the result)."""
    try:
        w = torch.linspace(-1, 1, 24, dtype=dtype).view(6, 4)
        x = torch.linspace(-1, 2, 12, dtype=dtype).view(3, 4)
        out = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None, "none",
                                                 [], "")
    except (RuntimeError, AttributeError) as e:
        return f"oneDNN packed linear unavailable ({type(e).__name__})"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if not torch.allclose(out.float(), F.linear(x, w).float(), atol=tol, rtol=tol):
        return "oneDNN packed linear disagrees with F.linear"
    return None


class ConcatBuffer:
    """`torch.cat` of weights [out_i, in] along `out` into one buffer reused from call to call. A fused weight
    is only the reorder's input, so the largest one's worth of memory serves every layer: a fresh tensor per
    layer would be memory newly mapped each time, whose first-touch page faults cost more than the copy."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def __call__(self, weights: list[torch.Tensor]) -> torch.Tensor:
        first = weights[0]
        numel = sum(w.numel() for w in weights)
        if self.buffer.numel() < numel or self.buffer.dtype != first.dtype or self.buffer.device != first.device:
            self.buffer = torch.empty(numel, dtype=first.dtype, device=first.device)
        return torch.cat(weights, out=self.buffer[:numel].view(-1, first.shape[1]))


class PackedLinear:
    """One projection on oneDNN's linear. `reorder=True`: its weight [out, in] reordered into oneDNN's blocked
    layout for `rows`-row inputs (any row count runs; `rows` picks the layout), several weights (q|k|v,
    gate|up) concatenated along `out` (by `concat`, e.g. a ConcatBuffer) into one GEMM; the reorder copies,
    so the concatenation may be overwritten afterwards. `reorder=False`: oneDNN over the parameters as they
    are (no copy, one GEMM per weight, outputs concatenated)."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], rows: int,
                 concat: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat, reorder: bool = True,
                 activation: str = "none") -> None:
        self.sizes = [t.shape[0] for t in weights]
        self.activation = activation  # oneDNN's post-op on the output ("swish" is SiLU), fused into the GEMM
        if not reorder:
            self.weights, self.biases = weights, biases
            return
        w = weights[0] if len(weights) == 1 else concat(weights)
        self.weights = [torch.ops.mkldnn._reorder_linear_weight(w, rows)]
        if all(b is None for b in biases):
            self.biases = [None]
        else:
            self.biases = [torch.cat([b if b is not None else w.new_zeros(n) for b, n in zip(biases, self.sizes)])]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = [torch.ops.mkldnn._linear_pointwise(x, w, b, self.activation, [], "")
               for w, b in zip(self.weights, self.biases)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)

    def add(self, x: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """x + scale * linear(a), the add fused into the GEMM when scale is 1 (as `linear_add`)."""
        if scale == 1.0 and len(self.weights) == 1 and self.activation == "none":
            return torch.ops.mkldnn._linear_pointwise.binary(a, x, self.weights[0], self.biases[0], "add")
        return torch.add(x, self(a), alpha=scale)

    def mul(self, a: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """linear(a) * other, the product fused into the GEMM (one weight, no activation)."""
        assert len(self.weights) == 1 and self.activation == "none"
        return torch.ops.mkldnn._linear_pointwise.binary(a, other, self.weights[0], self.biases[0], "mul")


def is_silu(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether an MLP's activation is SiLU (torch's module or transformers' "silu" one), which oneDNN fuses."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def is_silu_name(hidden_act: str) -> bool:
    """is_silu of the activation transformers builds for a config's `hidden_act` (the memory plan's question,
    asked without the model)."""
    from transformers.activations import ACT2FN

    return hidden_act in ACT2FN and is_silu(ACT2FN[hidden_act])


@dataclass
class PackedLayer:
    """A decoder layer's GEMMs: q|k|v in one, o, the MLP's input projections, down.

    With SiLU the MLP runs as two GEMMs with their elementwise work fused in (`gate` with oneDNN's SiLU post-op,
    `up` multiplying by it), not as one gate|up GEMM followed by SiLU and a product over [rows, 2 x intermediate]:
    at the 0.5B shape's 16-row decode the fused pair measured 1.3 ms per step (24 layers) faster. Other
    activations keep `gate_up` (gate and up in one GEMM)."""

    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear | None
    gate: PackedLinear | None
    up: PackedLinear | None
    down: PackedLinear
    act: Callable[[torch.Tensor], torch.Tensor]

    def mlp_residual(self, x: torch.Tensor, h: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """x + scale * down(act(gate(h)) * up(h)): the MLP half of the layer on its normalised input `h`."""
        if self.gate_up is None:
            return self.down.add(x, self.up.mul(h, self.gate(h)), scale)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down.add(x, self.act(gate).mul_(up), scale)

    @classmethod
    def of(cls, layer: torch.nn.Module, rows: int,
           concat: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat, reorder: bool = True) -> PackedLayer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]

        def pack(mods, activation="none"):
            return PackedLinear([m.weight for m in mods], [m.bias for m in mods], rows, concat, reorder, activation)

        fused = hasattr(mlp, "gate_up_proj")
        act = mlp.activation_fn if fused else mlp.act_fn
        if fused:
            gate, up = (SimpleNamespace(weight=w, bias=b) for w, b in zip(
                mlp.gate_up_proj.weight.chunk(2), (None, None) if mlp.gate_up_proj.bias is None
                else mlp.gate_up_proj.bias.chunk(2)))
        else:
            gate, up = mlp.gate_proj, mlp.up_proj
        if is_silu(act):
            return cls(pack(qkv), pack([attn.o_proj]), None, pack([gate], "swish"), pack([up]),
                       pack([mlp.down_proj]), act)
        return cls(pack(qkv), pack([attn.o_proj]), pack([gate, up]), None, None, pack([mlp.down_proj]), act)
