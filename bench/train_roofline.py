"""Training roofline: the training forward + backward vs the measured GEMM rate, the AdamW step vs its bytes.

    python bench/train_roofline.py                                   # Qwen2.5-0.5B shape, 2 rows x (64 + 64)
    python bench/train_roofline.py --rows 4 --prompt 128 --completion 128 --reps 3
    python bench/train_roofline.py --shape tiny --reps 1             # smoke run

The forward is the learner's (forward.PolicyForward._decoder_hidden without shared prompts: the decoder's last hidden
state over right-padded prompt + completion rows, the positions that predict completion tokens gathered)
followed by its loss (dash_kernels.fused_linear_pg_loss with entropy, as the "fused" loss of dash_fast/losses.py calls it),
then `loss.backward()`. FLOPs are counted as executed: 6 x decoder-layer params x every token (prompt
included), 6 x lm_head params x completion tokens (the fused CPU loss does 3 matmuls per token), and
attention 12 x layers x heads x head_dim x L^2 per row (SDPA computes the whole square under a padding
mask). The GEMM rate is torch.mm [rows x L, hidden] @ [hidden, intermediate] measured in the same run.

The optimizer is torch.optim.AdamW as the trainer builds it (default implementation), then foreach=True
and fused=True, each timed on the same gradients from a fresh state (the first step, which allocates the
state, is the warm-up). Bytes moved: 7 x 4 per fp32 parameter (read param, grad, exp_avg, exp_avg_sq;
write param, exp_avg, exp_avg_sq), against read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from rollout import qwen_05b_shape  # noqa: E402

from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer  # noqa: E402

ADAM_BYTES_PER_PARAM = 7 * 4


def training_step(model, rows: int, prompt: int, completion: int, seed: int = 0):
    """A closure running the learner's forward + fused loss + backward on random ids (completions of full
    length, advantages +-1), and the counts its FLOPs need."""
    from dash_kernels import fused_linear_pg_loss

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    length = prompt + completion
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    pred = torch.zeros_like(ids, dtype=torch.bool)
    pred[:, prompt - 1 : length - 1] = True
    targets = ids[:, prompt:].reshape(-1)
    n = targets.numel()
    adv = torch.randn(rows, generator=g).sign().repeat_interleave(completion)
    weights = torch.full((n,), 1.0 / n)
    head = model.get_output_embeddings()
    decoder = getattr(model, model.base_model_prefix)

    def step():
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state[pred]
        loss, _ = fused_linear_pg_loss(hidden, head.weight, getattr(head, "bias", None), targets, adv, weights,
                                       None, None, temperature=1.0, return_entropy=True)
        loss.backward()

    return step, rows * length, n


def executed_flops(dims: dict, rows: int, length: int, completion_tokens: int) -> float:
    """Forward + backward FLOPs as executed (see the module docstring)."""
    attn = 12 * dims["layers"] * dims["heads"] * dims["head_dim"] * length * length * rows
    return 6 * dims["body"] * rows * length + 6 * dims["head"] * completion_tokens + attn


def best_ms(fn, reps: int) -> tuple[float, float]:
    """(best, median) ms of `reps` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[0], ts[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen0.5b", choices=["tiny", "qwen0.5b"])
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--optimizers", default="default,foreach,fused")
    args = ap.parse_args()
    common.set_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, TinyConfig(), seed=0) if args.shape == "tiny" else qwen_05b_shape(tokenizer)
    model.train()
    dims = common.decoder_dims(model)
    n_params = sum(p.numel() for p in model.parameters())
    length = args.prompt + args.completion
    bandwidth = common.measure_bandwidth()
    gemm = common.measure_gemm(args.rows * length, dims["hidden"], model.config.intermediate_size)
    gemm_1024 = common.measure_gemm(1024, dims["hidden"], model.config.intermediate_size)
    print(f"{common.device_name('cpu')}: read bandwidth {bandwidth / 1e9:.1f} GB/s; GEMM "
          f"{gemm / 1e9:.1f} GFLOP/s at m={args.rows * length}, {gemm_1024 / 1e9:.1f} at m=1024")

    step, tokens, completion_tokens = training_step(model, args.rows, args.prompt, args.completion)
    flops = executed_flops(dims, args.rows, length, completion_tokens)

    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        step()

    best, med = best_ms(fwd_bwd, args.reps)
    bound = flops / gemm * 1e3
    print(f"forward+backward: {args.rows} rows x ({args.prompt} + {args.completion}) = {tokens} tokens, "
          f"{flops / 1e12:.2f} TFLOP executed (6 x params x tokens = {6 * n_params * tokens / 1e12:.2f}); "
          f"best {best:.0f} ms, median {med:.0f} ms; GEMM-rate bound {bound:.0f} ms: "
          f"{bound / best:.0%} (best) / {bound / med:.0%} (median) of the measured GEMM throughput, "
          f"{flops / best / 1e6:.1f} GFLOP/s achieved")

    adam_bytes = ADAM_BYTES_PER_PARAM * n_params
    adam_bound = adam_bytes / bandwidth * 1e3
    for kind in args.optimizers.split(","):
        extra = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, **extra)
        best, med = best_ms(opt.step, args.reps)
        print(f"AdamW {kind:8s}: best {best:.0f} ms, median {med:.0f} ms; {adam_bytes / 2**30:.1f} GiB moved at "
              f"{bandwidth / 1e9:.1f} GB/s = {adam_bound:.0f} ms: {adam_bound / best:.0%} of the bandwidth bound")
        del opt


if __name__ == "__main__":
    main()
