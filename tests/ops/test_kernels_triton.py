"""The Triton kernels on CPU under TRITON_INTERPRET=1, against the naive reference.

TRITON_INTERPRET must be set before triton is imported, so the cases run in one subprocess that
executes this file as a script (the pytest process and its other tests are left untouched); each
case then reports separately. fp32 only: a bf16 tl.dot is wrong in the interpreter. Shapes are
small and blocks large, since the interpreter's cost grows with the number of programs. Both
backwards (bwd="dense", the default, and bwd="atomic") are held to the reference; the real
vocabulary size (V 151936, three tokens) and a huge bias on masked lanes have cases of their own.

The GPU launch config (bf16 and fp32 blocks) is compiled ahead of time for sm_90 in this process: the
kernels lower to SASS and ptxas reports no register spills. Neither check says anything about speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

F32 = "float32"

CASES = {
    # name: (make_inputs kwargs, op kwargs, grad scale)
    "on_policy_bias_entropy": ({}, {"return_entropy": True}, 1.0),
    "off_outside_clip_skip": ({"off_policy": "outside"}, {}, 1.0),
    "off_inside_beta": ({"off_policy": "inside", "bias": False}, {"beta": 0.1}, 1.0),
    "tau_beta_temperature": ({"off_policy": "outside", "temperature": 0.7},
                             {"tau": 0.1, "beta": 0.05, "temperature": 0.7, "return_entropy": True}, 1.0),
    "seq_mean_tau0": ({"agg": "seq-mean-token-mean"}, {"tau": 0.0}, 1.0),
    "grad_output_2p5": ({"off_policy": "inside"}, {"beta": 0.1}, 2.5),
    "n1": ({"n": 1, "rows": 1}, {}, 1.0),
    "v_not_multiple_many_tiles": ({"v": 1031, "n": 21, "h": 40}, {"temperature": 1.3}, 1.0),
    "atomic_on_policy_bias_entropy": ({}, {"return_entropy": True, "bwd": "atomic"}, 1.0),
    "atomic_tau_beta_temperature": ({"off_policy": "outside", "temperature": 0.7},
                                    {"tau": 0.1, "beta": 0.05, "temperature": 0.7, "bwd": "atomic"}, 2.5),
    "atomic_v_not_multiple_many_tiles": ({"v": 1031, "n": 21, "h": 40}, {"temperature": 1.3, "bwd": "atomic"}, 1.0),
}
EXTRA = ["all_filtered", "non_contiguous", "logprobs", "nonfinite_dropped_inputs_unmodified",
         "vocab_151936_dense", "vocab_151936_atomic", "huge_bias_on_masked_lanes_dense",
         "huge_bias_on_masked_lanes_atomic", "dense_chunks", "mixed_dtypes_run_in_the_narrower"]


def _main() -> None:
    """Subprocess entry point: run every case, print {case: "ok" | error} as JSON on the last line."""
    import kernel_cases as tk
    import torch

    dk = tk.dk
    torch.set_num_threads(1)

    def triton_op(*a, **kw):
        return dk.fused_linear_pg_loss(*a, backend="triton", **kw)

    close = {"atol": 3e-5, "rtol": 2e-4}
    tol = {**close, "ref_fp64": True}  # fp32 kernels vs the float64 reference

    def case_all_filtered():
        inp = tk.make_inputs(dtype=torch.float32, off_policy="outside")
        loss, st, g = tk.run(triton_op, inp, tau=10.0, beta=0.1)
        assert float(loss) == 0.0 and st["kept_tokens"] == 0
        assert all(float(t.abs().sum()) == 0.0 for t in g.values())

    def case_non_contiguous():
        inp = tk.make_inputs(dtype=torch.float32, off_policy="outside")
        n, h = inp["hidden"].shape
        nc = dict(inp)
        nc["hidden"] = torch.empty(h, 2 * n)[:, ::2].t().copy_(inp["hidden"])
        nc["weight"] = torch.empty(h, inp["weight"].shape[0]).t().copy_(inp["weight"])
        nc["targets"] = torch.stack([inp["targets"], inp["targets"]], 1)[:, 1]
        ref_loss, _, ref_g = tk.run(dk.pg_loss_ref, tk.to_fp64(inp), beta=0.1, tau=0.1)
        loss, _, g = tk.run(triton_op, nc, beta=0.1, tau=0.1)
        torch.testing.assert_close(loss, ref_loss.float(), **close)
        for k in g:
            torch.testing.assert_close(g[k], ref_g[k].float(), **close)

    def case_logprobs():
        inp = tk.make_inputs(dtype=torch.float32, v=301, n=45)
        args = (inp["hidden"], inp["weight"], inp["bias"], inp["targets"])
        ref_lp, ref_ent = dk.logprobs_ref(*(t.double() if t.is_floating_point() else t for t in args),
                                          temperature=0.8, return_entropy=True)
        lp, ent = dk.fused_logprobs(*args, temperature=0.8, backend="triton", return_entropy=True)
        torch.testing.assert_close(lp, ref_lp.float(), **close)
        torch.testing.assert_close(ent, ref_ent.float(), **close)

    def case_nonfinite_dropped_inputs_unmodified():
        inp = tk.make_inputs(dtype=torch.float32, off_policy="inside")
        kw = {"tau": 0.1, "beta": 0.1}
        ref_loss, _, ref_g = tk.run(dk.pg_loss_ref, tk.to_fp64(inp), **kw)
        dropped = ~tk.kept_mask(inp, 0.1)
        inp["old_logp"] = inp["old_logp"].masked_fill(dropped, float("nan"))
        inp["ref_logp"] = inp["ref_logp"].masked_fill(dropped, float("inf"))
        before = {k: v.clone() for k, v in inp.items() if v is not None}
        for k in ("hidden", "weight", "bias"):
            inp[k].requires_grad_(True)
        loss, st = triton_op(*inp.values(), **kw)
        loss.backward()
        for k, v in before.items():  # nothing written in place
            torch.testing.assert_close(inp[k].detach(), v, rtol=0, atol=0, equal_nan=True)
        g = {k: inp[k].grad for k in ("hidden", "weight", "bias")}
        assert torch.isfinite(st["kl_mean"]) and torch.isfinite(st["clip_fraction"])
        torch.testing.assert_close(loss, ref_loss.float(), **close)
        for k in g:
            torch.testing.assert_close(g[k], ref_g[k].float(), **close)

    def case_vocab_151936(bwd):
        """The Qwen2.5 vocabulary, three tokens; vocab blocks of 2048 here to keep the interpreter's
        program count down (the kernels' V loop and masking are what this exercises)."""
        tkern = sys.modules["dash_kernels.triton_kernels"]
        saved = tkern.INTERPRET_BLOCKS
        tkern.INTERPRET_BLOCKS = (32, 2048, 64, 4)
        try:
            inp = tk.make_inputs(dtype=torch.float32, n=3, h=16, v=151936, rows=3, off_policy="inside")
            tk.assert_matches(inp, {"beta": 0.1, "temperature": 0.9}, fn=triton_op, fn_kw={"bwd": bwd}, **tol)
        finally:
            tkern.INTERPRET_BLOCKS = saved

    def case_huge_bias_on_masked_lanes(bwd):
        """bias 100 on some entries: exp(100) overflows fp32. Masked token lanes (n = 5 in a block of 32)
        load lse = 0 and h = 0, so an unmasked p there would be inf, and inf * (g = 0) NaN in grad_W."""
        inp = tk.make_inputs(dtype=torch.float32, n=5, rows=5, v=301)
        inp["bias"][::7] = 100.0
        inp["targets"][:2] = 14  # two tokens whose target carries the huge bias: p ~ 1 there
        tk.assert_matches(inp, {"return_entropy": True}, fn=triton_op, fn_kw={"bwd": bwd}, **tol)
        _, _, g = tk.run(triton_op, inp, bwd=bwd)
        assert all(bool(torch.isfinite(t).all()) for t in g.values())

    def case_dense_chunks():
        """bwd="dense" over several token chunks (a tiny dZ budget): the chunked GEMMs add up to the reference."""
        tkern = sys.modules["dash_kernels.triton_kernels"]
        saved = tkern.DENSE_BWD_BYTES
        tkern.DENSE_BWD_BYTES = 1  # one token block (32 rows) per chunk: n = 100 is four chunks
        try:
            assert tkern.dense_chunk_rows(100, 301, torch.float32) == 32
            inp = tk.make_inputs(dtype=torch.float32, n=100, rows=5, off_policy="outside")
            tk.assert_matches(inp, {"tau": 0.1, "beta": 0.05}, fn=triton_op, **tol)
        finally:
            tkern.DENSE_BWD_BYTES = saved

    def case_mixed_dtypes_run_in_the_narrower():
        """fp32 hidden states with a float64 lm_head (as bf16 activations with fp32 master weights): the
        kernels run in fp32, and each grad comes back in its input's dtype."""
        inp = tk.make_inputs(dtype=torch.float32, off_policy="inside")
        mixed = {**inp, "weight": inp["weight"].double(), "bias": inp["bias"].double()}
        ref_loss, _, ref_g = tk.run(dk.pg_loss_ref, tk.to_fp64(inp), beta=0.1)
        loss, _, g = tk.run(triton_op, mixed, beta=0.1)
        assert (g["hidden"].dtype, g["weight"].dtype, g["bias"].dtype) == (torch.float32, torch.float64, torch.float64)
        torch.testing.assert_close(loss.double(), ref_loss, **close)
        for k in g:
            torch.testing.assert_close(g[k].double(), ref_g[k], **close)

    results = {}
    for name, (inp_kw, kw, scale) in CASES.items():
        try:
            inp = tk.make_inputs(dtype=torch.float32, **inp_kw)
            kw = dict(kw)
            fn_kw = {"bwd": kw.pop("bwd")} if "bwd" in kw else None
            tk.assert_matches(inp, kw, fn=triton_op, grad_scale=scale, fn_kw=fn_kw, **tol)
            results[name] = "ok"
        except Exception as e:  # report, keep going
            results[name] = f"{type(e).__name__}: {e}"
    extra = (case_all_filtered, case_non_contiguous, case_logprobs, case_nonfinite_dropped_inputs_unmodified,
             lambda: case_vocab_151936("dense"), lambda: case_vocab_151936("atomic"),
             lambda: case_huge_bias_on_masked_lanes("dense"), lambda: case_huge_bias_on_masked_lanes("atomic"),
             case_dense_chunks, case_mixed_dtypes_run_in_the_narrower)
    for name, fn in zip(EXTRA, extra):
        try:
            fn()
            results[name] = "ok"
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    # sampler importance sampling + bias-corrected KL vs its float64 direct reference
    results.update(tk.check_triton_cases(triton_op))
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from helpers import checkout_env

    env = checkout_env(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")  # tests/ on the path: kernel_cases
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SAMPLER_IS = [f"sampler_is_{m}_{o}" for m in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
              for o in ("onpolicy", "old")]  # kernel_cases.TRITON_CASES


@pytest.mark.parametrize("case", list(CASES) + EXTRA + SAMPLER_IS)
def test_triton_interpreter_matches_reference(interpreter_results, case):
    assert interpreter_results[case] == "ok", interpreter_results[case]


def _ptxas_spills(ptx: str) -> int | None:
    """Spill bytes (stores + loads) that ptxas -v reports for sm_90a, or None where ptxas is not found."""
    import re
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(90)
        ptxas = getattr(tool, "path", tool)
    except Exception:  # pragma: no cover - depends on the triton build
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr))


KERNELS = {"fwd": "_dash_pg_fwd_kernel", "bwd": "_dash_pg_bwd_kernel", "dz": "_dash_pg_dz_kernel"}


def _compile_for_h100(kernel: str, dtype: str):
    """Ahead-of-time compile of one kernel's GPU launch config for sm_90 (no GPU needed)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import inspect

    import kernel_cases  # noqa: F401  (makes dash_kernels importable from the source tree)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tkern = importlib.import_module("dash_kernels.triton_kernels")
    tdt = getattr(torch, dtype)
    bn, bv, bk, warps = tkern.GPU_BLOCKS[tdt]
    fn = getattr(tkern, KERNELS[kernel])
    flags = {"fwd": ("HAS_BIAS", "ENTROPY"), "bwd": ("HAS_BIAS", "NEED_GH", "NEED_GW", "NEED_GB"),
             "dz": ("HAS_BIAS",)}[kernel]
    consts = {**dict.fromkeys(flags, True), "DOT_PREC": tkern.dot_precision(tdt), "BLOCK_N": bn, "BLOCK_V": bv,
              "BLOCK_K": bk}
    elt = {"bfloat16": "*bf16", "float32": "*fp32"}[dtype]
    types = {"H": elt, "W": elt, "B": elt, "DZ": elt, "IDX": "*i64", "TGT": "*i64", "inv_t": "fp32"}
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:  # outputs and per-token fp32 buffers are pointers in upper case; the rest are int32 sizes
            sig[name] = "*fp32" if name.isupper() and name not in ("V", "K") else "i32"
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_launch_config_compiles_for_h100(kernel, dtype):
    """The kernels type-check, lower to PTX and SASS, and ptxas reports no register spills. Timing still
    needs a GPU."""
    compiled = _compile_for_h100(kernel, dtype)
    assert compiled.asm["cubin"]
    spills = _ptxas_spills(compiled.asm["ptx"])
    assert spills in (None, 0), f"{kernel} {dtype}: {spills} bytes of register spills"


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_tile_pointer_offsets_are_int64(kernel):
    """Every 2-D (tile) pointer offset is computed in int64: offs_v * stride_wv (or offs_k * V for a
    transposed lm_head) passes 2^31 at V 262144 x H 8192, and int32 would wrap to a wrong address. Read
    off the kernel's Triton IR, since a tensor that large does not fit in a CPU test."""
    import re

    ttir = _compile_for_h100(kernel, "bfloat16").asm["ttir"]
    tiles = re.findall(r"tt\.addptr .*: tensor<(\d+)x(\d+)x!tt\.ptr<\w+>>, tensor<\d+x\d+x(i\d+)>", ttir)
    assert tiles, "no tile pointers found in the IR"
    narrow = [t for t in tiles if t[2] != "i64"]
    assert not narrow, f"{kernel}: tile offsets in {sorted({t[2] for t in narrow})}: {narrow[:3]}"


if __name__ == "__main__":
    _main()
