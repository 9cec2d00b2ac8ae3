"""Sampler vs trainer at Qwen2.5-0.5B's shape (random init, hidden 896, 14/2 heads, MLP 4864, vocab 151936,
tied head, `--layers` decoder layers), on CPU: one step (learning rate 0) per dtype of the embedded engine, and
the step record's `sampling/sampling_logp_difference/{mean,max}` and, where the correction is on (bf16 by
default), `sampling/importance_sampling_ratio/{min,mean,max}`. Each dtype runs in its own process.

    python bench/sampler_agreement.py [--layers 24] [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def id_reward(completions, completion_ids, **kwargs):
    return [float(sum(ids) % 5) for ids in completion_ids]


def run(dtype: str, layers: int, tokens: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]
    from dash_fast import DashConfig, DashTrainer
    from dash_fast.embedded.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    data = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(8) for b in range(8)]
    args = DashConfig(output_dir=f"/tmp/sampler_agreement_{dtype}", prompts_per_step=2, group_size=4,
                      max_completion_tokens=tokens, report_to=[], disable_tqdm=True, learning_rate=0.0,
                      filter_tau=None, max_steps=1, save_steps=0, dtype=dtype, temperature=1.0, top_k=0)
    trainer = DashTrainer(model, id_reward, args=args, train_dataset=data, processing_class=tok)
    record = trainer.train_step(1)
    return {"dtype": dtype, "layers": layers, "correction": trainer.learner.sampler_is,
            **{k: v for k, v in record.items() if k.startswith("sampling/")},
            "completion_tokens": record.get("completion_len_mean", 0) * 8, "time_step_s": record["time_step_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dtype")
    a = ap.parse_args()
    if a.dtype:
        print(json.dumps(run(a.dtype, a.layers, a.tokens)))
        return
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, __file__, "--dtype", dtype, "--layers", str(a.layers), "--tokens",
                              str(a.tokens)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
