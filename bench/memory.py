"""The memory plan against the measured peak: `dash-fast train --model DIR` for a few steps per model size,
peak RSS of the whole process (os.wait4's ru_maxrss) vs the plan's peak (summary.json's memory_plan).

Models are random-init Qwen2 at Qwen2.5-0.5B's dimensions (hidden 896, 14/2 heads, MLP 4864, vocab
151936, tied head) with 2, 8 and 24 layers (the last one is the 0.5B shape), float32 on CPU, built and
saved here (no download), with a word-level tokenizer covering the whole vocabulary and a reward that
varies with the sampled ids (so every step trains). Writes bench/results/memory.csv and prints the table.

    python bench/memory.py                      # ~10 min on 2 cores; needs ~10 GB of RAM at 24 layers
    python bench/memory.py --layers 2 --steps 1 # one size
    python bench/memory.py --table              # the plan of memory_plan.KNOWN_MODELS at the paper's settings
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
              num_key_value_heads=2, tie_word_embeddings=True)
SMOKE = dict(vocab_size=400, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=True)


def parity_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1 for an even first sampled id, else 0: a reward that differs within groups, so every step trains."""
    return [float(ids[0] % 2 == 0) if len(ids) else 0.0 for ids in completion_ids]


def build(directory: Path, dims: dict, layers: int, seed: int = 0) -> None:
    """A random-init Qwen2 model of `dims` with `layers` layers, a tokenizer over its whole vocabulary, and
    an arithmetic prompt set, in `directory` (model/ and train.jsonl)."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    chars = list("0123456789+=")
    names = ["<pad>", "<bos>", "<eos>", *chars]
    names += [f"<t{i}>" for i in range(dims["vocab_size"] - len(names))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<pad>")
    tok.padding_side = "left"
    config = Qwen2Config(**dims, num_hidden_layers=layers, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(directory / "model")
    tok.save_pretrained(directory / "model")
    rng = random.Random(seed)
    with open(directory / "train.jsonl", "w") as f:
        for _ in range(64):
            terms = [rng.randint(1, 9) for _ in range(4)]
            f.write(json.dumps({"prompt": "+".join(map(str, terms)) + "=", "answer": str(sum(terms))}) + "\n")


def run(directory: Path, steps: int, threads: int, extra: list[str]) -> tuple[int, dict]:
    """One `dash-fast train` process; returns (its peak RSS in bytes, its summary.json memory_plan)."""
    out = directory / "run"
    cmd = [sys.executable, "-m", "dash_fast.cli", "train", "--model", str(directory / "model"),
           "--dataset", str(directory / "train.jsonl"), "--output-dir", str(out), "--max-steps", str(steps),
           "report_to=none", "disable_tqdm=true", "prompts_per_step=4", "group_size=4", "max_prompt_tokens=16",
           "max_completion_tokens=32", "micro_batch_tokens=256", "filter_tau=none", "eval_examples=0",
           f"cpu_threads={threads}", "reward_funcs=[memory:parity_reward]", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), str(HERE),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"bench/memory.py: {' '.join(cmd)} failed:\n{output}")
    with open(out / "summary.json") as f:
        return usage.ru_maxrss * 1024, json.load(f)["memory_plan"]


PAPER_RUN = ["device=cuda", "dtype=bfloat16", "prompts_per_step=64", "group_size=8", "max_completion_tokens=2048",
             "memory_budget_gb=80"]


def plan_table() -> str:
    """Markdown: each KNOWN_MODELS entry planned at the paper's settings (64 prompts x 8 samples, 2048 new
    tokens, 512 prompt tokens, bf16 with fp32 masters, micro_batch_tokens 8192) on an 80 GB GPU: the items
    of the plain settings, their peak, and what the plan picks to fit."""
    import dataclasses

    from dash_fast import memory_plan as mp
    from dash_fast.cli import build_config, parse_args

    names = ["weights", "masters", "grads", "optimizer", "kv_cache", "graph_pool", "sampling", "activations",
             "loss", "embedding_grad"]
    lines = ["| model | params | " + " | ".join(names) + " | peak as configured | fitted: choices | fitted peak |",
             "|---" * (len(names) + 5) + "|"]
    for model in mp.KNOWN_MODELS:
        cfg = build_config(parse_args(["plan", "--model", model, *PAPER_RUN]))
        fitted = mp.plan_run(model, cfg, "cuda", "bfloat16")
        plain = mp.plan(fitted.model, dataclasses.replace(fitted.run, generation_rows=cfg.rows_per_step,
                                                          kv_cache_release=False, gradient_checkpointing=False),
                        runtime=fitted.items["runtime"])
        choices = ", ".join(f"{k}={v}" for k, v in fitted.choices.items()) or "none"
        lines.append(f"| {model} | {plain.model.params / 1e9:.2f}B | "
                     + " | ".join(f"{plain.items[k] / mp.GB:.1f}" for k in names)
                     + f" | {plain.peak / mp.GB:.1f} ({plain.peak_phase}) | {choices} | "
                     f"{fitted.peak / mp.GB:.1f} ({fitted.peak_phase}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,8,24", help="comma-separated layer counts")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a tiny model (tests)")
    p.add_argument("--table", action="store_true", help="print the plan table of the known models and exit")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("extra", nargs="*", metavar="key=value", help="more config overrides for every run")
    a = p.parse_args()
    if a.table:
        print(plan_table())
        return
    sys.path.insert(0, str(HERE))
    import common

    common.RESULTS = Path(a.results_dir)
    dims = SMOKE if a.smoke else QWEN05
    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), dims, layers)
            peak, plan = run(Path(tmp), a.steps, a.threads, a.extra)
        predicted = plan["peak_bytes"]
        params = plan["model"]["params"]
        note = (f"params {params / 1e6:.0f}M; plan {predicted / 1e9:.3f} GB ({plan['peak_phase']}): "
                + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in plan["items_bytes"].items() if v))
        for provider, value in (("plan", predicted), ("measured", peak)):
            rows.append(common.row("memory_plan", provider, "peak_bytes", "layers", layers, (value / 1e9,) * 3,
                                   "GB", "cpu", "float32", 0.0, note if provider == "plan" else "ru_maxrss"))
        print(f"layers={layers}: params {params / 1e6:.0f}M, planned {predicted / 1e9:.3f} GB, measured peak RSS "
              f"{peak / 1e9:.3f} GB, measured / planned = {peak / predicted:.3f}", flush=True)
    common.print_table(rows)
    print(f"wrote {common.write_csv('memory', rows)}")


if __name__ == "__main__":
    main()
