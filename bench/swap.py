"""A TRL script with only the import swapped: dash_fast.GRPOTrainer vs trl.GRPOTrainer, seconds per step and
peak RSS, each trainer in a fresh process (peak RSS is per process; libgomp reads its settings at load).

    flock -x /tmp/cpu.lock python bench/swap.py --shape qwen0.5b --steps 4 --rounds 1
    python bench/swap.py --shape tiny --steps 2            # seconds: the plumbing

The child is what a user's script looks like: it imports torch, transformers and datasets first, then
`from trl import GRPOConfig, GRPOTrainer` or `from dash_fast import GRPOConfig, GRPOTrainer`, and runs the
same GRPOConfig (TRL's defaults but for the rollout's shape: `--prompts` x `--group` completions of
`--tokens` tokens, one optimizer step per rollout, use_cpu, fp32, no thread settings). The model is a
random-init Qwen2 at the shape's dimensions (qwen0.5b: Qwen2.5-0.5B's, ~494M parameters, tied head), built
once and saved under `--workdir` with a char-level tokenizer (nothing downloaded). The reward is each
completion's place in its group (0, 1, 2, 3, ...), so every group has the same spread and every row has
|advantage| > 0.1: the DASH filter keeps every row (the run checks kept_fraction == 1). Step times are the
gaps between `on_step_end` callbacks (what a user's clock sees), the first `--warmup` steps dropped; peak
RSS is the child's VmHWM. Rounds alternate the trainers (dash, trl, dash, trl, ...) so that background load
hits both alike. `trl_passive` is TRL with OMP_WAIT_POLICY=PASSIVE set before start (its OpenMP threads then
sleep at once instead of spinning: what a busy machine needs). Writes bench/results/swap_<shape>.csv (docs/design.md section 5 columns) and prints ratios.
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


CHILD = """
import json, os, sys, time, tempfile
import torch, transformers, datasets  # a TRL script's imports come first
from transformers import TrainerCallback
if {trainer!r}.startswith("dash"):
    from dash_fast import GRPOConfig, GRPOTrainer
else:
    from trl import GRPOConfig, GRPOTrainer
sys.path.insert(0, {bench!r})
from swap import group_place_reward


class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.steps = time.perf_counter(), []

    def on_train_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.steps.append(now - self.t)
        self.t = now


digits = [f"{{a}}+{{b}}*{{c}}=" for a in range(10, 40) for b in range(2, 5) for c in range(3, 6)]
data = datasets.Dataset.from_list([{{"prompt": p}} for p in digits])
args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="swap-"), per_device_train_batch_size={rows},
                  num_generations={group}, max_completion_length={tokens}, max_steps={steps}, use_cpu=True,
                  bf16=False, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
clock = Clock()
trainer = GRPOTrainer({model!r}, group_place_reward, args=args, train_dataset=data, callbacks=[clock])
trainer.train()
kept = [r["kept_fraction"] for r in trainer.state.log_history if "kept_fraction" in r]
phases = [{{k: v for k, v in r.items() if k.startswith("time_")}} for r in trainer.state.log_history
          if "kept_fraction" in r]  # dash-fast's own split of each step
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
print("SWAP_RESULT " + json.dumps({{"steps": clock.steps, "peak_rss_gb": hwm / 2**20, "kept": kept,
                                    "phases": phases, "threads": torch.get_num_threads()}}))
"""


def run_child(trainer: str, model: str, a: argparse.Namespace) -> dict:
    code = CHILD.format(trainer=trainer, bench=str(Path(__file__).resolve().parent), model=model,
                        rows=a.prompts * a.group, group=a.group, tokens=a.tokens, steps=a.steps)
    env = {**{k: v for k, v in os.environ.items() if k not in THREAD_ENV}, "SWAP_GROUP": str(a.group),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
    if trainer.endswith("_passive"):  # libgomp's spin off from the start, as a user can set it
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer} child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SWAP_RESULT "))
    res = json.loads(line.split(" ", 1)[1])
    res["process_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--trainers", default="dash,trl",
                    help="dash, trl, and trl_passive / dash_passive (OMP_WAIT_POLICY=PASSIVE set before start)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dash-fast-swap"))
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    import common

    model = build_model_dir(a.shape, a.workdir)
    runs: dict[str, list[dict]] = {t: [] for t in a.trainers.split(",")}
    for r in range(a.rounds):
        for t in runs:
            res = run_child(t, model, a)
            runs[t].append(res)
            print(f"round {r} {t}: steps {[round(s, 2) for s in res['steps']]} s, peak RSS "
                  f"{res['peak_rss_gb']:.2f} GB, threads {res['threads']}, kept {res['kept']}", flush=True)
    rows, p50s, rss = [], {}, {}
    for t, results in runs.items():
        steps = sorted(s for res in results for s in res["steps"][a.warmup:])
        if "dash" in t and any(k < 1.0 for res in results for k in res["kept"]):
            print(f"warning: {t} did not keep every row: {[res['kept'] for res in results]}")
        p = (steps[int(0.2 * (len(steps) - 1))], statistics.median(steps), steps[round(0.8 * (len(steps) - 1))])
        p50s[t], rss[t] = p[1], max(res["peak_rss_gb"] for res in results)
        note = f"{a.prompts}x{a.group} rows of {a.tokens} tokens, {len(steps)} timed steps, torch imported first"
        rows.append(common.row("swap", t, "s_per_step", "shape", a.shape, p, "s", "cpu", "float32", 0.0, note))
        rows.append(common.row("swap", t, "peak_rss", "shape", a.shape, (rss[t],) * 3, "GB", "cpu", "float32", 0.0,
                               note))
    common.print_table(rows)
    for t, results in runs.items():
        timed = [ph for res in results for ph in res.get("phases", [])[a.warmup:]]
        if timed:
            split = {k: statistics.median(ph.get(k, 0.0) for ph in timed) for k in sorted({k for ph in timed for k in ph})}
            print(f"{t} p50 split: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
    if "dash" in p50s and "trl" in p50s:
        print(f"dash-fast vs TRL at {a.shape}: {p50s['trl'] / p50s['dash']:.2f}x per step (p50 {p50s['dash']:.2f} "
              f"vs {p50s['trl']:.2f} s; bar 1.5x), peak RSS {rss['dash']:.2f} vs {rss['trl']:.2f} GB (bar <= TRL)")
    out = Path(a.results_dir, f"swap_{a.shape}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=common.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
