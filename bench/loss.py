"""Fused policy-gradient loss: fwd+bwd time, peak memory and TFLOPS, all providers in one run.

    python bench/loss.py --quick          # CPU: N = 2048 (B 8 x T 256), H 256, V 32000, fp32, kept 1 / .5 / .25
    python bench/loss.py                  # + sweeps over N and V
    python bench/loss.py --device cuda --dtype bfloat16

Providers: naive (materialised logits, eager), compile (torch.compile of naive), liger
(LigerFusedLinearGRPOLoss, its default torch.compile of the loss math, [B, T] layout), dash_torch
(chunked torch path), dash_triton (Triton, bwd="dense": dZ chunks + cuBLAS GEMMs) and
dash_triton_atomic (Triton, bwd="atomic"), both GPU only (or the interpreter under TRITON_INTERPRET=1:
correctness plumbing, no meaningful time). `dash_torch:ROWS` is dash_torch with logits chunks of ROWS token
rows instead of its default (torch_ref.chunk_rows), to compare chunk sizes:

    python bench/loss.py --quick --providers dash_torch:55,dash_torch --hidden 896 --vocab 151936 --rows 1

Each provider gets the same on-policy GRPO problem (beta = 0, token-mean weights). dash_* filter in-op
(tau = 0.1, dropped rows have A = 0); naive, compile and liger get only the kept rows (filtered by the
caller, as a trainer without in-op filtering would), so the kept-fraction sweep compares equal useful work.

FLOPs are counted per provider, as each one executes them (x kept): 6NHV for naive / compile /
liger / dash_torch (forward 2NHV, the two gradient GEMMs 4NHV; liger and dash_torch form the
gradient inside the forward from the same logits), 8NHV for dash_triton* (the backward recomputes the
logits: 2NHV more). `pct_peak` is of the device's bf16 dense peak on GPU (whatever dtype runs),
of a measured matmul of the run dtype on CPU.

CPU bars (base shape, fp32), checked and printed at the end: dash_torch time <= 0.8 x liger, dash_torch
peak memory (first call) <= 1/8 naive, time at kept fraction f <= 1.15 x f x time at f = 1.
GPU figures (dash_triton, bf16, % of H100 peak) need a CUDA device: on a CPU-only machine they are
not measured, and the script says so; the Triton kernels are only checked for correctness there
(tests/ops/test_kernels_triton.py, TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

dk = common.import_dash_kernels()
PROVIDERS = ["naive", "compile", "liger", "dash_torch", "dash_triton", "dash_triton_atomic"]
FLOPS_PER_NHV = {"naive": 6, "compile": 6, "liger": 6, "dash_torch": 6, "dash_triton": 8, "dash_triton_atomic": 8}


def make_problem(n_rows: int, seq: int, hdim: int, vocab: int, kept: float, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    n = n_rows * seq
    hidden = (torch.randn(n, hdim, generator=g)).to(device, dtype)
    weight = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    n_kept_rows = max(1, round(n_rows * kept))
    row_adv = torch.randn(n_rows, generator=g).sign() * (0.5 + torch.rand(n_rows, generator=g))
    row_adv[n_kept_rows:] = 0.0  # filtered by tau = 0.1
    adv = row_adv.repeat_interleave(seq).to(device)
    tw = torch.full((n,), 1.0 / (n_kept_rows * seq), device=device)
    return dict(hidden=hidden, weight=weight, targets=targets, advantages=adv, token_weights=tw,
                row_adv=row_adv.to(device), n_kept_rows=n_kept_rows, seq=seq)


def make_step(provider: str, p: dict, device: str):
    """A closure running one fwd+bwd, or a string saying why the provider cannot run."""
    hidden = p["hidden"].detach().requires_grad_(True)
    weight = p["weight"].detach().requires_grad_(True)
    leaves = (hidden, weight)
    k = p["n_kept_rows"] * p["seq"]  # kept rows come first

    def wrap(loss_fn):
        def step():
            for t in leaves:
                t.grad = None
            loss = loss_fn()
            loss.backward()
            step.last_loss = float(loss.detach())

        return step

    if provider in ("naive", "compile"):
        ref = dk.pg_loss_ref if provider == "naive" else torch.compile(dk.pg_loss_ref, dynamic=False)
        return wrap(lambda: ref(hidden[:k], weight, None, p["targets"][:k], p["advantages"][:k],
                                p["token_weights"][:k])[0])
    if provider == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as e:  # pragma: no cover
            return f"liger_kernel not importable: {e!r}"
        b, t = p["n_kept_rows"], p["seq"]
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")  # compiled=True
        mask = torch.ones(b, t, device=device)
        return wrap(lambda: liger(hidden[:k].view(b, t, -1), weight, p["targets"][:k].view(b, t), mask,
                                  p["row_adv"][:b])[0])
    if provider.startswith("dash_torch:"):  # chosen chunk rows (module docstring)
        rows = int(provider.split(":")[1])
        return wrap(lambda: dk.fused_linear_pg_loss(hidden, weight, None, p["targets"], p["advantages"],
                                                    p["token_weights"], tau=0.1, backend="torch", chunk_size=rows)[0])
    if provider.startswith("dash_"):
        backend = provider.split("_")[1]
        bwd = "atomic" if provider.endswith("_atomic") else "dense"
        if backend == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"{provider} needs a CUDA device (the Triton path is tested on CPU under TRITON_INTERPRET=1)"
        return wrap(lambda: dk.fused_linear_pg_loss(hidden, weight, None, p["targets"], p["advantages"],
                                                    p["token_weights"], tau=0.1, backend=backend, bwd=bwd)[0])
    raise ValueError(provider)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="base shape and the kept-fraction sweep only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None, help="sequences (N = rows x seq)")
    ap.add_argument("--seq", type=int, default=None)
    args = ap.parse_args()
    common.set_threads(args.threads)
    device = args.device
    gpu = torch.device(device).type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    providers = args.providers.split(",")
    # (rows, seq, H, V): CPU base is the bar's B 8 x T 256, H 256, V 32000; GPU base a Qwen2.5-0.5B head.
    base = dict(rows=8, seq=256, hdim=256, vocab=32000) if not gpu else dict(rows=16, seq=1024, hdim=896,
                                                                             vocab=151936)
    for key, val in (("hdim", args.hidden), ("vocab", args.vocab), ("rows", args.rows), ("seq", args.seq)):
        if val:
            base[key] = val
    sweeps = [("kept_fraction", [1.0, 0.5, 0.25])]
    if not args.quick:
        sweeps += [("N", [2, 4, 8, 16] if not gpu else [4, 8, 16, 32]),
                   ("V", [8192, 32000, 65536] if not gpu else [32000, 151936])]
    dev_name = common.device_name(device)
    peak, peak_src = common.device_peak_tflops(device, torch.bfloat16 if gpu else dtype)
    print(f"device: {dev_name}, dtype {dtype}, peak {peak:.2f} TFLOPS ({peak_src})")
    if not gpu:
        print("no CUDA device: the GPU figures (dash_triton speed, bf16, % of GPU peak) are NOT measured in this run")
    rows, skipped = [], {}
    for x_name, values in sweeps:
        for x in values:
            cfg = dict(base)
            kept = 1.0
            if x_name == "kept_fraction":
                kept = x
            elif x_name == "N":
                cfg["rows"] = x
            else:
                cfg["vocab"] = x
            n = cfg["rows"] * cfg["seq"]
            prob = make_problem(cfg["rows"], cfg["seq"], cfg["hdim"], cfg["vocab"], kept, device, dtype)
            kept = prob["n_kept_rows"] / cfg["rows"]
            xv = n if x_name == "N" else x
            nhv = n * cfg["hdim"] * cfg["vocab"] * kept
            print(f"\n== {x_name} = {xv}: N {n}, H {cfg['hdim']}, V {cfg['vocab']}, kept {kept:.2f}")
            note = f"H={cfg['hdim']} V={cfg['vocab']} N={n}"
            steps, mems = {}, {}
            for prov in providers:  # peak memory first: the first call of the non-compiled providers
                step = make_step(prov, prob, device)
                if isinstance(step, str):
                    if prov not in skipped:
                        print(f"skip {prov}: {step}")
                    skipped[prov] = step
                    continue
                compiled = prov in ("compile", "liger")
                if compiled:  # compile happens on the first call: measure memory after it
                    step()
                mem, how = common.peak_memory(step, device)
                mems[prov] = (mem, f"{note}; {how}; " + ("after a warm-up call (compile)" if compiled else "first call"))
                steps[prov] = step
            # Reps interleaved across providers: on a shared machine a burst of background load then
            # hits every provider alike instead of the one that happened to be running.
            times = common.time_interleaved(steps, args.warmup, args.reps, device)
            losses = {prov: step.last_loss for prov, step in steps.items()}
            for prov, t in times.items():
                mem, note_mem = mems[prov]
                per_nhv = FLOPS_PER_NHV[prov.split(":")[0]]  # dash_torch:ROWS counts as dash_torch
                flops = per_nhv * nhv
                common_kw = dict(name="loss", provider=prov, x_name=x_name, x_value=xv, device=dev_name,
                                 dtype=str(dtype).replace("torch.", ""), filter_fraction=round(1 - kept, 4))
                rows += [
                    common.row(metric="time_fwd_bwd", p=t, unit="ms", note=note, **common_kw),
                    common.row(metric="peak_memory", p=(mem / 2**20,) * 3, unit="MiB", note=note_mem, **common_kw),
                    common.row(metric="tflops", p=tuple(flops / (ms * 1e-3) / 1e12 for ms in t[::-1]), unit="TFLOPS",
                               note=f"{note}; {per_nhv}NHV x kept", **common_kw),
                    common.row(metric="pct_peak", p=tuple(100 * flops / (ms * 1e-3) / 1e12 / peak for ms in t[::-1]),
                               unit="%", note=f"{note}; of {peak:.2f} TFLOPS ({peak_src})", **common_kw),
                ]
                print(f"  {prov:12s} {t[1]:9.1f} ms (p20 {t[0]:.1f}, p80 {t[2]:.1f})  peak {mem / 2**20:8.1f} MiB  "
                      f"{flops / (t[1] * 1e-3) / 1e12:.3f} TFLOPS  loss {losses[prov]:+.6f}")
            del steps
            ref = losses.get("naive")
            for prov, val in losses.items():
                if ref is not None and abs(val - ref) > 1e-3 * max(1.0, abs(ref)):
                    print(f"  WARNING: {prov} loss {val} differs from naive {ref}")
    print()
    common.print_table(rows)
    print_ratios(rows)
    if not gpu:
        print_cpu_bars(rows, base)
    path = common.write_csv("loss", rows)
    png = common.plot("loss", rows)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


def print_ratios(rows: list[dict]) -> None:
    """dash time / memory against naive and liger at each point, and time(kept f) / (f x time(kept 1))."""
    def get(prov, metric, x_name, xv):
        for r in rows:
            if (r["provider"], r["metric"], r["x_name"], r["x_value"]) == (prov, metric, x_name, xv):
                return r["p50"]
        return None

    print("\nratios (p50):")
    points = sorted({(r["x_name"], r["x_value"]) for r in rows}, key=lambda p: (p[0], float(p[1])))
    for prov in ("dash_torch", "dash_triton", "dash_triton_atomic"):
        for x_name, xv in points:
            t = get(prov, "time_fwd_bwd", x_name, xv)
            if t is None:
                continue
            parts = []
            for other in ("naive", "compile", "liger"):
                o = get(other, "time_fwd_bwd", x_name, xv)
                if o:
                    parts.append(f"time/{other} {t / o:.3f}")
            m, mn = get(prov, "peak_memory", x_name, xv), get("naive", "peak_memory", x_name, xv)
            if m is not None and mn:
                parts.append(f"mem/naive {m / mn:.3f}")
            if x_name == "kept_fraction":
                t1 = get(prov, "time_fwd_bwd", x_name, 1.0)
                if t1:
                    parts.append(f"time/(f x time@f=1) {t / (float(xv) * t1):.3f}")
            print(f"  {prov} {x_name}={xv}: " + ", ".join(parts))


def print_cpu_bars(rows: list[dict], base: dict) -> None:
    """The CPU bars at the base shape (kept-fraction sweep), from this run's p50s."""
    def get(prov, metric, xv):
        for r in rows:
            if (r["provider"], r["metric"], r["x_name"], r["x_value"]) == (prov, metric, "kept_fraction", xv):
                return r["p50"]
        return None

    print(f"\nCPU bars (N {base['rows'] * base['seq']}, H {base['hdim']}, V {base['vocab']}):")
    t1, tl, m, mn = (get("dash_torch", "time_fwd_bwd", 1.0), get("liger", "time_fwd_bwd", 1.0),
                     get("dash_torch", "peak_memory", 1.0), get("naive", "peak_memory", 1.0))
    checks = []
    if t1 and tl:
        checks.append((f"dash_torch time / liger = {t1 / tl:.3f}", "<= 0.8", t1 / tl <= 0.8))
    if m is not None and mn:
        checks.append((f"dash_torch peak memory / naive = {m / mn:.3f}", "<= 0.125", m / mn <= 0.125))
    for f in (0.5, 0.25):
        tf = get("dash_torch", "time_fwd_bwd", f)
        if t1 and tf:
            checks.append((f"dash_torch time(f={f}) / (f x time(f=1)) = {tf / (f * t1):.3f}", "<= 1.15",
                           tf / (f * t1) <= 1.15))
    for what, bar, ok in checks:
        print(f"  {what:55s} bar {bar:8s} {'PASS' if ok else 'FAIL'}")
    if not checks:
        print("  (providers missing from this run)")


if __name__ == "__main__":
    main()
