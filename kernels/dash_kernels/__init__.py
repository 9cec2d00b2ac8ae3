"""dash_kernels: fused lm_head + policy-gradient loss / log-prob ops (docs/design.md section 3)."""

from .fused_linear_pg import fused_linear_pg_loss
from .fused_logprob import fused_logprobs
from .torch_ref import logprobs_ref, pg_loss_ref
from .utils import IS_MODES, sampler_is_ratio

__all__ = ["IS_MODES", "fused_linear_pg_loss", "fused_logprobs", "logprobs_ref", "pg_loss_ref", "sampler_is_ratio"]
