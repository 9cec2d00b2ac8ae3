"""dash_kernels: fused lm_head + policy-gradient loss / log-prob ops (docs/design.md section 3)."""

from .fused_linear_pg import fused_linear_pg_loss
from .fused_logprob import fused_logprobs
from .torch_ref import logprobs_ref, pg_loss_ref

__all__ = ["fused_linear_pg_loss", "fused_logprobs", "logprobs_ref", "pg_loss_ref"]
