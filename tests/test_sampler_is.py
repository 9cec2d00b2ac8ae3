"""Sampler importance sampling (TRL's vLLM correction) and TRL's bias-corrected KL inside the fused loss.

The kernels (chunked torch path here; Triton under TRITON_INTERPRET=1 in test_kernels_triton.py, which calls
`check_triton_cases` below) against (1) a float64 direct reference written here from the formulas (python
loops for the ratio, autograd on materialised logits) and (2) TRL's own code: the ratio by a line-by-line
transcription of GRPOTrainer._generate_and_score_completions (TRL has no function for it), the loss by TRL's
real GRPOTrainer._compute_loss called on a stand-in trainer object. The trainer-level checks (GRPOTrainer vs
TRL's _compute_loss on one batch, defaults per engine / dtype) are in test_sampler_is_trainer.py.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
from test_kernels import dk, fused_torch, make_inputs, run, to_fp64

MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
BOUNDS = {"token_truncate": (None, 1.15), "token_mask": (0.8, 1.25), "sequence_truncate": (0.7, 2.0),
          "sequence_mask": (0.6, 2.0)}
ROWS = 5


def with_sampler(inp: dict, seed: int = 1, noise: float = 0.25, nan: bool = True) -> dict:
    """make_inputs + the sampler's log-probs (the trainer's plus noise, one NaN: a token the sampler could not
    score) and each token's row (make_inputs interleaves ROWS rows: arange(n) % ROWS)."""
    g = torch.Generator().manual_seed(seed)
    n = inp["hidden"].shape[0]
    with torch.no_grad():
        lp = dk.logprobs_ref(inp["hidden"], inp["weight"], inp["bias"], inp["targets"])
    sampler = lp + noise * torch.randn(n, dtype=lp.dtype, generator=g)
    if nan:
        kept = (inp["token_weights"] != 0).nonzero().squeeze(1)
        sampler[kept[3]] = float("nan")
    return {**inp, "sampler_logp": sampler.to(inp["hidden"].dtype), "row_ids": torch.arange(n) % ROWS}


def run_is(fn, inp, **kw):
    """run() with the sampler's log-probs and row ids passed positionally after ref_logp."""
    def call(h, w, b, t, a, tw, old, ref, **k):
        return fn(h, w, b, t, a, tw, old, ref, inp["sampler_logp"], inp["row_ids"], **k)
    base = {k: v for k, v in inp.items() if k not in ("sampler_logp", "row_ids")}
    return run(call, base, **kw)


def direct_ratio(trainer, sampler, rows, keep, mode, lo, hi) -> list[float]:
    """TRL's ratio per kept token, from its definition, with python floats."""
    d = [0.0 if math.isnan(float(t) - float(s)) else float(t) - float(s) for t, s in zip(trainer, sampler)]
    if mode.startswith("sequence"):
        sums = defaultdict(float)
        for i, r in enumerate(rows.tolist()):
            if keep[i]:
                sums[r] += d[i]
        d = [sums[r] for r in rows.tolist()]
    out = []
    for i, x in enumerate(d):
        r = math.exp(x)
        if mode.endswith("truncate"):
            r = min(max(r, lo if lo is not None else -math.inf), hi if hi is not None else math.inf)
        elif (lo is not None and r < lo) or (hi is not None and r > hi):
            r = 0.0
        out.append(r if keep[i] else 0.0)
    return out


def direct_loss(h, w, b, targets, adv, tw, old, ref, sampler, rows, *, mode, lo, hi, beta=0.0, eps=0.2,
                kl_correction=False, temperature=1.0, tau=None):
    """sum_t w_t (r_t surr_t + beta kl_t) in float64 on materialised logits; r_t from `direct_ratio`."""
    z = h.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    logp = torch.log_softmax(z / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    keep = (tw != 0).tolist()
    if tau is not None:
        keep = [k and abs(float(a)) > tau for k, a in zip(keep, adv)]
    trainer = logp.detach() if old is None else old.double()
    r = direct_ratio(trainer.tolist(), sampler.double().tolist(), rows, keep, mode, lo, hi) if sampler is not None \
        else [1.0] * len(keep)
    terms = []
    for t in range(len(keep)):
        if not keep[t]:
            continue
        base = logp[t].detach() if old is None else old[t].double()
        rho = torch.exp(logp[t] - base)
        a = float(adv[t])
        surr = -torch.minimum(rho * a, torch.clamp(rho, 1 - eps, 1 + eps) * a)
        term = r[t] * surr
        if beta:
            dl = ref[t].double() - logp[t]
            kl = torch.exp(dl) - dl - 1
            term = term + beta * (kl * rho if kl_correction else kl)
        terms.append(float(tw[t]) * term)
    return torch.stack(terms).sum(), torch.tensor(r, dtype=torch.float64)


def direct_run(inp, **kw):
    leaves = {k: inp[k].detach().double().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")
              if inp[k] is not None}
    loss, ratio = direct_loss(leaves["hidden"], leaves["weight"], leaves.get("bias"), inp["targets"],
                              inp["advantages"].double(), inp["token_weights"].double(),
                              None if inp["old_logp"] is None else inp["old_logp"].double(),
                              inp["ref_logp"].double(), inp["sampler_logp"].double(), inp["row_ids"], **kw)
    loss.backward()
    return loss.detach(), ratio, {k: t.grad for k, t in leaves.items()}


def check_against_direct(fn, inp, mode, old, beta, kl_correction, atol, rtol, chunk_size=None, **extra):
    """fn (a fused op) vs the float64 direct reference: loss, grads, the is_ratio stat on kept tokens."""
    lo, hi = BOUNDS[mode]
    if old:
        inp = {**inp, "old_logp": inp["ref_logp"] + 0.1}  # not the sampler, not the policy
    want_loss, want_ratio, want_g = direct_run(to_fp64(inp), mode=mode, lo=lo, hi=hi, beta=beta,
                                               kl_correction=kl_correction)
    kw = dict(is_mode=mode, is_clip_min=lo, is_clip_max=hi, beta=beta, kl_correction=kl_correction, **extra)
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    loss, st, g = run_is(fn, inp, **kw)
    torch.testing.assert_close(loss.double(), want_loss, atol=atol, rtol=rtol)
    for k in g:
        torch.testing.assert_close(g[k].double(), want_g[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")
    keep = inp["token_weights"] != 0
    torch.testing.assert_close(st["is_ratio"][keep].double(), want_ratio[keep], atol=atol, rtol=rtol)
    return want_ratio[keep]


# ----------------------------------------------------------------------------- the ratio itself


def trl_ratio_rows(old, sampling, mask, mode, clip_min, clip_max):
    """GRPOTrainer._generate_and_score_completions (trl 1.16), the importance-sampling block, line by line on
    [B, T] tensors."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
        logps_diff = per_sequence_logps_diff
    else:
        logps_diff = per_token_logps_diff
    vllm_importance_sampling_ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        vllm_importance_sampling_ratio = torch.clamp(vllm_importance_sampling_ratio, min=clip_min, max=clip_max)
    elif mode in ["sequence_mask", "token_mask"]:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        invalid_mis_mask = (vllm_importance_sampling_ratio < min_val) | (vllm_importance_sampling_ratio > max_val)
        vllm_importance_sampling_ratio = vllm_importance_sampling_ratio.masked_fill(invalid_mis_mask, value=0.0)
    return vllm_importance_sampling_ratio


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


def trl_compute_loss(logp_rows, mask, adv, old_rows, ref_rows, is_ratio, *, beta, loss_type="dapo",
                     bias_correction=False, level="token", eps=0.2, use_vllm=True):
    """TRL's GRPOTrainer._compute_loss (the installed trl) on a stand-in trainer whose per-token log-probs are
    `logp_rows` [B, T] (with their autograd graph): TRL's own lines apply the ratio and the KL."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kw):
        return logp_rows, torch.zeros_like(logp_rows), None

    metrics = defaultdict(lambda: defaultdict(list))
    stand_in = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps, aux_loss_enabled=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta, loss_type=loss_type,
        epsilon_low=eps, epsilon_high=eps, use_vllm=use_vllm, vllm_importance_sampling_correction=True,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        args=types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=1),
        accelerator=types.SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t),
        _entropy_bonus_enabled=False, _metrics=metrics, max_completion_length=logp_rows.shape[1])
    b, t = logp_rows.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "num_items_in_batch": mask.sum(), "old_per_token_logps": old_rows,
              "importance_sampling_ratio": is_ratio}
    if beta:
        inputs["ref_per_token_logps"] = ref_rows
    return trl_grpo.GRPOTrainer._compute_loss(stand_in, None, inputs), metrics


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


def check_triton_cases(triton_op) -> dict:
    """For test_kernels_triton.py's interpreter subprocess: the Triton path (fp32) vs the float64 direct
    reference, each mode, with and without old log-probs, with the bias-corrected KL. {case: "ok" | error}."""
    results = {}
    for mode in MODES:
        for old in (False, True):
            name = f"sampler_is_{mode}_{'old' if old else 'onpolicy'}"
            try:
                inp = with_sampler(make_inputs(dtype=torch.float32, off_policy="inside"))
                check_against_direct(triton_op, inp, mode, old, 0.1, True, atol=3e-5, rtol=2e-4)
                results[name] = "ok"
            except Exception as e:  # report, keep going
                results[name] = f"{type(e).__name__}: {e}"
    return results


TRITON_CASES = [f"sampler_is_{m}_{o}" for m in MODES for o in ("onpolicy", "old")]
