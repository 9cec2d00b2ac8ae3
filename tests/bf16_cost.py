"""What fp32 master weights cost a bf16 run (not part of the suite): peak RSS, step time and the sampler
copy's refresh, at Qwen2.5-0.5B's layer shape (hidden 896, 14/2 heads, MLP 4864, vocab 151936, tied head)
with `--layers` decoder layers, on CPU. Each mode runs in its own process (peak RSS is per process):

    python tests/bf16_cost.py [--layers 2] [--steps 3]

Modes: fp32 (dtype=float32), bf16 (fp32 masters + bf16 autocast + the sampler's bf16 copy), bf16_in_place
(master_weights=False: the bf16 weights and AdamW state themselves).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

MODES = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
         "bf16_in_place": {"dtype": "bfloat16", "master_weights": False}}


def id_reward(completions, completion_ids, **kwargs):
    """Varies within every group (a random model at this vocabulary samples ids the tokenizer cannot spell)."""
    return [float(sum(ids) % 5) for ids in completion_ids]


def run(mode: str, layers: int, steps: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dash_fast import DashConfig, DashTrainer
    from dash_fast.embedded.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    if mode == "bf16_in_place":  # the bf16 weights themselves (a passed fp32 module stays fp32 without masters)
        model = model.to(torch.bfloat16)
    data = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(8) for b in range(8)]
    args = DashConfig(output_dir="/tmp/bf16_cost", prompts_per_step=4, group_size=4, max_completion_tokens=32,
                      report_to=[], disable_tqdm=True, learning_rate=3e-6, filter_tau=None, max_steps=steps,
                      save_steps=0, **MODES[mode])
    trainer = DashTrainer(model, id_reward, args=args, train_dataset=data, processing_class=tok)
    trainer.save = lambda step: None  # no checkpoint writes in the timing
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    records = [r for r in trainer.state.log_history if "time_step_s" in r][1:]  # the first step warms up
    refresh = []
    for _ in range(5):
        t = time.perf_counter()
        trainer.precision.refresh()
        refresh.append(time.perf_counter() - t)
    tensors = {"weights": list(trainer.model.parameters()),
               "adam": [v for s in trainer.optimizer.state.values() for v in s.values() if v.dim()]}
    mb = {k: sum(t.numel() * t.element_size() for t in v) / 2**20 for k, v in tensors.items()}
    copy = trainer.precision.sampler_model
    mb["sampler_copy"] = 0.0 if copy is trainer.model else sum(p.numel() * p.element_size()
                                                                 for p in copy.parameters()) / 2**20
    return {"mode": mode, "params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
            "step_s": sum(r["time_step_s"] for r in records) / max(len(records), 1),
            "generate_s": sum(r["time_generate_s"] for r in records) / max(len(records), 1),
            "train_s": sum(r["time_train_s"] for r in records) / max(len(records), 1),
            "refresh_ms": 1e3 * min(refresh), "wall_s": wall,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **{f"{k}_MB": v for k, v in mb.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=list(MODES))
    cli = parser.parse_args()
    if cli.mode:
        print(json.dumps(run(cli.mode, cli.layers, cli.steps)))
        return
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--layers", str(cli.layers),
                              "--steps", str(cli.steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = [k for k in rows[0] if k != "mode"]
    print(f"{'mode':<14}" + "".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(f"{r['mode']:<14}" + "".join(f"{r[k]:>14.3f}" for k in keys))


if __name__ == "__main__":
    main()
