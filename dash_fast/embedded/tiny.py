"""The embedded default: a tiny Qwen2 model, a char-level tokenizer and a verifiable arithmetic task.

Nothing is downloaded: the tokenizer is built with `tokenizers`, the model from a `Qwen2Config` with
random weights, and the task is generated from a seed. Everything is saved in the ordinary Hugging Face
formats so the rest of dash-fast loads it through the same paths it uses for real models and data.

The task: sum `n_terms` numbers, collapsing the first two terms per step (a short chain of thought):

    prompt      "7+5+9+3="
    completion  "12+9+3=21+3=24"   (then <eos>; the answer is what follows the last '=')
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARS = list("0123456789+-*=,:. ") + list("QA")


@dataclass
class TinyConfig:
    """Model size and task difficulty of the embedded default."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    n_terms: int = 4
    max_operand: int = 9
    n_train: int = 9000
    n_test: int = 500


def build_tokenizer():
    """A char-level fast tokenizer, one token per character, with pad/bos/eos specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD
    )
    tok.padding_side = "left"
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # prompts are plain text: keep them as is
    )
    return tok


def build_model(tokenizer, cfg: TinyConfig, seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM sized by `cfg` (about 0.4M parameters by default)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def make_problem(rng: random.Random, n_terms: int, max_operand: int) -> dict:
    terms = [rng.randint(0, max_operand) for _ in range(n_terms)]
    prompt = "+".join(map(str, terms)) + "="
    steps, acc = [], terms[0]
    for i in range(1, n_terms):
        acc += terms[i]
        rest = terms[i + 1 :]
        steps.append("+".join(map(str, [acc, *rest])))
    completion = "=".join(steps)
    return {"prompt": prompt, "answer": str(acc), "solution": completion}


def make_task(cfg: TinyConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train / test splits: a prompt never appears in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    want = cfg.n_train + cfg.n_test
    possible = (cfg.max_operand + 1) ** cfg.n_terms
    if want > possible:
        raise ValueError(f"tiny: n_train + n_test = {want} but only {possible} distinct problems exist "
                         f"with n_terms={cfg.n_terms}, max_operand={cfg.max_operand}")
    while len(rows) < want:
        p = make_problem(rng, cfg.n_terms, cfg.max_operand)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            rows.append(p)
    return rows[: cfg.n_train], rows[cfg.n_train :]


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build_embedded(out_dir: str, cfg: TinyConfig, seed: int) -> dict:
    """Write the tiny model, its tokenizer and the task's splits under `out_dir`; return their paths."""
    tok = build_tokenizer()
    model = build_model(tok, cfg, seed)
    init_dir = os.path.join(out_dir, "init_model")
    model.save_pretrained(init_dir)
    tok.save_pretrained(init_dir)
    train, test = make_task(cfg, seed)
    paths = {
        "model": init_dir,
        "train": os.path.join(out_dir, "data", "train.jsonl"),
        "test": os.path.join(out_dir, "data", "test.jsonl"),
    }
    write_jsonl(paths["train"], train)
    write_jsonl(paths["test"], test)
    return paths
