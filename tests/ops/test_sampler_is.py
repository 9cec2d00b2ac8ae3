"""Sampler importance sampling (TRL's vLLM correction) and TRL's bias-corrected KL inside the fused loss.

The kernels (chunked torch path here; Triton under TRITON_INTERPRET=1 in test_kernels_triton.py, which calls
kernel_cases.check_triton_cases) against (1) a float64 direct reference written from the formulas in
kernel_cases.py (python loops for the ratio, autograd on materialised logits) and (2) TRL's own code: the ratio by a line-by-line
transcription of GRPOTrainer._generate_and_score_completions (TRL has no function for it), the loss by TRL's
real GRPOTrainer._compute_loss called on a stand-in trainer object. The trainer-level checks (GRPOTrainer vs
TRL's _compute_loss on one batch, defaults per engine / dtype) are in test_sampler_is_trainer.py.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    BOUNDS,
    MODES,
    ROWS,
    check_against_direct,
    direct_run,
    dk,
    fused_torch,
    make_inputs,
    run,
    run_is,
    to_fp64,
    trl_compute_loss,
    trl_ratio_rows,
    with_sampler,
)

# ----------------------------------------------------------------------------- the ratio itself


def rows_of(flat: torch.Tensor, rows: torch.Tensor, fill=0.0) -> torch.Tensor:
    """Flat tokens with row ids (interleaved) -> [R, T] in token order within each row, padded with `fill`."""
    n_rows = int(rows.max()) + 1
    width = int(torch.bincount(rows).max())
    out = torch.full((n_rows, width), fill, dtype=flat.dtype)
    for r in range(n_rows):
        v = flat[rows == r]
        out[r, : v.numel()] = v
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bounds", [(None, 1.2), (0.8, None), (0.85, 1.1)])
def test_ratio_is_trls_line_by_line(mode, bounds):
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, 2, 0, 1, 0, 2, 2, 0, 1, 3])  # interleaved, one single-token row
    n = rows.numel()
    trainer = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    sampler = trainer + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    sampler[4] = float("nan")
    got = dk.sampler_is_ratio(trainer, sampler, mode, *bounds, rows)
    mask = rows_of(torch.ones(n, dtype=torch.float64), rows)
    want = trl_ratio_rows(rows_of(trainer, rows), rows_of(sampler, rows), mask, mode, *bounds)
    want = want.expand_as(mask)  # sequence modes: one ratio per row, [B, 1]
    assert torch.equal(rows_of(got, rows), want * mask) or torch.allclose(rows_of(got, rows), want * mask,
                                                                         rtol=1e-14, atol=0)
    if mode.startswith("token"):  # a NaN sampler token is a zero difference (a ratio of 1, bounded)
        assert got[4] == dk.sampler_is_ratio(trainer[4:5], trainer[4:5], mode, *bounds)[0]
    lo, hi = bounds
    vals = got[torch.isfinite(got)]
    if mode.endswith("truncate"):
        assert (lo is None or bool((vals >= lo).all())) and (hi is None or bool((vals <= hi).all()))
    else:
        assert bool(((vals == 0) | ((lo is None or vals >= lo) & (hi is None or vals <= hi))).all())


def test_sequence_modes_need_row_ids_and_modes_are_checked():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="row_ids"):
        dk.sampler_is_ratio(x, x, "sequence_mask")
    with pytest.raises(ValueError, match="mode"):
        dk.sampler_is_ratio(x, x, "token_clip")
    inp = with_sampler(make_inputs())
    with pytest.raises(ValueError, match="row_ids"):
        dk.fused_linear_pg_loss(*(inp[k] for k in ("hidden", "weight", "bias", "targets", "advantages",
                                                   "token_weights", "old_logp", "ref_logp", "sampler_logp")),
                                is_mode="sequence_truncate")


# ----------------------------------------------------------------------------- fused op vs direct reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("old", [False, True])
@pytest.mark.parametrize("beta, kl_correction", [(0.0, False), (0.1, False), (0.1, True)])
def test_chunked_torch_path_matches_float64_direct_reference(mode, old, beta, kl_correction):
    """chunk_size 4 splits every row over several chunks (rows are interleaved): the sequence modes' ratio
    needs whole rows before the first gradient chunk."""
    inp = with_sampler(make_inputs(off_policy="inside"))
    ratio = check_against_direct(fused_torch, inp, mode, old, beta, kl_correction, atol=1e-10, rtol=1e-9,
                                 chunk_size=4)
    lo, hi = BOUNDS[mode]
    # the case exercises the bounds: some ratios hit them (truncate) or are masked, some are inside
    hit = (ratio == 0) if mode.endswith("mask") else ((ratio == hi) | (ratio == (lo or -1.0)))
    assert bool(hit.any()) and not bool(hit.all())


@pytest.mark.parametrize("mode", MODES)
def test_naive_reference_matches_float64_direct_reference(mode):
    inp = with_sampler(make_inputs(off_policy="outside"))
    check_against_direct(dk.pg_loss_ref, inp, mode, False, 0.1, True, atol=1e-10, rtol=1e-9)


def test_no_grad_forward_and_fp32_inputs():
    """The eval forward (no gradient: the ratio comes from the one logp pass) and fp32 inputs."""
    inp = with_sampler(make_inputs(dtype=torch.float32, off_policy="inside"))
    lo, hi = BOUNDS["sequence_mask"]
    with torch.no_grad():
        loss, st = fused_torch(*(inp[k] for k in ("hidden", "weight", "bias", "targets", "advantages",
                                                  "token_weights", "old_logp", "ref_logp", "sampler_logp",
                                                  "row_ids")), is_mode="sequence_mask", is_clip_min=lo,
                               is_clip_max=hi, chunk_size=4)
    want, _, _ = direct_run(to_fp64(inp), mode="sequence_mask", lo=lo, hi=hi)
    torch.testing.assert_close(loss.double(), want, atol=2e-6, rtol=2e-5)
    check_against_direct(fused_torch, inp, "token_truncate", True, 0.05, True, atol=2e-6, rtol=2e-5)


def test_without_sampler_nothing_changes_and_ratio_one_is_identity():
    """No sampler_logp: no ratio stat, the loss of before. Sampler = old policy: ratio 1, the same loss."""
    inp = make_inputs(off_policy="inside")
    base_loss, st, base_g = run(fused_torch, inp, beta=0.1)
    assert st["is_ratio"] is None
    old = inp["old_logp"]
    same = {**inp, "sampler_logp": old.clone(), "row_ids": torch.arange(old.numel()) % ROWS}
    loss, st, g = run_is(fused_torch, same, beta=0.1, is_mode="token_mask", is_clip_min=0.5, is_clip_max=2.0)
    torch.testing.assert_close(loss, base_loss, atol=1e-12, rtol=1e-12)
    for k in g:
        torch.testing.assert_close(g[k], base_g[k], atol=1e-12, rtol=1e-10)


def test_masked_tokens_leave_the_backward():
    """token_mask zeroes the PG term of out-of-range tokens: with beta = 0 their g is 0 and they cost nothing;
    the gradient equals that of the same loss with those tokens' weights set to 0."""
    inp = with_sampler(make_inputs(), noise=0.6, nan=False)
    lo, hi = 0.7, 1.4
    ratio = dk.sampler_is_ratio(dk.logprobs_ref(inp["hidden"], inp["weight"], inp["bias"], inp["targets"]),
                                inp["sampler_logp"], "token_mask", lo, hi)
    masked = (ratio == 0) & (inp["token_weights"] != 0)
    assert bool(masked.any())
    _, _, g = run_is(fused_torch, inp, is_mode="token_mask", is_clip_min=lo, is_clip_max=hi)
    dropped = {**inp, "token_weights": inp["token_weights"].masked_fill(masked, 0.0)}
    _, _, g2 = run_is(fused_torch, dropped, is_mode="token_mask", is_clip_min=lo, is_clip_max=hi)
    for k in g:
        torch.testing.assert_close(g[k], g2[k], atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- TRL's own _compute_loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta, bias_correction", [(0.0, False), (0.1, False), (0.1, True)])
def test_fused_op_equals_trls_compute_loss(mode, beta, bias_correction):
    """One batch of ROWS rows (dapo: token sum / tokens), old log-probs from a pass at other weights, sampler
    log-probs that differ from both: the fused op with the dapo token weights gives TRL's loss and gradient."""
    lo, hi = BOUNDS[mode]
    inp = with_sampler(make_inputs(off_policy="inside", bias=False))
    rows = inp["row_ids"]
    keep = inp["token_weights"] != 0
    # TRL's batch: the kept tokens of each row, in order ([B, T], right padded)
    sel = keep.nonzero().squeeze(1)
    flat = {k: inp[k][sel] for k in ("advantages", "old_logp", "ref_logp", "sampler_logp", "targets")}
    r_sel = rows[sel]
    mask = rows_of(torch.ones(sel.numel(), dtype=torch.float64), r_sel)
    adv = torch.stack([flat["advantages"][r_sel == r][0] for r in range(ROWS)])
    is_ratio = trl_ratio_rows(rows_of(flat["old_logp"], r_sel), rows_of(flat["sampler_logp"], r_sel), mask, mode,
                              lo, hi)
    h = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()
    logp = torch.log_softmax(h[sel] @ w.t(), -1).gather(1, flat["targets"][:, None]).squeeze(1)
    want, metrics = trl_compute_loss(rows_of(logp, r_sel), mask, adv, rows_of(flat["old_logp"], r_sel),
                                     rows_of(flat["ref_logp"], r_sel), is_ratio, beta=beta,
                                     bias_correction=bias_correction)
    want_g = torch.autograd.grad(want, (h, w))
    tw = keep.double() / keep.sum()  # dapo: sum over the batch's tokens / their number
    dapo = {**inp, "token_weights": tw}
    loss, st, g = run_is(fused_torch, dapo, is_mode=mode, is_clip_min=lo, is_clip_max=hi, beta=beta,
                         kl_correction=bias_correction, chunk_size=4)
    torch.testing.assert_close(loss, want.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g["hidden"], want_g[0], atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(g["weight"], want_g[1], atol=1e-12, rtol=1e-9)
    if beta:  # TRL logs the KL it added (bias-corrected when asked): the op's kl_mean
        assert float(st["kl_mean"]) == pytest.approx(metrics["train"]["kl"][0], rel=1e-10)
    # TRL's ratio, back in flat token order, is the op's is_ratio stat
    back = torch.zeros_like(inp["sampler_logp"])
    for r in range(ROWS):
        idx = sel[r_sel == r]
        back[idx] = is_ratio.expand_as(mask)[r, : idx.numel()]
    torch.testing.assert_close(st["is_ratio"][keep], back[keep], atol=1e-14, rtol=1e-12)


# ----------------------------------------------------------------------------- sequence modes in one lm_head pass


def test_row_chunks_hold_whole_rows():
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    assert dk.torch_ref.row_chunks(rows, 5) == [0, 5, 10]  # rows 0-1 | rows 2-3
    assert dk.torch_ref.row_chunks(rows, 4) == [0, 3, 5, 9, 10]
    assert dk.torch_ref.row_chunks(rows, 10) == [0, 10]
    assert dk.torch_ref.row_chunks(rows, 3) is None  # row 2 has 4 tokens
    assert dk.torch_ref.row_chunks(torch.arange(10) % 3, 10) is None  # interleaved rows: no run per row


def lm_head_flops(inp: dict, mode: str, chunk_size: int) -> int:
    """2 m k n of every matrix product the op runs, out= and in-place forms included (FlopCounterMode skips
    `mm(out=)`, the chunked path's logits product)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "addmm_"):
                a, b = args[:2] if name == "mm" else args[1:3]
                self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    with Products() as counter:
        run_is(fused_torch, inp, is_mode=mode, is_clip_min=None, is_clip_max=3.0, chunk_size=chunk_size)
    return counter.flops


@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask"])
def test_sequence_modes_over_whole_rows_take_one_lm_head_pass(mode):
    """Rows in runs (as the trainer lays them out) go to the chunks whole: the sequence ratio is formed chunk by
    chunk, as exact as before, with the lm_head FLOPs of a token mode (no pass for the log-probs first).
    Interleaved rows still take that pass."""
    inp = {**with_sampler(make_inputs(off_policy="inside")), "old_logp": None}  # the ratio from this pass
    n = inp["hidden"].shape[0]
    runs = {**inp, "row_ids": torch.arange(n) * ROWS // n}  # 5 rows of 7-8 tokens, each one run
    check_against_direct(fused_torch, runs, mode, False, 0.1, True, atol=1e-10, rtol=1e-9, chunk_size=16)
    one_pass = lm_head_flops(runs, "token_truncate", 16)
    assert lm_head_flops(runs, mode, 16) == one_pass
    k = int((inp["token_weights"] != 0).sum())
    h, v = inp["weight"].shape[1], inp["weight"].shape[0]
    assert lm_head_flops(inp, mode, 16) == one_pass + 2 * k * h * v  # interleaved: the log-prob pass first
