"""dash_kernels on CPU: the chunked torch path against the naive reference (docs/design.md section 3), and
against Liger's LigerFusedLinearGRPOLoss. The Triton kernels are in test_kernels_triton.py."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import F64, assert_matches, dk, fused_torch, kept_mask, make_inputs, run

CASES = {
    # name: (make_inputs kwargs, op kwargs)
    "on_policy": ({}, {}),
    "on_policy_entropy_no_bias": ({"bias": False}, {"return_entropy": True}),
    "off_inside": ({"off_policy": "inside"}, {}),
    "off_outside": ({"off_policy": "outside"}, {}),
    "off_outside_asym_eps": ({"off_policy": "outside"}, {"eps_low": 0.1, "eps_high": 0.28}),
    "beta": ({"off_policy": "inside"}, {"beta": 0.04}),
    "beta_outside_tau": ({"off_policy": "outside"}, {"beta": 0.1, "tau": 0.1}),
    "on_policy_beta": ({}, {"beta": 0.2, "return_entropy": True}),
    "tau0": ({}, {"tau": 0.0}),
    "tau01": ({"off_policy": "outside"}, {"tau": 0.1}),
    "temperature": ({"temperature": 0.7, "off_policy": "outside"}, {"temperature": 0.7, "beta": 0.05,
                                                                    "return_entropy": True}),
    "temperature_hot_tau": ({"temperature": 1.6}, {"temperature": 1.6, "tau": 0.1}),
    "seq_mean_token_mean": ({"agg": "seq-mean-token-mean", "off_policy": "inside"}, {"beta": 0.1}),
    "dr_grpo": ({"agg": "dr_grpo", "off_policy": "outside"}, {"tau": 0.0}),
    "n1": ({"n": 1, "rows": 1}, {}),
    "v_odd_h_odd": ({"v": 1013, "h": 19, "n": 29}, {"return_entropy": True}),
}


@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp64(case, chunk_size):
    inp_kw, kw = CASES[case]
    inp = make_inputs(**inp_kw)
    st = assert_matches(inp, kw, fn_kw={"chunk_size": chunk_size})
    if inp_kw.get("off_policy") == "outside" and "tau" not in kw:
        assert 0.0 < float(st["clip_fraction"]) < 1.0  # the case really exercises both regimes


@pytest.mark.parametrize("case", ["on_policy", "off_outside", "beta_outside_tau", "temperature"])
def test_matches_reference_fp32(case):
    inp_kw, kw = CASES[case]
    inp = make_inputs(dtype=torch.float32, **inp_kw)
    assert_matches(inp, kw, atol=2e-5, rtol=1e-4, fn_kw={"chunk_size": 16})


def test_grad_output_is_honoured():
    inp = make_inputs(off_policy="outside")
    assert_matches(inp, {"beta": 0.1}, grad_scale=2.5)
    _, _, g1 = run(fused_torch, inp, 1.0, beta=0.1)
    _, _, g2 = run(fused_torch, inp, -2.5, beta=0.1)
    for k in g1:
        torch.testing.assert_close(g2[k], -2.5 * g1[k])


def test_all_rows_filtered():
    inp = make_inputs(off_policy="outside")
    loss, st, g = run(fused_torch, inp, tau=10.0, beta=0.1)
    assert float(loss) == 0.0 and st["kept_tokens"] == 0
    assert all(float(t.abs().sum()) == 0.0 for t in g.values())
    assert float(st["clip_fraction"]) == 0.0 and float(st["kl_mean"]) == 0.0
    inp["token_weights"] = torch.zeros_like(inp["token_weights"])
    loss, st, g = run(fused_torch, inp)
    assert float(loss) == 0.0 and all(float(t.abs().sum()) == 0.0 for t in g.values())


def test_all_clipped_gives_zero_grad():
    """beta = 0 and every token clipped: g = 0 everywhere, the gradient matmuls are skipped."""
    inp = make_inputs()
    adv = inp["advantages"]
    lp = dk.logprobs_ref(inp["hidden"], inp["weight"], inp["bias"], inp["targets"])
    inp["old_logp"] = torch.where(adv > 0, lp - 1.0, lp + 1.0)  # rho = e (A > 0) or 1/e (A < 0)
    loss, st, g = run(fused_torch, inp, chunk_size=8)
    keep = kept_mask(inp, None) & (adv != 0)
    assert float(loss) != 0.0
    assert float(st["clip_fraction"]) == pytest.approx(float(keep.sum()) / float(kept_mask(inp, None).sum()))
    assert all(float(t.abs().sum()) == 0.0 for t in g.values())
    assert_matches(inp, {}, fn_kw={"chunk_size": 8})


def test_filtered_tokens_drop_kl_term():
    """A token with |A| <= tau contributes nothing, KL included, even with beta > 0."""
    inp = make_inputs(off_policy="inside")
    tau = 0.1
    keep = kept_mask(inp, tau)
    assert 0 < int(keep.sum()) < int((inp["token_weights"] != 0).sum())
    loss, _, g = run(fused_torch, inp, tau=tau, beta=0.5)
    sub = {k: (v if k == "weight" or k == "bias" or v is None else v[keep]) for k, v in inp.items()}
    sub_loss, _, sub_g = run(dk.pg_loss_ref, sub, beta=0.5)  # only the kept tokens, no filter
    torch.testing.assert_close(loss, sub_loss)
    torch.testing.assert_close(g["weight"], sub_g["weight"])
    torch.testing.assert_close(g["hidden"][keep], sub_g["hidden"])
    assert float(g["hidden"][~keep].abs().sum()) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logps_on_dropped_tokens_never_leak(bad):
    inp = make_inputs(off_policy="inside")
    tau = 0.1
    dropped = ~kept_mask(inp, tau)  # both weight-0 tokens and filtered rows
    assert bool((inp["token_weights"] == 0).any()) and bool((inp["advantages"].abs() <= tau).any())
    clean_loss, _, clean_g = run(fused_torch, inp, tau=tau, beta=0.1)
    inp["old_logp"] = inp["old_logp"].masked_fill(dropped, bad)
    inp["ref_logp"] = inp["ref_logp"].masked_fill(dropped, bad)
    for fn in (fused_torch, dk.pg_loss_ref):
        loss, st, g = run(fn, inp, tau=tau, beta=0.1)
        assert torch.isfinite(loss) and torch.isfinite(st["kl_mean"]) and torch.isfinite(st["clip_fraction"])
        torch.testing.assert_close(loss, clean_loss)
        for k in g:
            assert bool(torch.isfinite(g[k]).all())
            torch.testing.assert_close(g[k], clean_g[k])


def test_beta_without_ref_raises():
    inp = make_inputs()
    inp["ref_logp"] = None
    for fn in (fused_torch, dk.pg_loss_ref):
        with pytest.raises(ValueError, match="ref_logp"):
            run(fn, inp, beta=0.1)
    run(fused_torch, inp, beta=0.0)  # beta = 0: ref_logp is not needed


def test_inputs_not_modified_in_place():
    inp = make_inputs(off_policy="outside")
    for k in ("hidden", "weight", "bias"):
        inp[k].requires_grad_(True)
    before = {k: v.detach().clone() for k, v in inp.items() if v is not None}
    loss, _ = dk.fused_linear_pg_loss(*inp.values(), beta=0.1, tau=0.1, temperature=0.8, backend="torch",
                                      chunk_size=8, return_entropy=True)
    loss.backward()
    for k, v in before.items():
        assert torch.equal(inp[k].detach(), v), k


def test_non_contiguous_inputs():
    inp = make_inputs(off_policy="outside")
    n, h = inp["hidden"].shape
    v = inp["weight"].shape[0]
    nc = dict(inp)
    nc["hidden"] = torch.randn(h, 2 * n, dtype=F64)[:, ::2].t().copy_(inp["hidden"])  # strides (2, 2n)
    nc["weight"] = torch.empty(h, v, dtype=F64).t().copy_(inp["weight"])  # column-major
    nc["bias"] = torch.empty(2 * v, dtype=F64)[::2].copy_(inp["bias"])
    for k in ("targets", "advantages", "token_weights", "old_logp", "ref_logp"):
        nc[k] = torch.stack([inp[k], inp[k]], 1)[:, 1]
    assert not any(nc[k].is_contiguous() for k in ("hidden", "weight", "bias", "advantages", "targets"))
    kw = {"beta": 0.1, "tau": 0.1, "return_entropy": True}
    ref_loss, _, ref_g = run(dk.pg_loss_ref, inp, **kw)
    loss, _, g = run(fused_torch, nc, **kw, chunk_size=8)
    torch.testing.assert_close(loss, ref_loss)
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k])


def test_tied_embedding_grads_accumulate():
    """weight is the input embedding (a leaf shared with the lookup): both paths add into one .grad."""
    n, h, v = 23, 16, 97
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, v, (n,), generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    proj = torch.randn(h, h, dtype=F64, generator=g) / h**0.5
    adv = torch.randn(n, dtype=F64, generator=g)
    tw = torch.full((n,), 1.0 / n, dtype=F64)
    grads = []
    for fn in (dk.pg_loss_ref, fused_torch):
        emb = torch.nn.Embedding(v, h, dtype=F64)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(v, h, dtype=F64, generator=torch.Generator().manual_seed(4)))
        hidden = torch.tanh(emb(ids) @ proj)
        loss, _ = fn(hidden, emb.weight, None, targets, adv, tw, None, None, tau=0.2)
        loss.backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("case", ["on_policy", "beta_outside_tau", "temperature", "tau01"])
def test_weight_gradient_added_into_an_existing_gradient(case):
    """grad_weight_into=weight.grad (gradient accumulation): the forward adds the weight's gradient into that
    tensor and backward returns none for the weight, so .grad ends as before + the reference gradient, the same
    tensor; the other gradients are the reference's."""
    inp_kw, kw = CASES[case]
    inp = make_inputs(**inp_kw)
    _, _, ref = run(dk.pg_loss_ref, inp, **kw)
    leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")}
    start = torch.randn_like(inp["weight"])
    leaves["weight"].grad = start.clone()
    into = leaves["weight"].grad
    loss, _ = fused_torch(leaves["hidden"], leaves["weight"], leaves["bias"], inp["targets"], inp["advantages"],
                          inp["token_weights"], inp["old_logp"], inp["ref_logp"], grad_weight_into=into, **kw)
    torch.testing.assert_close(into, start + ref["weight"])  # added during the forward
    loss.backward()
    assert leaves["weight"].grad is into
    torch.testing.assert_close(into, start + ref["weight"])  # and not again by backward
    for k in ("hidden", "bias"):
        torch.testing.assert_close(leaves[k].grad, ref[k])


def test_weight_gradient_into_needs_backward_from_the_loss():
    inp = make_inputs()
    weight = inp["weight"].clone().requires_grad_(True)
    weight.grad = torch.zeros_like(weight)
    loss, _ = fused_torch(inp["hidden"], weight, None, inp["targets"], inp["advantages"], inp["token_weights"],
                          None, None, grad_weight_into=weight.grad)
    with pytest.raises(RuntimeError, match="backward must start at the loss itself"):
        (2.0 * loss).backward()


def test_weight_gradient_into_of_another_dtype_is_returned_by_backward():
    """An fp32 buffer beside a float64 computation is not written: backward returns the gradient as usual."""
    inp = make_inputs()
    weight = inp["weight"].clone().requires_grad_(True)
    into = torch.zeros_like(weight, dtype=torch.float32)
    loss, _ = fused_torch(inp["hidden"], weight, None, inp["targets"], inp["advantages"], inp["token_weights"],
                          None, None, grad_weight_into=into)
    loss.backward()
    assert into.abs().sum() == 0 and weight.grad is not None and weight.grad.abs().sum() > 0


def test_frozen_weight_and_bias():
    inp = make_inputs()
    hidden = inp["hidden"].clone().requires_grad_(True)
    loss, _ = dk.fused_linear_pg_loss(hidden, inp["weight"], inp["bias"], inp["targets"], inp["advantages"],
                                      inp["token_weights"], backend="torch")
    loss.backward()
    ref_h = inp["hidden"].clone().requires_grad_(True)
    ref_loss, _ = dk.pg_loss_ref(ref_h, inp["weight"], inp["bias"], inp["targets"], inp["advantages"],
                                 inp["token_weights"])
    ref_loss.backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad)


def test_no_grad_forward_and_stats_detached():
    inp = make_inputs(off_policy="outside")
    with torch.no_grad():
        loss, st = dk.fused_linear_pg_loss(*inp.values(), beta=0.1, backend="torch", return_entropy=True)
    ref_loss, ref_st = dk.pg_loss_ref(*inp.values(), beta=0.1)
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(st["clip_fraction"], ref_st["clip_fraction"])
    inp["hidden"].requires_grad_(True)
    _, st = dk.fused_linear_pg_loss(*inp.values(), beta=0.1, backend="torch", return_entropy=True)
    assert not any(t.requires_grad for t in (st["logp"], st["clip_fraction"], st["kl_mean"], st["entropy"]))


def test_no_grad_forward_skips_gradient_work(monkeypatch):
    """Under no_grad the torch path must not compute the gradient it would otherwise fold into the
    forward (needs_input_grad alone does not see the grad mode)."""
    import dash_kernels.fused_linear_pg as flp

    seen = []
    real = flp.chunked_pg
    monkeypatch.setattr(flp, "chunked_pg", lambda *a, **kw: (seen.append(kw), real(*a, **kw))[1])
    inp = make_inputs(off_policy="outside")
    inp["hidden"].requires_grad_(True)
    with torch.no_grad():
        dk.fused_linear_pg_loss(*inp.values(), backend="torch")
    dk.fused_linear_pg_loss(*inp.values(), backend="torch")
    flags = [(kw["need_grad_hidden"], kw["need_grad_weight"]) for kw in seen]
    assert flags == [(False, False), (True, False)]


def test_backend_argument():
    """`auto` is Triton on a CUDA device and the torch path elsewhere (checked on device objects: no GPU needed;
    comparing auto with torch on CPU would be the same call twice)."""
    from dash_kernels.utils import resolve_backend

    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cuda", 0)) == "torch"  # an explicit choice is kept
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    inp = make_inputs(n=8, rows=2)
    with pytest.raises(ValueError, match="backend"):
        dk.fused_linear_pg_loss(*inp.values(), backend="cuda")
    with pytest.raises(ValueError, match="shape"):
        dk.fused_linear_pg_loss(*list(inp.values())[:4], inp["advantages"][:-1], inp["token_weights"])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("temperature,bias", [(1.0, True), (0.6, False)])
def test_fused_logprobs(dtype, temperature, bias):
    inp = make_inputs(n=41, v=517, dtype=dtype, bias=bias)
    args = (inp["hidden"], inp["weight"], inp["bias"], inp["targets"])
    ref_lp, ref_ent = dk.logprobs_ref(*args, temperature=temperature, return_entropy=True)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == F64 else {"atol": 1e-5, "rtol": 1e-5}
    for chunk in (None, 7):
        lp = dk.fused_logprobs(*args, temperature=temperature, backend="torch", chunk_size=chunk)
        torch.testing.assert_close(lp, ref_lp, **tol)
        lp, ent = dk.fused_logprobs(*args, temperature=temperature, return_entropy=True, chunk_size=chunk)
        torch.testing.assert_close(lp, ref_lp, **tol)
        torch.testing.assert_close(ent, ref_ent, **tol)
    hidden = inp["hidden"].clone().requires_grad_(True)
    assert not dk.fused_logprobs(hidden, *args[1:]).requires_grad  # no-grad op


def test_bf16_inputs_cpu():
    inp = make_inputs(dtype=torch.bfloat16, off_policy="inside")
    inp32 = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in inp.items()}
    loss, st, g = run(fused_torch, inp, beta=0.1)
    ref_loss, _, ref_g = run(dk.pg_loss_ref, inp32, beta=0.1)
    assert loss.dtype == torch.float32 and g["hidden"].dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-3)
    for k in g:
        torch.testing.assert_close(g[k].float(), ref_g[k], atol=1e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- Liger


def _liger_or_skip():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"liger_kernel not importable: {e!r}")
    return LigerFusedLinearGRPOLoss


@pytest.mark.parametrize("off_policy,beta", [(None, 0.0), ("outside", 0.0), ("outside", 0.04)])
def test_matches_liger_grpo(off_policy, beta):
    """Liger's GRPO loss in its own [B, T] layout, loss_type="dapo" (sum / total mask tokens) equals
    ours with token_weights = mask / mask.sum(). compiled=False: the loss math is the same, and
    torch.compile on 2 CPU cores would cost tens of seconds."""
    liger_cls = _liger_or_skip()
    bsz, t, h, v = 3, 11, 16, 203
    inp = make_inputs(n=bsz * t, h=h, v=v, dtype=torch.float32, off_policy=off_policy, rows=bsz, bias=True)
    row = torch.arange(bsz * t) // t  # Liger layout: row-major [B, T]
    row_adv = torch.tensor([0.8, -1.2, 0.3])
    inp["advantages"] = row_adv[row]
    mask = (inp["token_weights"] != 0).float()
    inp["token_weights"] = mask / mask.sum()
    kw = {"beta": beta, "temperature": 0.9}
    loss, st, g = run(fused_torch, inp, **kw)

    leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")}
    liger = liger_cls(beta=beta, compiled=False, use_ref_model=beta != 0.0, loss_type="dapo", temperature=0.9)
    l_loss, metrics = liger(
        leaves["hidden"].view(bsz, t, h), leaves["weight"], inp["targets"].view(bsz, t), mask.view(bsz, t),
        row_adv, bias=leaves["bias"],
        ref_per_token_logps=inp["ref_logp"].view(bsz, t) if beta else None,
        old_per_token_logps=None if inp["old_logp"] is None else inp["old_logp"].view(bsz, t),
    )
    l_loss.backward()
    torch.testing.assert_close(loss, l_loss, atol=1e-5, rtol=1e-4)
    for k in g:
        torch.testing.assert_close(g[k], leaves[k].grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st["clip_fraction"], metrics[-1], atol=1e-6, rtol=0)
    if beta:
        torch.testing.assert_close(st["kl_mean"], metrics[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("agg,beta,dtype", [("token-mean", 0.0, torch.float32),
                                             ("seq-mean-token-mean", 0.0, torch.float32),
                                             ("seq-mean-token-mean", 0.1, torch.float32),
                                             ("dr_grpo", 0.04, F64)])
def test_liger_adapter_matches_reference(agg, beta, dtype):
    """The trainer's loss_impl=liger: same contract as the fused op (beta > 0 with unequal weights
    runs one Liger call per distinct weight)."""
    _liger_or_skip()
    from dash_kernels.liger_adapter import liger_pg_loss

    inp = make_inputs(dtype=dtype, off_policy="outside", agg=agg)
    kw = {"tau": 0.1, "temperature": 0.8, "return_entropy": True, "beta": beta}
    tol = {"atol": 1e-5, "rtol": 1e-4}  # Liger computes its log-softmax in fp32 even for fp64 inputs
    ref_loss, ref_st, ref_g = run(dk.pg_loss_ref, inp, **kw)
    loss, st, g = run(liger_pg_loss, inp, **kw, compiled=False)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], **tol)
    keep = kept_mask(inp, 0.1)
    torch.testing.assert_close(st["logp"][keep], ref_st["logp"][keep], **tol)
    torch.testing.assert_close(st["entropy"][keep], ref_st["entropy"][keep], **tol)
    torch.testing.assert_close(st["clip_fraction"].double(), ref_st["clip_fraction"].double())
    if beta:
        torch.testing.assert_close(st["kl_mean"].double(), ref_st["kl_mean"].double(), **tol)


def test_liger_adapter_all_filtered():
    _liger_or_skip()
    from dash_kernels.liger_adapter import liger_pg_loss

    inp = make_inputs(dtype=torch.float32, off_policy="outside")
    loss, st, g = run(liger_pg_loss, inp, tau=10.0, beta=0.1, compiled=False)
    assert float(loss) == 0.0 and st["kept_tokens"] == 0
    assert all(float(t.abs().sum()) == 0.0 for t in g.values())
