"""The GPU session's checks and measurements, one summary table (profiles/gpu_session.sh runs this).

    python profiles/gpu_session.py --out DIR            # on a CUDA GPU: the real shapes, bf16
    TRITON_INTERPRET=1 python profiles/gpu_session.py --out DIR --dry-run   # CPU: toy shapes, plumbing only

Each check is one function; a check that fails or raises gives a FAIL row and the others still run.
Rows: (check, measured, bar, verdict). In a dry run the verdicts of speed bars are "n/a (dry run)":
the plumbing is exercised, the figures mean nothing.

1. kernels   Triton fwd+bwd (both backwards) vs the float64 reference, fp32 and bf16, at a many-tile shape
2. loss      both backwards vs Liger and torch at the Qwen2.5-0.5B head (H 896, V 151936, N 8192, bf16):
             ms, TFLOPS as executed, % of the bf16 peak, peak memory
3. decode    CUDA-graph decode vs eager: token equality (float64 tiny model), tokens/s (bf16, a random
             Qwen2.5-0.5B-shaped model), and a worker thread that only replays graphs captured up front
4. overlap   step time with the sampler on a side stream vs max(generate, train) of the in-order run
5. trainer   bf16 trainer steps with the Triton loss vs the torch loss (same rollout at step 1)
6. determinism  two deterministic=True bf16 runs give bit-identical weights (in a fresh process)
7. attention grouped-query SDPA with a mask runs on a fused kernel (not the math fallback) and equals the
             K/V-expanded reference; its time vs SDPA's own enable_gqa
8. masters   bf16 trainer steps with fp32 master weights vs bf16 weights trained in place: step time and
             CUDA peak memory (what the masters cost)
9. plan      the memory plan's peak vs torch.cuda.max_memory_allocated of `dash-fast train` on a
             Qwen2.5-0.5B-shaped model (random init, bf16, 2 steps)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for sub in ("tests", "bench", ""):
    sys.path.insert(0, str(ROOT / sub))
import common  # noqa: E402  (bench/common.py)

dk = common.import_dash_kernels()
ROWS: list[dict] = []


def row(check: str, measured: str, bar: str, ok: bool | None) -> None:
    verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
    ROWS.append({"check": check, "measured": measured, "bar": bar, "verdict": verdict})
    print(f"  {verdict:5s} {check}: {measured}  [bar {bar}]", flush=True)


def speed(ok: bool, dry: bool) -> bool | None:
    return None if dry else ok


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- 1. kernels
def check_kernels(dry: bool, device: str) -> None:
    from kernel_cases import make_inputs, run, to_fp64

    shape = dict(n=21, h=40, v=1031, rows=5) if dry else dict(n=1024, h=256, v=8209, rows=16)
    dtypes = [torch.float32] if dry else [torch.float32, torch.bfloat16]  # bf16 tl.dot: wrong in the interpreter
    kw = dict(tau=0.1, beta=0.05, temperature=0.7, return_entropy=True)
    for dtype in dtypes:
        inp = make_inputs(dtype=torch.float32, off_policy="outside", temperature=0.7, **shape)
        for k in ("hidden", "weight", "bias"):
            inp[k] = inp[k].to(dtype)
        ref_loss, _, ref_g = run(dk.pg_loss_ref, to_fp64(inp), **kw)
        on_dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for bwd in ("dense", "atomic"):
            loss, _, g = run(lambda *a, bwd=bwd, **k: dk.fused_linear_pg_loss(*a, backend="triton", bwd=bwd, **k),
                             on_dev, **kw)
            loss_err = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-6)
            grad_err = max(float((g[k].double().cpu() - ref_g[k]).abs().max() / ref_g[k].abs().max()) for k in ref_g)
            finite = all(bool(torch.isfinite(t).all()) for t in g.values())
            name = f"kernels {str(dtype)[6:]} bwd={bwd} vs float64 (N {shape['n']}, H {shape['h']}, V {shape['v']})"
            row(name, f"loss rel {loss_err:.1e}, grad max-rel {grad_err:.1e}", f"<= {tol:g}",
                finite and loss_err <= tol and grad_err <= tol)


# ----------------------------------------------------------------------------- 2. loss at the Qwen2.5-0.5B head
def check_loss(dry: bool, device: str) -> None:
    import loss as bl  # bench/loss.py

    rows, seq, hdim, vocab = (2, 16, 32, 1000) if dry else (8, 1024, 896, 151936)
    dtype = torch.float32 if dry else torch.bfloat16
    prob = bl.make_problem(rows, seq, hdim, vocab, 1.0, device, dtype)
    n = rows * seq
    nhv = n * hdim * vocab
    peak, peak_src = common.device_peak_tflops(device, torch.bfloat16 if device == "cuda" else dtype)
    steps, mems = {}, {}
    for prov in ("naive", "liger", "dash_torch", "dash_triton", "dash_triton_atomic"):
        step = bl.make_step(prov, prob, device)
        if isinstance(step, str):
            row(f"loss {prov}", step, "-", False if prov == "liger" and not dry else None)
            continue
        if prov == "liger":
            step()  # torch.compile on the first call
        mems[prov], _ = common.peak_memory(step, device)
        steps[prov] = step
    times = common.time_interleaved(steps, 1, 1 if dry else 5, device)
    shape = f"N {n}, H {hdim}, V {vocab}, {str(dtype)[6:]}"
    for prov, t in times.items():
        tflops = bl.FLOPS_PER_NHV[prov] * nhv / (t[1] * 1e-3) / 1e12
        row(f"loss {prov} fwd+bwd ({shape})",
            f"{t[1]:.2f} ms, {tflops:.1f} TFLOPS ({bl.FLOPS_PER_NHV[prov]}NHV), {100 * tflops / peak:.1f}% of "
            f"{peak:.3g} ({peak_src}), peak {mems[prov] / 2**20:.0f} MiB, loss {steps[prov].last_loss:+.5f}", "-", None)
    ref = steps.get("naive")
    for prov in steps:
        if ref is not None and prov != "naive":
            d = abs(steps[prov].last_loss - ref.last_loss)
            row(f"loss {prov} value vs naive", f"|diff| {d:.2e}", "<= 1e-3 x max(1, |loss|)",
                d <= 1e-3 * max(1.0, abs(ref.last_loss)))
    for prov in ("dash_triton", "dash_triton_atomic"):
        if prov not in times:
            continue
        t = times[prov][1]
        pct = 100 * 8 * nhv / (t * 1e-3) / 1e12 / peak
        row(f"loss {prov}: % of bf16 peak on 8NHV", f"{pct:.1f}%", ">= 50%", speed(pct >= 50, dry))
        if "liger" in times:
            r = times["liger"][1] / t
            row(f"loss {prov}: speed vs liger", f"{r:.2f}x", ">= 2x", speed(r >= 2, dry))
        if "naive" in mems and mems["naive"] > 0:
            r = mems[prov] / mems["naive"]
            row(f"loss {prov}: peak memory / naive", f"{r:.3f}", "<= 0.2", speed(r <= 0.2, dry))


# ----------------------------------------------------------------------------- 3. decode
def _fake_capture(step):  # dry run: a stand-in "graph" (replay = run the captured step again)
    out = step()
    return (lambda: out.copy_(step())), out


def _graph_engine(model, dry: bool):
    from dash_fast.engines.torch_engine import TorchEngine

    eng = TorchEngine(model, 0, kv_cache="static", cuda_graphs=True)
    if dry:
        eng.capture = _fake_capture
    return eng


def check_decode(dry: bool, device: str) -> None:
    from helpers import TINY_ENGINE as TINY
    from helpers import prompts

    from dash_fast.embedded.tiny import build_model, build_tokenizer
    from dash_fast.engines.base import SamplingParams
    from dash_fast.engines.torch_engine import TorchEngine

    # equality in float64 (no rounding differences between the full-length graph step and the eager one)
    model = build_model(build_tokenizer(), TINY, seed=0).double().to(device)
    params = SamplingParams(temperature=0.8, top_k=10, max_new_tokens=12, stop_token_ids=(3, 4, 9), seed=3)
    batch = [p for p in prompts(8) for _ in range(4)]
    eager = TorchEngine(model, 0, kv_cache="static", cuda_graphs=False).generate(batch, params)
    eng = _graph_engine(model, dry)
    captured = eng.prepare(len(batch), 32 + params.max_new_tokens)
    box = {}
    worker = threading.Thread(target=lambda: box.update(out=eng.generate(batch, params)), name="sampler-worker")
    worker.start()
    worker.join()
    out = box.get("out")
    same = out is not None and out.completion_token_lists() == eager.completion_token_lists()
    misses = out.stats["graph_misses"] if out is not None else -1
    threads = {t for _, t in eng.static_decoder.capture_log}
    row("decode graphs (worker thread, captured up front) vs eager, float64 tokens",
        f"{'equal' if same else 'DIFFERENT'}; buckets {captured}; misses {misses}; captured on {sorted(threads)}",
        "equal, 0 misses, MainThread only", same and misses == 0 and threads == {"MainThread"})

    # throughput: bf16, a Qwen2.5-0.5B-shaped random model (dry: the tiny model), greedy, no stop tokens
    if dry:
        model, n_prompts, plen, new = build_model(build_tokenizer(), TINY, seed=0).to(device), 4, 8, 8
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                          max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU init
            model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
        n_prompts, plen, new = 64, 64, 128
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = [torch.randint(5, vocab, (plen,), generator=g).tolist() for _ in range(n_prompts)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=new)
    rates, outs = {}, {}
    for name, eng in (("eager", TorchEngine(model, 0, kv_cache="static", cuda_graphs=False)),
                      ("graphs", _graph_engine(model, dry))):
        t0 = time.perf_counter()
        eng.prepare(n_prompts, plen + new)
        sync(device)
        prep = time.perf_counter() - t0
        eng.generate(batch[:2], greedy)  # warm-up (kernels, allocator)
        sync(device)
        t0 = time.perf_counter()
        outs[name] = eng.generate(batch, greedy)
        sync(device)
        dt = time.perf_counter() - t0
        rates[name] = outs[name].stats["generated_tokens"] / dt
        row(f"decode {name} tokens/s (bf16, {n_prompts} x {plen}+{new})" if not dry else f"decode {name} tokens/s",
            f"{rates[name]:.0f} tok/s ({dt:.2f} s; prepare {prep:.2f} s)", "-", None)
    a, b = outs["eager"].completion_token_lists(), outs["graphs"].completion_token_lists()
    agree = sum(x == y for x, y in zip(a, b)) / len(a)
    row("decode graphs / eager speed", f"{rates['graphs'] / rates['eager']:.2f}x; rows identical {agree:.0%}",
        "> 1x", speed(rates["graphs"] > rates["eager"], dry))


# ----------------------------------------------------------------------------- 4-6. trainer
def make_trainer(out: str, device: str, **overrides):
    from helpers import length_reward

    from dash_fast import DashConfig, DashTrainer
    from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task

    small = overrides.pop("small", False)
    tiny = TinyConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, n_terms=2, max_operand=19,
                      n_train=128, n_test=8) if small else \
        TinyConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536, n_terms=2, max_operand=19,
                   n_train=512, n_test=8)
    tok = build_tokenizer()
    dtype = overrides.pop("dtype", "bfloat16" if device == "cuda" else "float32")
    model = build_model(tok, tiny, seed=0).to(getattr(torch, dtype))
    train, _ = make_task(tiny, seed=0)
    args = dict(output_dir=out, device=device, dtype=dtype, prompts_per_step=8 if small else 32, group_size=4,
                max_completion_tokens=8 if small else 48, max_prompt_tokens=16, report_to=[], disable_tqdm=True,
                learning_rate=1e-3, filter_tau=None, max_steps=3 if small else 5, seed=1, eval_every=0,
                eval_examples=4, micro_batch_tokens=8192)
    args.update(overrides)
    return DashTrainer(model, length_reward, args=DashConfig(**args), train_dataset=train, processing_class=tok)


def _records(trainer) -> list[dict]:
    return [r for r in trainer.state.log_history if "loss" in r]


def check_overlap(dry: bool, device: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        seq = make_trainer(f"{tmp}/seq", device, small=dry, overlap=False)
        seq.train()
        ovl = make_trainer(f"{tmp}/ovl", device, small=dry, overlap=True)
        concurrent = ovl.overlap.concurrent
        ovl.train()
    rs, ro = _records(seq)[1:], _records(ovl)[1:]  # past the first step (warm-up, and nothing ahead yet)
    mean = lambda rs, k: sum(r[k] for r in rs) / max(len(rs), 1)  # noqa: E731
    gen, train, step_seq, step_ovl = (mean(rs, "time_generate_s"), mean(rs, "time_train_s"), mean(rs, "time_step_s"),
                                      mean(ro, "time_step_s"))
    ratio = step_ovl / max(gen, train)
    row(f"overlap ({'side stream + thread' if concurrent else 'in order'}) step vs max(generate, train)",
        f"{step_ovl * 1e3:.0f} ms vs max({gen * 1e3:.0f}, {train * 1e3:.0f}) ms = {ratio:.2f}x; in order "
        f"{step_seq * 1e3:.0f} ms; lag {[r.get('rollout_lag') for r in _records(ovl)]}", "<= 1.1x",
        speed(concurrent and ratio <= 1.1, dry))


def check_trainer(dry: bool, device: str) -> None:
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("fused", "naive"):  # fused: the Triton kernels on CUDA; naive: torch autograd on logits
            t = make_trainer(f"{tmp}/{impl}", device, small=dry, loss_impl=impl)
            t.train()
            curves[impl] = [(r["loss"], r["grad_norm"], r["reward_mean"]) for r in _records(t)]
    (l1, g1, _), (l2, g2, _) = curves["fused"][0], curves["naive"][0]
    gerr = abs(g1 - g2) / max(abs(g2), 1e-12)
    lerr = abs(l1 - l2) / max(abs(l2), 1e-12)
    dtype = "bf16" if device == "cuda" else "fp32"
    fused = "Triton" if device == "cuda" else "fused torch path"
    row(f"trainer {dtype} loss_impl=fused ({fused}) vs naive torch loss, step 1 (same rollout)", f"loss rel {lerr:.1e}, grad_norm rel {gerr:.1e}",
        "<= 2e-2", lerr <= 2e-2 and gerr <= 2e-2)
    diffs = [abs(a[0] - b[0]) / max(abs(b[0]), 1e-12) for a, b in zip(curves["fused"], curves["naive"])]
    finite = all(torch.isfinite(torch.tensor(c)).all() for c in curves.values())
    row(f"trainer {dtype} loss curves ({len(diffs)} steps; samples diverge after step 1)",
        "max rel diff " + f"{max(diffs):.1e}; fused {[round(c[0], 4) for c in curves['fused']]}", "<= 0.1, finite",
        bool(finite) and max(diffs) <= 0.1)


def check_determinism(dry: bool, device: str) -> None:
    """Two runs in one fresh process (CUBLAS_WORKSPACE_CONFIG is read at the first cuBLAS call)."""
    cmd = [sys.executable, __file__, "--determinism-child"] + (["--dry-run"] if dry else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    verdict = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    row(f"deterministic=True: two {'fp32' if dry else 'bf16'} runs, final weights", verdict, "bit-identical",
        proc.returncode == 0 and verdict.startswith("identical"))


def determinism_child(dry: bool) -> None:
    device = "cpu" if dry else "cuda"
    finals = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            t = make_trainer(f"{tmp}/{i}", device, small=True, deterministic=True, loss_impl="fused")
            t.train()
            finals.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})
    diff = [k for k in finals[0] if not torch.equal(finals[0][k], finals[1][k])]
    print("identical" if not diff else f"DIFFERENT in {len(diff)} tensors, e.g. {diff[:3]}")


# ----------------------------------------------------------------------------- 7-9. real scale
def check_attention(dry: bool, device: str) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dash_fast.models.decoder import grouped_sdpa

    b, H, n_kv, T, D = (2, 4, 2, 8, 16) if dry else (16, 14, 2, 1024, 64)  # Qwen2.5-0.5B heads, a 1k-token prefill
    dtype = torch.float32 if dry else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, H, T, D, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(b, n_kv, T, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    mask = torch.ones(T, T, device=device, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    mask[0, :, :, : T // 4] = False  # left padding on row 0: a real mask, not just causal
    mask[0, :, :, T // 4] = True
    scale = D ** -0.5
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(H // n_kv, 1),
                                         v.double().repeat_interleave(H // n_kv, 1), attn_mask=mask, scale=scale)
    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    backends = fused + [SDPBackend.MATH] if dry else fused  # the CPU dry run has no fused masked kernel to insist on
    try:
        with sdpa_kernel(backends):
            out = grouped_sdpa(q, k, v, mask, scale)
        err, raised = float((out.double() - ref).abs().max()), ""
    except RuntimeError as e:
        err, raised = float("inf"), f"; raised {str(e)[:120]}"
    tol = 1e-5 if dry else 2e-2
    row(f"attention grouped_sdpa with a mask on fused SDPA kernels only ({H}/{n_kv} heads, T {T}, {str(dtype)[6:]})",
        f"max abs err vs K/V-expanded float64 {err:.1e}{raised}", f"runs without MATH, <= {tol:g}", err <= tol)
    steps = {"grouped_sdpa": lambda: grouped_sdpa(q, k, v, mask, scale),
             "sdpa enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                       enable_gqa=True)}
    times = common.time_interleaved(steps, 1, 1 if dry else 10, device)
    ratio = times["sdpa enable_gqa"][1] / times["grouped_sdpa"][1]
    row("attention grouped_sdpa speed vs SDPA enable_gqa (same mask)",
        f"{times['grouped_sdpa'][1]:.2f} vs {times['sdpa enable_gqa'][1]:.2f} ms = {ratio:.2f}x", ">= 1x",
        speed(ratio >= 1.0, dry))


def check_masters(dry: bool, device: str) -> None:
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for masters in (True, False):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = make_trainer(f"{tmp}/{masters}", device, small=dry, dtype="bfloat16", master_weights=masters)
            t.train()
            steps = [r["time_step_s"] for r in _records(t)][1:]  # past the first step (warm-up)
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
            figures[masters] = (sum(steps) / max(len(steps), 1), peak)
            del t
            if device == "cuda":
                torch.cuda.empty_cache()
    (t_on, m_on), (t_off, m_off) = figures[True], figures[False]
    ratio = t_on / max(t_off, 1e-9)
    row("masters bf16 + fp32 masters vs bf16 in place: step time",
        f"{t_on * 1e3:.0f} vs {t_off * 1e3:.0f} ms = {ratio:.2f}x", "<= 1.25x", speed(ratio <= 1.25, dry))
    row("masters: CUDA peak memory", f"{m_on / 2**20:.0f} vs {m_off / 2**20:.0f} MiB", "-", None)


def check_plan(dry: bool, device: str) -> None:
    import memory as bench_memory  # bench/memory.py

    from dash_fast.cli import main as cli_main

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_memory.build(work, bench_memory.SMOKE if dry else bench_memory.QWEN05, 2 if dry else 24)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        rc = cli_main(["train", "--model", str(work / "model"), "--dataset", str(work / "train.jsonl"),
                       "--output-dir", str(work / "run"), "--max-steps", "2", f"device={device}",
                       f"dtype={'float32' if dry else 'bfloat16'}", "report_to=none", "disable_tqdm=true",
                       "prompts_per_step=8", "group_size=8", "max_prompt_tokens=16", "max_completion_tokens=256",
                       "filter_tau=none", "eval_examples=0", "reward_funcs=[memory:parity_reward]"])
        measured = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else 0
        plan = json.loads((work / "run" / "summary.json").read_text())["memory_plan"] if rc == 0 else None
    if plan is None:
        row("plan vs CUDA peak", f"dash-fast train exited {rc}", "runs", False)
        return
    ratio = measured / plan["peak_bytes"]
    row(f"plan vs CUDA peak ({plan['model']['params'] / 1e6:.0f}M params, 64 rows x 256 new tokens, "
        f"{'fp32' if dry else 'bf16'})",
        f"measured {measured / 1e9:.2f} GB / planned {plan['peak_bytes'] / 1e9:.2f} GB = {ratio:.2f}",
        "0.7 .. 1.1", speed(0.7 <= ratio <= 1.1, dry))


# ----------------------------------------------------------------------------- main
CHECKS = {"kernels": check_kernels, "loss": check_loss, "decode": check_decode, "overlap": check_overlap,
          "trainer": check_trainer, "determinism": check_determinism, "attention": check_attention,
          "masters": check_masters, "plan": check_plan}


def write(out: Path, dry: bool, wall: float, echo: bool = True) -> None:
    head = f"GPU session ({'DRY RUN on CPU: figures are plumbing only' if dry else common.device_name('cuda')})"
    lines = [f"# {head}", "", f"torch {torch.__version__}; wall {wall:.0f} s", "",
             "| check | measured | bar | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['measured']} | {r['bar']} | {r['verdict']} |" for r in ROWS]
    text = "\n".join(lines) + "\n"
    if echo:
        print("\n" + text)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"dry_run": dry, "wall_s": wall, "rows": ROWS}, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-results")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, toy shapes")
    ap.add_argument("--only", default=",".join(CHECKS))
    ap.add_argument("--determinism-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.determinism_child:
        determinism_child(args.dry_run)
        return 0
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run (and TRITON_INTERPRET=1) on CPU")
    device = "cpu" if args.dry_run else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            CHECKS[name](args.dry_run, device)
        except Exception as e:  # one failing check does not stop the others
            traceback.print_exc()
            row(name, f"raised {type(e).__name__}: {str(e)[:200]}", "runs", False)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        write(out, args.dry_run, time.perf_counter() - t_all, echo=False)  # what is done survives a timeout
    write(out, args.dry_run, time.perf_counter() - t_all)
    return 0 if all(r["verdict"] != "FAIL" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
