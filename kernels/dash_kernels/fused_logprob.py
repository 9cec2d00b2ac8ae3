"""fused_logprobs: no-grad token log-probs (old / ref / eval passes) without materialising logits."""

from __future__ import annotations

import torch

from .torch_ref import chunked_pg
from .utils import check_inputs, kernel_inputs, nvtx_range, resolve_backend


@torch.no_grad()
def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax((hidden @ weight.T + bias) / temperature)[targets], fp32 (fp64 for fp64 inputs).

    With return_entropy, also the per-token entropy of the same distribution.
    """
    check_inputs("fused_logprobs", hidden, weight, targets=targets)
    with nvtx_range("dash_kernels/logprobs", hidden.is_cuda):
        if resolve_backend(backend, hidden.device) == "triton":
            from .triton_kernels import triton_logprobs

            hidden, weight, bias = kernel_inputs(hidden, weight, bias)
            idx = torch.arange(hidden.shape[0], device=hidden.device)
            logp, _, ent = triton_logprobs(
                hidden, weight, bias, targets, idx, temperature=temperature, return_entropy=return_entropy
            )
        else:
            out = chunked_pg(
                hidden, weight, bias, targets, None, temperature=temperature,
                return_entropy=return_entropy, chunk_size=chunk_size,
            )
            logp, ent = out["logp"], out["entropy"]
    return (logp, ent) if return_entropy else logp
