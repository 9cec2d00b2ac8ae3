"""An outside check (not part of the suite): a TRL script with `bf16=True` at lr 3e-6 moves the
weights as TRL's own GRPOTrainer does.

Builds a small random Qwen2 model (fp32) saved to a directory, passes it by path to `trl.GRPOTrainer` and
to `dash_fast.GRPOTrainer` with the same `GRPOConfig(bf16=True, learning_rate=3e-6, ...)` arguments, and
prints, for each, the fraction of weights that moved and the norm of the change, then dash-fast's ratios to
TRL's. CPU (`use_cpu=True`), about a minute:

    python tests/bf16_vs_trl.py [--steps 8] [--hidden 64] [--layers 2]
"""

from __future__ import annotations

import argparse
import tempfile

import torch  # first, as a TRL script would


def length_reward(completions, **kwargs):
    """Varies within every group even for a random model, so every step carries signal."""
    return [float(len(c) % 5) for c in completions]


def build(out: str, hidden: int, layers: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dash_fast.embedded.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)  # fp32, initializer_range 0.02
    tok.save_pretrained(out)


def change(trainer) -> tuple[float, float]:
    """(fraction of weights moved, norm of the change) over trainer.train()."""
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    delta = [p.detach().float() - before[n] for n, p in trainer.model.named_parameters()]
    moved = sum(int((d != 0).sum()) for d in delta) / sum(d.numel() for d in delta)
    return moved, float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    cli = parser.parse_args()

    import trl
    from datasets import Dataset

    import dash_fast

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model"
        build(path, cli.hidden, cli.layers)
        data = Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(8) for b in range(8)])
        common = dict(bf16=True, use_cpu=True, learning_rate=3e-6, max_steps=cli.steps, per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=16, report_to="none", logging_steps=1, seed=0,
                      save_strategy="no", disable_tqdm=True)
        rows = {}
        for name, lib in (("trl", trl), ("dash-fast", dash_fast)):
            args = lib.GRPOConfig(output_dir=f"{tmp}/{name}", **common)
            trainer = lib.GRPOTrainer(path, length_reward, args=args, train_dataset=data)
            rows[name] = (*change(trainer), next(trainer.model.parameters()).dtype)
        print(f"{'trainer':<10} {'moved':>8} {'|dW|':>10}  weights")
        for name, (moved, norm, dtype) in rows.items():
            print(f"{name:<10} {moved:>8.4f} {norm:>10.3e}  {dtype}")
        (m_d, n_d, _), (m_t, n_t, _) = rows["dash-fast"], rows["trl"]
        print(f"dash-fast / trl: moved {m_d / m_t:.3f}x, weight change {n_d / n_t:.3f}x")


if __name__ == "__main__":
    main()
