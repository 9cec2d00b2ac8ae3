"""The training forward's projections (dash_fast/models/grad_accumulation.py): the values and gradients of the
plain GEMMs, each weight's gradient added into its existing `.grad` by one addmm_ (no dW buffer, no add), and
the plain path wherever the in-place add would be wrong or unseen."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dash_fast.models.decoder import PLAIN
from dash_fast.models.grad_accumulation import ACCUMULATING

N, IN, OUT = 5, 7, 6


class OpLog(TorchDispatchMode):
    """The aten ops run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def layer(bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(IN, OUT, bias=bias).double()


def run(proj, op: str, module: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor, scale: float):
    out = proj.linear(x, module) if op == "linear" else proj.linear_add(residual, x, module, scale)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out


CASES = [("linear", False, 1.0), ("linear", True, 1.0), ("linear_add", False, 1.0), ("linear_add", True, 0.5)]


@pytest.mark.parametrize("op,bias,scale", CASES)
@pytest.mark.parametrize("grad_before", [False, True])
def test_values_and_gradients_are_the_plain_gemms(op, bias, scale, grad_before):
    """float64: output, and the gradients of input, weight, bias and residual, against the plain projections;
    with `.grad` None (dW handed to autograd) and already holding a gradient (added in place)."""
    results = []
    for proj in (ACCUMULATING, PLAIN):
        module = layer(bias)
        if grad_before:
            module.weight.grad = torch.full_like(module.weight, 0.25)
            if bias:
                module.bias.grad = torch.full_like(module.bias, -0.5)
        x = torch.randn(N, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        residual = torch.randn(N, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        out = run(proj, op, module, x, residual, scale)
        results.append([out, x.grad, module.weight.grad, None if not bias else module.bias.grad,
                        residual.grad if op == "linear_add" else None])
    for mine, plain in zip(*results):
        if plain is None:
            assert mine is None
        else:
            torch.testing.assert_close(mine, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op,bias,scale", CASES)
def test_an_existing_gradient_takes_the_weights_gradient_by_one_addmm(op, bias, scale):
    """With `.grad` there, backward runs addmm_ into it: no [out, in] product of its own and no add (what
    autograd's AccumulateGrad would do), and the buffer is the same tensor afterwards."""
    module = layer(bias)
    module.weight.grad = torch.zeros_like(module.weight)
    before = module.weight.grad
    x = torch.randn(N, IN, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(N, OUT, dtype=torch.float64, requires_grad=True)
    out = ACCUMULATING.linear(x, module) if op == "linear" else ACCUMULATING.linear_add(residual, x, module, scale)
    with OpLog() as log:
        out.sum().backward()
    assert module.weight.grad is before
    assert log.ops.count("addmm_") == 1
    assert log.ops.count("mm") == 1  # dx only
    assert "add_" not in log.ops


def test_without_a_gradient_yet_dw_goes_to_autograd():
    module = layer(False)
    x = torch.randn(N, IN, dtype=torch.float64, requires_grad=True)
    with OpLog() as log:
        ACCUMULATING.linear(x, module).sum().backward()
    assert module.weight.grad is not None and "addmm_" not in log.ops


def test_plain_gemms_where_the_in_place_add_would_be_wrong_or_unseen():
    """Under autocast (the GEMM's dtype is not .grad's), for an input of another dtype, with a hook on the
    weight (it must see the gradient) and with no gradient recorded: the plain path, the same values."""
    module = layer(False).float()
    x = torch.randn(N, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ACCUMULATING.linear(x, module)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert module.weight.grad is not None and module.weight.grad.dtype == torch.float32

    seen = []
    module.weight.register_hook(lambda g: seen.append(g.clone()))
    module.weight.grad = torch.zeros_like(module.weight)
    ACCUMULATING.linear(x, module).sum().backward()
    assert len(seen) == 1 and torch.equal(module.weight.grad, seen[0])

    assert not ACCUMULATING.applies(x.double(), module.weight)
    with torch.no_grad():
        assert not ACCUMULATING.applies(x, module.weight)
    assert ACCUMULATING.applies(x, layer(False).float().weight)
