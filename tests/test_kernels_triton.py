"""The Triton kernels on CPU under TRITON_INTERPRET=1, against the naive reference.

TRITON_INTERPRET must be set before triton is imported, so the cases run in one subprocess that
executes this file as a script (the pytest process and its other tests are left untouched); each
case then reports separately. fp32 only: a bf16 tl.dot is wrong in the interpreter. Shapes are
small and blocks large, since the interpreter's cost grows with the number of programs.

The GPU launch config (bf16 and fp32 blocks) is compiled ahead of time for sm_90 in this process: the
kernels lower to SASS and ptxas reports no register spills. Neither check says anything about speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
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
}
EXTRA = ["all_filtered", "non_contiguous", "logprobs", "nonfinite_dropped_inputs_unmodified"]


def _main() -> None:
    """Subprocess entry point: run every case, print {case: "ok" | error} as JSON on the last line."""
    import torch

    sys.path.insert(0, str(HERE))
    import test_kernels as tk

    dk = tk.dk
    torch.set_num_threads(1)

    def triton_op(*a, **kw):
        return dk.fused_linear_pg_loss(*a, backend="triton", **kw)

    tol = {"atol": 3e-5, "rtol": 2e-4}

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
        ref_loss, _, ref_g = tk.run(dk.pg_loss_ref, inp, beta=0.1, tau=0.1)
        loss, _, g = tk.run(triton_op, nc, beta=0.1, tau=0.1)
        torch.testing.assert_close(loss, ref_loss, **tol)
        for k in g:
            torch.testing.assert_close(g[k], ref_g[k], **tol)

    def case_logprobs():
        inp = tk.make_inputs(dtype=torch.float32, v=301, n=45)
        args = (inp["hidden"], inp["weight"], inp["bias"], inp["targets"])
        ref_lp, ref_ent = dk.logprobs_ref(*args, temperature=0.8, return_entropy=True)
        lp, ent = dk.fused_logprobs(*args, temperature=0.8, backend="triton", return_entropy=True)
        torch.testing.assert_close(lp, ref_lp, **tol)
        torch.testing.assert_close(ent, ref_ent, **tol)

    def case_nonfinite_dropped_inputs_unmodified():
        inp = tk.make_inputs(dtype=torch.float32, off_policy="inside")
        kw = {"tau": 0.1, "beta": 0.1}
        ref_loss, _, ref_g = tk.run(dk.pg_loss_ref, inp, **kw)
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
        torch.testing.assert_close(loss, ref_loss, **tol)
        for k in g:
            torch.testing.assert_close(g[k], ref_g[k], **tol)

    results = {}
    for name, (inp_kw, kw, scale) in CASES.items():
        try:
            inp = tk.make_inputs(dtype=torch.float32, **inp_kw)
            tk.assert_matches(inp, kw, fn=triton_op, grad_scale=scale, **tol)
            results[name] = "ok"
        except Exception as e:  # report, keep going
            results[name] = f"{type(e).__name__}: {e}"
    extra = (case_all_filtered, case_non_contiguous, case_logprobs, case_nonfinite_dropped_inputs_unmodified)
    for name, fn in zip(EXTRA, extra):
        try:
            fn()
            results[name] = "ok"
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES) + EXTRA)
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


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_launch_config_compiles_for_h100(kernel, dtype):
    """Ahead-of-time compile of the GPU launch config for sm_90 (no GPU needed): the kernels type-check,
    lower to PTX and SASS, and ptxas reports no register spills. Timing still needs a GPU."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import inspect

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(HERE))
    import test_kernels  # noqa: F401  (makes dash_kernels importable from the source tree)

    tkern = importlib.import_module("dash_kernels.triton_kernels")
    tdt = getattr(torch, dtype)
    bn, bv, bk, warps = tkern.GPU_BLOCKS[tdt]
    fn = tkern._dash_pg_fwd_kernel if kernel == "fwd" else tkern._dash_pg_bwd_kernel
    flags = ("HAS_BIAS", "ENTROPY") if kernel == "fwd" else ("HAS_BIAS", "NEED_GH", "NEED_GW", "NEED_GB")
    consts = {**dict.fromkeys(flags, True), "DOT_PREC": tkern.dot_precision(tdt), "BLOCK_N": bn, "BLOCK_V": bv,
              "BLOCK_K": bk}
    elt = {"bfloat16": "*bf16", "float32": "*fp32"}[dtype]
    types = {"H": elt, "W": elt, "B": elt, "IDX": "*i64", "TGT": "*i64", "inv_t": "fp32"}
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:  # outputs and per-token fp32 buffers are pointers in upper case; the rest are int32 sizes
            sig[name] = "*fp32" if name.isupper() and name not in ("V", "K") else "i32"
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"]
    spills = _ptxas_spills(compiled.asm["ptx"])
    assert spills in (None, 0), f"{fn.fn.__name__} {dtype}: {spills} bytes of register spills"


if __name__ == "__main__":
    _main()
