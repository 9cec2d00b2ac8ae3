"""The training forward's projections, with each weight's gradient added into its `.grad` in place.

Autograd computes a linear layer's weight gradient dy^T x into a new buffer, and when the weight already has a
gradient (from the second micro-batch of an optimizer step on) AccumulateGrad adds that buffer into `.grad` and
frees it. On CPU each such buffer is a fresh mapping that the kernel zero-fills page by page (17 MB per MLP
weight at Qwen2.5-0.5B's shape, 1.4 GB over its layers per micro-batch), and the add is one more pass over it.
Here the backward runs one addmm_ into `.grad` instead: no buffer, no add (Megatron-LM's
gradient_accumulation_fusion does the same on GPU). Where `.grad` is None (the first micro-batch after
zero_grad(set_to_none=True)) it hands dW to autograd as a linear layer does.

Same values as F.linear / addmm forward and backward, up to the order of the float sum over micro-batches
(tests/unit/test_grad_accumulation.py; tests/integration/test_trainer.py holds accumulation equal to one
batch). Plain GEMMs instead (`Projections`) where the in-place add would be wrong or unseen: under autocast
(the GEMM would run in the compute dtype and `.grad` is the fp32 master's), for weights of another dtype than
the input, for sharded (DTensor) weights, and for weights with gradient hooks (they would not see a gradient
that never passes through autograd).
"""

from __future__ import annotations

import torch

from dash_fast.models.decoder import Projections, add_scaled_bias


class _ProjectionWithGradInPlace(torch.autograd.Function):
    """out = add + alpha * x @ weight^T (x [N, in], weight [out, in]; add: None, a bias [out] or a residual
    [N, out]). Backward: dx = alpha * dy @ weight, d(add) = dy (summed over rows for a bias), and alpha * dy^T x
    added into weight.grad when it exists (returned as dW otherwise)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None,
                alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.alpha, ctx.add_dim = alpha, None if add is None else add.dim()
        if add is None:
            out = torch.mm(x, weight.t())
            return out if alpha == 1.0 else out.mul_(alpha)
        return torch.addmm(add, x, weight.t(), alpha=alpha)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        alpha = ctx.alpha
        dx = dw = d_add = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy, weight)
            if alpha != 1.0:
                dx.mul_(alpha)
        if ctx.needs_input_grad[1]:
            if weight.grad is None:
                dw = torch.mm(dy.t(), x)
                if alpha != 1.0:
                    dw.mul_(alpha)
            else:
                weight.grad.addmm_(dy.t(), x, alpha=alpha)
        if ctx.needs_input_grad[2]:
            d_add = dy.sum(0) if ctx.add_dim == 1 else dy
        return dx, dw, d_add, None


class AccumulatingProjections(Projections):
    """`Projections` whose backward adds each weight's gradient into `.grad` in place (module docstring)."""

    @staticmethod
    def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the in-place path serves `x` @ `weight`^T here (else the plain GEMMs run)."""
        return (torch.is_grad_enabled() and weight.requires_grad and x.dtype == weight.dtype
                and type(weight.data) is torch.Tensor and not torch.is_autocast_enabled(x.device.type)
                and not weight._backward_hooks and not getattr(weight, "_post_accumulate_grad_hooks", None))

    def linear(self, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        weight = module.weight
        if not self.applies(x, weight):
            return super().linear(x, module)
        flat = x.reshape(-1, x.shape[-1])
        out = _ProjectionWithGradInPlace.apply(flat, weight, module.bias, 1.0)
        return out.view(*x.shape[:-1], weight.shape[0])

    def linear_add(self, x: torch.Tensor, a: torch.Tensor, module: torch.nn.Module,
                   scale: float = 1.0) -> torch.Tensor:
        weight = module.weight
        if not self.applies(a, weight) or x.dim() != 2 or a.dim() != 2:
            return super().linear_add(x, a, module, scale)
        return add_scaled_bias(_ProjectionWithGradInPlace.apply(a, weight, x, scale), module.bias, scale)


ACCUMULATING = AccumulatingProjections()
