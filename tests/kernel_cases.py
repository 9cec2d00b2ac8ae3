"""Random fused-loss problems and their references, shared by the kernel tests (torch path, the Triton
interpreter, the GPU), the sampler importance-sampling tests and profiles/gpu_session.py: make_inputs builds a
problem, run calls an op on it and returns loss, stats and grads, assert_matches compares an op with the naive
reference; the sampler importance-sampling part adds the sampler's log-probs, a float64 direct reference
written from the formulas, and TRL's own ratio and loss code."""

from __future__ import annotations

import importlib
import math
import sys
import types
from collections import defaultdict

import pytest
import torch
from helpers import REPO_ROOT


def _import_dash_kernels():
    """`dash_kernels` installed, or else from kernels/ (a folder without `__init__.py`: it shadows nothing)."""
    try:
        return importlib.import_module("dash_kernels")
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO_ROOT / "kernels"))
        return importlib.import_module("dash_kernels")


dk = _import_dash_kernels()
F64 = torch.float64


def make_inputs(n=37, h=24, v=301, dtype=F64, seed=0, bias=True, off_policy=None, temperature=1.0,
                agg="token-mean", rows=5):
    """Random problem. off_policy: None (on-policy), "inside" (rho near 1) or "outside" (many clipped)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=dtype, generator=g)
    weight = torch.randn(v, h, dtype=dtype, generator=g) / h**0.5
    b = torch.randn(v, dtype=dtype, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    row = torch.arange(n) % rows  # tokens of `rows` sequences, interleaved
    row_adv = torch.tensor([1.3, -0.7, 0.05, 0.0, -0.09, 0.6, -1.1][:rows], dtype=dtype)
    adv = row_adv[row]
    mask = (torch.rand(n, generator=g) > 0.15).to(dtype)
    lens = torch.zeros(rows, dtype=dtype).index_add_(0, row, mask)
    if agg == "token-mean":
        tw = mask / mask.sum()
    elif agg == "seq-mean-token-mean":
        tw = mask / (rows * lens.clamp(min=1)[row])
    elif agg == "dr_grpo":
        tw = mask / (rows * 16)
    else:
        raise ValueError(agg)
    with torch.no_grad():
        lp = dk.logprobs_ref(hidden, weight, b, targets, temperature=temperature)
    old = ref = None
    if off_policy == "inside":
        old = lp + 0.05 * torch.randn(n, dtype=dtype, generator=g)
    elif off_policy == "outside":
        old = lp + 0.6 * torch.randn(n, dtype=dtype, generator=g)
    ref = lp + 0.3 * torch.randn(n, dtype=dtype, generator=g)
    return dict(hidden=hidden, weight=weight, bias=b, targets=targets, advantages=adv, token_weights=tw,
                old_logp=old, ref_logp=ref)


def run(fn, inp, grad_scale=1.0, **kw):
    """Loss, stats and grads of (hidden, weight, bias) for fn(**inp, **kw)."""
    leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")
              if inp[k] is not None}
    args = {**inp, **leaves}
    loss, stats = fn(args["hidden"], args["weight"], args["bias"], args["targets"], args["advantages"],
                     args["token_weights"], args["old_logp"], args["ref_logp"], **kw)
    (loss * grad_scale).backward()
    grads = {k: t.grad for k, t in leaves.items()}
    return loss.detach(), stats, grads


def fused_torch(*a, **kw):
    return dk.fused_linear_pg_loss(*a, backend="torch", **kw)


def kept_mask(inp, tau):
    keep = inp["token_weights"] != 0
    if tau is not None:
        keep &= inp["advantages"].abs() > tau
    return keep


def to_fp64(inp):
    """The same problem in float64 (the reference precision), from the very values fn sees."""
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inp.items()}


def assert_matches(inp, kw, fn=fused_torch, atol=1e-10, rtol=1e-8, grad_scale=1.0, fn_kw=None, ref_fp64=False):
    """fn vs the naive reference (in float64 with ref_fp64): loss, every grad, and the stats on kept tokens."""
    ref_loss, ref_st, ref_g = run(dk.pg_loss_ref, to_fp64(inp) if ref_fp64 else inp, grad_scale, **kw)
    loss, st, g = run(fn, inp, grad_scale, **kw, **(fn_kw or {}))
    ref_g = {k: v.to(g[k].dtype) if k in g else v for k, v in ref_g.items()}
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), atol=atol, rtol=rtol)
    assert g.keys() == ref_g.keys()
    for k in g:
        torch.testing.assert_close(g[k], ref_g[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"grad {k}: {m}")
    keep = kept_mask(inp, kw.get("tau"))
    torch.testing.assert_close(st["logp"][keep], ref_st["logp"][keep].to(st["logp"].dtype), atol=atol, rtol=rtol)
    torch.testing.assert_close(st["clip_fraction"], ref_st["clip_fraction"].to(st["clip_fraction"].dtype))
    if kw.get("beta", 0.0) == 0.0:
        assert st["kl_mean"] is None
    else:
        torch.testing.assert_close(st["kl_mean"], ref_st["kl_mean"].to(st["kl_mean"].dtype), atol=atol, rtol=rtol)
    if kw.get("return_entropy"):
        torch.testing.assert_close(st["entropy"][keep], ref_st["entropy"][keep].to(st["entropy"].dtype),
                                   atol=atol, rtol=rtol)
    assert st["kept_tokens"] == int(keep.sum())
    return ref_st



# ----------------------------------------------------------------------------- sampler importance sampling

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
